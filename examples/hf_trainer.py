"""DBA inside a Hugging Face `Trainer`: wrap its optimizer, keep everything else.

    python examples/hf_trainer.py PATH_TO_GLOBAL_GRADIENT [--steps 12] [--out DIR]

`DBAOptimizer` applies DBA at each `step()` (after the Trainer's gradient clipping) and
multiplies that step's learning rate by c_t; `schedule_lambda` is AL for `LambdaLR`.
"""

import argparse
import tempfile

import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from dba_ray import artifact
from dba_ray.config import DBAConfig, ModelConfig, ScheduleConfig
from dba_ray.dba import DBA, DBAOptimizer, schedule_lambda
from dba_ray.model import load_model
from dba_ray.tokenizer import byte_tokenizer

TEXTS = [
    "Patients randomized to the intervention arm showed lower systolic pressure at 12 weeks.",
    "The odds ratio for readmission was 0.71 (95% CI 0.58 to 0.87).",
    "Adverse events were mild and resolved without treatment in most participants.",
    "Does early mobilization reduce length of stay after hip fracture surgery?",
]


class LogDBA(TrainerCallback):
    """Collects the DBA statistics of every step (γ_t, cos, c_t, norms)."""

    def __init__(self, optimizer: DBAOptimizer):
        self.optimizer, self.stats = optimizer, []

    def on_step_end(self, args, state, control, **kw):
        self.stats.append(self.optimizer.last_stats.as_dict())


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("global_gradient")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    model = load_model(ModelConfig())
    grad = artifact.load_any(args.global_gradient, model=model)
    tok = byte_tokenizer()
    enc = tok(TEXTS, padding="max_length", max_length=96, truncation=True)
    data = Dataset.from_dict(
        {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": [
                [i if m else -100 for i, m in zip(ids, mask)]
                for ids, mask in zip(enc["input_ids"], enc["attention_mask"])
            ],
        }
    )
    sched = ScheduleConfig(lr=1e-3)
    inner = torch.optim.AdamW(model.parameters(), lr=sched.lr)
    optimizer = DBAOptimizer(
        inner, DBA(model.named_parameters(), grad.mean, args.steps, DBAConfig(boost=2 * args.steps))
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_lambda(args.steps, sched))
    callback = LogDBA(optimizer)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.out or tempfile.mkdtemp(),
            max_steps=args.steps,
            per_device_train_batch_size=4,
            max_grad_norm=1.0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
        ),
        train_dataset=data,
        optimizers=(optimizer, scheduler),
        callbacks=[callback],
    )
    trainer.train()
    for i, s in enumerate(callback.stats):
        print(f"step {i:3d}  γ {s['gamma']:.3f}  cos {s['cos']:+.3f}  c {s['c']:.3f}")
    return trainer, callback.stats


if __name__ == "__main__":
    main()
