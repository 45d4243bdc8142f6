"""`log.progress_file`: the run's progress as a small JSON file, for a process watching it (`lrexp grid`
shows a cell's progress live from it; MLflow has it only at `log.every_n_steps` and through a store query).

Rewritten at most every `every_s` seconds and when training ends, by rank 0, atomically (a rename), so a
reader never sees half a file: {"step", "max_steps", "start_step" (where this process began: a resumed run's
checkpoint), "seconds" (since then), "loss" (the latest logged train/loss, or null), "tokens_per_s"}.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


class ProgressFile(pl.Callback):
    def __init__(self, path: Path, tokens_per_step: int, every_s: float = 2.0) -> None:
        self.path = Path(path)
        self.tokens_per_step = tokens_per_step
        self.every_s = every_s
        self._t0 = 0.0
        self._start_step = 0
        self._written = float("-inf")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.monotonic()
        self._start_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if time.monotonic() - self._written >= self.every_s:
            self._write(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer)

    def _write(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        now = time.monotonic()
        self._written = now
        seconds = now - self._t0
        tokens = (trainer.global_step - self._start_step) * self.tokens_per_step
        loss = trainer.callback_metrics.get("train/loss")
        data = {
            "step": trainer.global_step,
            "max_steps": trainer.max_steps,
            "start_step": self._start_step,
            "seconds": round(seconds, 3),
            "loss": None if loss is None else float(loss),
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        part = self.path.with_name(self.path.name + ".part")
        part.write_text(json.dumps(data))
        os.replace(part, self.path)
