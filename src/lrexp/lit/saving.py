"""When `last.ckpt` is written, and how training stops on SIGTERM / SIGINT (a scheduler's preemption, Ctrl-C).

`last.ckpt` is written every `train.checkpoint_every` optimiser steps (default: `train.val_every`), also once
`train.checkpoint_minutes` have passed since the last one, and when training ends (the state `--resume` with
more steps starts from). Never inside an optimiser step: with `train.lane_groups` > 1 a step spans several
micro-batches, and a checkpoint between them would lose the gradients accumulated so far.

A signal during training is kept; at the end of the current optimiser step the checkpoint is written and
training stops by raising `Interrupted` (as the next batch starts, or after fit when that was the last
step), so that `lrexp train --resume RUN_ID` continues exactly where it stopped. A signal outside training
(data preparation, the final passes) stops at once (`train.run`). While training, our handler replaces
Lightning's SIGTERM handler, which would stop at the end of any micro-batch; Lightning puts the handlers
it found back when fit ends.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from lrexp.errors import Interrupted
from lrexp.runtime.signals import StopSignals, name


class LastCheckpoint(ModelCheckpoint):
    def __init__(self, dirpath: Path, every_steps: int, minutes: Optional[float], signals: StopSignals) -> None:
        super().__init__(
            dirpath=dirpath,  # explicit: with MLflow under DDP only rank 0 knows the run (Lightning#19932)
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_steps,
            enable_version_counter=False,  # a resumed run overwrites its own last.ckpt
        )
        self.minutes = minutes
        self.signals = signals
        self.training = False
        self._step = -1  # the optimiser step of the last batch end seen
        self._saved_at = 0.0
        self._stop: Optional[int] = None  # the signal to stop for at the next batch

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.signals.install()
        self.training = True
        self._step = trainer.global_step
        self._saved_at = time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # every_steps
        if trainer.global_step == self._step:  # inside an optimiser step (lane groups)
            return
        self._step = trainer.global_step
        if self._last_global_step_saved == trainer.global_step:
            self._saved_at = time.monotonic()
        # every rank decides alike: a checkpoint gathers the carried state from all of them
        due = trainer.strategy.reduce_boolean_decision(
            self.minutes is not None and time.monotonic() - self._saved_at >= 60 * self.minutes, all=False)
        stop = trainer.strategy.reduce_boolean_decision(self.signals.received is not None, all=False)
        if (due or stop) and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._saved_at = time.monotonic()
        if stop:
            self._stop = self.signals.received or signal.SIGTERM  # or another rank's signal

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Stopping here, not right after the save, lets Lightning log the step's metrics (and run its
        # validation, if one is due) first, as an uninterrupted run does.
        if self._stop is not None:
            raise Interrupted(self._stop, f"stopped by {name(self._stop)} at step {trainer.global_step}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.training = False
        # ModelCheckpoint alone saves at the end only when max_steps is a multiple of the interval
        if not self._should_skip_saving_checkpoint(trainer):  # skips when this step is already saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
