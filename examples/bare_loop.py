"""DBA in a bare PyTorch loop, no Ray: the four lines between backward() and step().

    python examples/bare_loop.py PATH_TO_GLOBAL_GRADIENT [--steps 20]

The artifact comes from `dba-ray global-gradient` (e.g. examples/quickstart.yaml); the
domain text here is a few made-up sentences, enough to watch γ_t and c_t move.
"""

import argparse

import torch

from dba_ray import artifact
from dba_ray.config import DBAConfig, ModelConfig, ScheduleConfig
from dba_ray.dba import DBA, lr_at
from dba_ray.model import load_model
from dba_ray.tokenizer import byte_tokenizer

DOMAIN = [
    "Revenue rose 12% year over year while operating margin held at 31%.",
    "The company repurchased 4.1 million shares for a total of $212 million.",
    "Deferred tax assets decreased mainly because of the change in valuation allowance.",
    "Net cash provided by operating activities was $1.2 billion in fiscal 2019.",
]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("global_gradient")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)

    model = load_model(ModelConfig())  # the base the artifact was computed on
    grad = artifact.load_any(args.global_gradient, model=model)
    tok = byte_tokenizer()
    batch = tok(DOMAIN, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    T, sched = args.steps, ScheduleConfig(lr=1e-3)
    dba = DBA(model.named_parameters(), grad.mean, T, DBAConfig(boost=2 * T))
    opt = torch.optim.AdamW(model.parameters(), lr=sched.lr)
    log = []
    for t in range(T):
        loss = model(input_ids=batch["input_ids"], labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        stats = dba.apply(t)  # .grad: g_D -> g_B
        for group in opt.param_groups:  # AL, times DC's c_t
            group["lr"] = lr_at(t, T, sched) * stats.c
        opt.step()
        opt.zero_grad()
        log.append({"step": t, "loss": float(loss), **stats.as_dict()})
        print(f"step {t:3d}  loss {float(loss):.4f}  γ {stats.gamma:.3f}  cos {stats.cos:+.3f}  c {stats.c:.3f}")
    return log


if __name__ == "__main__":
    main()
