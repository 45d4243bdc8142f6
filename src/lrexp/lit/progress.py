"""A run's progress for whoever watches it: `ProgressFile` for a process, `ProgressLines` for a log.

`log.progress_file`: the run's progress as a small JSON file, for a process watching it (`lrexp grid`
shows a cell's progress live from it; MLflow has it only at `log.every_n_steps` and through a store query).

Rewritten at most every `every_s` seconds and when training ends, by rank 0, atomically (a rename), so a
reader never sees half a file: {"step", "max_steps", "start_step" (where this process began: a resumed run's
checkpoint), "seconds" (since then), "loss" (the latest logged train/loss, or null), "tokens_per_s"}.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn

from lrexp.grid.live import duration


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


def use_bar(progress_bar: bool, out: TextIO = sys.stdout) -> bool:
    """Lightning's progress bar only on a terminal: in a file (SLURM, nohup) its redraws are a line per batch."""
    return progress_bar and hasattr(out, "isatty") and out.isatty()


class ProgressLines(pl.Callback):
    """In place of the bar where there is no terminal (docs/configuration.md#logs): one line at most every
    `every_s` seconds while training, validating or testing, and one when each evaluation ends with its bits,
    so a run of days writes a few thousand lines. Rank 0 only; the sanity check is silent."""

    def __init__(self, every_s: float, tokens_per_step: int, out: Optional[TextIO] = None) -> None:
        self.every_s = every_s
        self.tokens_per_step = tokens_per_step
        self.out = out
        self._t0 = self._stage_t0 = 0.0
        self._start_step = 0
        self._last = float("-inf")

    def _print(self, trainer: pl.Trainer, text: str) -> None:
        if trainer.is_global_zero:
            print(text, file=self.out or sys.stdout, flush=True)  # sys.stdout at call time: pytest swaps it

    def _due(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return False
        self._last = now
        return True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = self._last = time.monotonic()
        self._start_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._due():
            return
        step, total = trainer.global_step, trainer.max_steps
        seconds = time.monotonic() - self._t0
        done = step - self._start_step
        loss = trainer.callback_metrics.get("train/loss")
        parts = [f"step {step}/{total}", f"elapsed {duration(seconds)}"]
        if loss is not None:
            parts.append(f"train/loss {float(loss):.4f}")
        if done > 0 and seconds > 0:
            parts.append(f"{done * self.tokens_per_step / seconds:,.0f} tokens/s")
            parts.append(f"left {duration((total - step) * seconds / done)}")
        self._print(trainer, "train: " + ", ".join(parts))

    def _stage_start(self, trainer: pl.Trainer) -> None:
        self._stage_t0 = self._last = time.monotonic()

    def _stage_batch(self, trainer: pl.Trainer, stage: str, batch_idx: int, totals: Any) -> None:
        if trainer.sanity_checking or not self._due():
            return
        total = sum(totals) if totals else math.inf
        of = f"/{int(total)}" if math.isfinite(total) else ""
        self._print(trainer, f"{stage}: batch {batch_idx + 1}{of}, elapsed {duration(time.monotonic() - self._stage_t0)}")

    def _stage_end(self, trainer: pl.Trainer, stage: str, prefixes: tuple) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        scores = [f"{k} {float(metrics[k]):.4f}" for k in (p + "bits_per_token" for p in prefixes) if k in metrics]
        what = f"{stage} at step {trainer.global_step}" if trainer.state.fn == TrainerFn.FITTING else f"final {stage} pass"
        self._print(trainer, f"{what} done in {duration(time.monotonic() - self._stage_t0)}"
                    + (": " + ", ".join(scores) if scores else ""))
        self._last = time.monotonic()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stage_start(trainer)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._stage_batch(trainer, "validation", batch_idx, trainer.num_val_batches)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stage_end(trainer, "validation", ("val/", "final/val_"))

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stage_start(trainer)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._stage_batch(trainer, "test", batch_idx, trainer.num_test_batches)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stage_end(trainer, "test", ("test/", "final/test_"))
