"""Step time, throughput and peak memory, logged as `perf/*` (docs/models.md#step-time).

The step time is the median wall-clock time of the last `window` optimiser steps after `warmup_steps`
steps (compilation, allocator growth, caches; at most half of the steps this process runs), measured from batch start to batch end, so data loading
and validation are left out; with gradient accumulation a step is the sum of its micro-batches. CUDA is
synchronised at both ends so asynchronous kernels are counted in the step that launched them.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections import deque
from typing import Deque

import lightning.pytorch as pl
import torch


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the most memory tensors ever held on the device; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class PerfCallback(pl.Callback):
    def __init__(self, tokens_per_step: int, warmup_steps: int, window: int = 200) -> None:
        self.tokens_per_step = tokens_per_step  # over all ranks and micro-batches of one optimiser step
        self.warmup_steps = warmup_steps
        self.durations: Deque[float] = deque(maxlen=window)
        self._steps_seen = 0
        self._pending = 0.0  # time of the micro-batches of the current optimiser step
        self._last_step = 0
        self._t0 = 0.0

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step  # a resumed run starts counting here
        # a short run (a smoke test, the tail of a resumed run) still measures its second half
        self.warmup_steps = min(self.warmup_steps, (trainer.max_steps - trainer.global_step) // 2)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._pending += time.perf_counter() - self._t0
        if trainer.global_step == self._last_step:  # a micro-batch that did not step the optimiser
            return
        self._last_step = trainer.global_step
        self._steps_seen += 1
        if self._steps_seen > self.warmup_steps:
            self.durations.append(self._pending)
        self._pending = 0.0
        if not self.durations:
            return
        step_time = statistics.median(self.durations)
        pl_module.log_dict(
            {
                "perf/step_time_s": step_time,
                "perf/tokens_per_s": self.tokens_per_step / step_time,
                "perf/peak_mem_mb": peak_memory_mb(pl_module.device),
            },
            on_step=True,
            on_epoch=False,
        )
