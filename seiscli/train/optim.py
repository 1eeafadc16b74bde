"""AdamW with MAE's parameter groups and a linear-warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from seiscli.recipe import Optim


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Weight decay on matrices and conv kernels only: not on norms, biases or the cls/mask tokens."""
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith("_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim: Optim, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model.named_parameters(), optim.weight_decay),
        lr=lr_at(0, optim, 1),
        betas=optim.betas,
        fused=device.type == "cuda",
    )


def lr_at(step: int, optim: Optim, total_steps: int) -> float:
    """Learning rate of 0-based `step`: linear warmup to optim.lr over warmup_steps, then a half cosine down
    to lr x min_lr_ratio at the last step."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    span = max(1, total_steps - 1 - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    floor = optim.lr * optim.min_lr_ratio
    return floor + (optim.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
