"""AdamW parameter groups and the LR schedule."""
from __future__ import annotations

import math

import torch


def param_groups(model, weight_decay: float, decay_all: bool) -> list[dict]:
    """2-D weights decay; A_log, D, norms and biases do not (unless decay_all: the original)."""
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        skip = getattr(p, "_no_weight_decay", False) or p.dim() < 2 or name.endswith(("A_log", "D"))
        (no_decay if skip and not decay_all else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_scheduler(optimizer, kind: str, warmup: int, total: int, start_step: int = 0):
    """LR factor per step: linear warmup, then constant or cosine to 0 at ``total``. start_step > 0
    (recover_step): the schedule stands at that step, as if it had been stepped that many times."""
    def factor(step):
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0
    if start_step:
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_step - 1)
