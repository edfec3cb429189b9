"""dba-ray: domain fine-tuning with Dynamic Boosted Annealing on Ray."""

__version__ = "0.1.0"
