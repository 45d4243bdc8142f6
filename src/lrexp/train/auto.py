"""`train.precision: auto` and `model.attn.backend: auto` resolved once, at a run's start, by the device the
run trains on (docs/design.md#backends-and-precision). An explicit value always wins.

- precision: `bf16-mixed` on a CUDA device that supports bf16, `32-true` otherwise (the CPU, older GPUs);
- backend: `attention.backends.auto_backend`: `triton` on CUDA, `sdpa` on the CPU or with prefix-key slots.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from lrexp.attention.backends import AUTO, auto_backend
from lrexp.config.derive import slot_layers
from lrexp.config.schema import RunConfig

AUTO_PRECISION = "auto"
GPU_ACCELERATORS = ("auto", "gpu", "cuda")  # train.accelerator values that train on CUDA when it is there


def train_device(cfg: RunConfig) -> str:
    """"cuda" when the run's Trainer will put the model on a CUDA device, else "cpu"."""
    return "cuda" if cfg.train.accelerator in GPU_ACCELERATORS and torch.cuda.is_available() else "cpu"


def auto_precision(device_type: str) -> str:
    return "bf16-mixed" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "32-true"


def resolve_auto(cfg: RunConfig) -> RunConfig:
    """cfg with `auto` precision and backend replaced by what they stand for on the run's device."""
    device = train_device(cfg)
    t, m = cfg.train, cfg.model
    precision = auto_precision(device) if t.precision == AUTO_PRECISION else t.precision
    backend = m.attn.backend
    if backend == AUTO:
        prefix_keys = m.slots.read == "prefix_kv" and bool(slot_layers(m.slots, m.num_layers))
        backend = auto_backend(device, prefix_keys)
    return replace(cfg, train=replace(t, precision=precision), model=replace(m, attn=replace(m.attn, backend=backend)))
