"""Streaming training sequences from files, cloud URIs or Hugging Face data sets."""

from dba_ray.data.pipeline import build_sequences, collect_arrays, describe_source

__all__ = ["build_sequences", "collect_arrays", "describe_source"]
