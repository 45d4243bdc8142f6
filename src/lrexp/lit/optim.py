"""Optimisers and learning-rate schedules (docs/models.md#optimiser-and-schedule).

The paper's schedule is lr(t) = min(t, w)/w * 1/sqrt(max(t, w)) with w warm-up steps: a linear warm-up to
1/sqrt(w), then inverse square-root decay. With another peak p it is scaled by p * sqrt(w). The cosine
schedule (the code's repository default) has the same warm-up and decays to 0 at `train.max_steps`.

Adafactor is lrexp's own (`lit/adafactor.py`), stepping as the reference code's Flax Adafactor does, with
its first moment (`optim.beta1`, 0.9 in the code). AdamW's peak lr defaults to 3e-4: Adafactor's
1/sqrt(warmup) (0.03 at paper scale) is a relative step, far too large as an absolute one.
"""

from __future__ import annotations

import functools
import math
from typing import Iterable

import torch
from torch import nn

from lrexp.config.schema import RunConfig
from lrexp.lit.adafactor import Adafactor


ADAMW_LR = 3e-4


def peak_lr(cfg: RunConfig) -> float:
    if cfg.optim.lr is not None:
        return cfg.optim.lr
    return 1.0 / math.sqrt(cfg.optim.warmup_steps) if cfg.optim.name == "adafactor" else ADAMW_LR


def lr_factor(step: int, *, schedule: str, warmup_steps: int, max_steps: int) -> float:
    """Multiplier of the peak lr for the update after `step` completed updates (t = step + 1, so the first
    update already moves the weights)."""
    t = step + 1
    warm = min(t, warmup_steps) / warmup_steps
    if schedule == "rsqrt":
        return warm * math.sqrt(warmup_steps / max(t, warmup_steps))
    if schedule == "cosine":
        if t <= warmup_steps:
            return warm
        progress = min(1.0, (t - warmup_steps) / max(1, max_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def build_optimizer(cfg: RunConfig, named_params: Iterable[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in named_params if p.requires_grad]
    lr = peak_lr(cfg)
    if cfg.optim.name == "adafactor":
        return Adafactor([p for _, p in params], lr=lr, beta1=cfg.optim.beta1, weight_decay=cfg.optim.weight_decay)
    if cfg.optim.name == "adamw":
        # no decay on gains and biases (1-d tensors): decaying a norm's scale towards 0 only hurts
        decay = [p for _, p in params if p.ndim >= 2]
        no_decay = [p for _, p in params if p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": cfg.optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    raise ValueError(f"unknown optimiser {cfg.optim.name!r}")


def build_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    # a partial, not a closure object with attributes: LambdaLR checkpoints a callable's __dict__, and a
    # resumed run must take its schedule from the config (say a longer max_steps), not from the checkpoint
    factor = functools.partial(
        lr_factor,
        schedule=cfg.optim.schedule,
        warmup_steps=cfg.optim.warmup_steps,
        max_steps=cfg.train.max_steps,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
