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

Every save is atomic on the checkpoint's own filesystem (`AtomicCheckpointIO`): the checkpoint is written to
a temporary file in its folder, flushed to disk and renamed over `last.ckpt`, and only then do the earlier
saves move down (`last.ckpt` -> `last-1.ckpt`, ..., `train.keep_checkpoints` files in all). A save that fails
(a full disk, a kill) leaves every earlier checkpoint whole and fails in one line naming the folder
(docs/grids.md#faults-and-what-survives-them).

A checkpoint is taken at the end of its optimiser step, as Lightning takes it, but written to disk only once
that step's metrics (and a validation due at it) are in the store, as the next batch starts or training
ends: a kill between the two would otherwise leave a checkpoint whose step's metrics are lost for good (a
resume starts after it). The write happens on rank 0, the only one that holds the serialised checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from lrexp.errors import Interrupted, storage_error
from lrexp.lit.checkpoint import earlier
from lrexp.runtime.signals import StopSignals, name


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer (rank 0 only), made atomic and keeping `keep` checkpoints (see above)."""

    def __init__(self, keep: int, deferred: Optional[Path] = None) -> None:
        self.keep = keep
        # checkpoints in this folder are written by `write`, later (see above); any other save (the spawn
        # launcher's hand-back of the trained weights to the main process, read right after) at once
        self.deferred = deferred
        self._pending: Optional[Tuple[io.BytesIO, Path]] = None

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # now: the tensors it refers to change with the next step
        if self.deferred is not None and Path(path).parent == self.deferred:
            self._pending = (buffer, Path(path))
        else:
            self._write(buffer, Path(path))

    def write(self) -> None:
        """Write the checkpoint taken last, if not written yet."""
        if self._pending is not None:
            (buffer, path), self._pending = self._pending, None
            self._write(buffer, path)

    def _write(self, buffer: io.BytesIO, path: Path) -> None:
        part = path.with_name(f".{path.name}.{os.getpid()}.part")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(part, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            self._move_down(path)
            os.replace(part, path)
            _sync_folder(path.parent)
        except OSError as exc:
            part.unlink(missing_ok=True)
            raise storage_error("a checkpoint to ", path.parent, exc, "train.checkpoint_dir") from None

    def _move_down(self, path: Path) -> None:
        """last-(k-2) -> last-(k-1), ..., last.ckpt -> last-1.ckpt: the oldest kept one goes."""
        names = [path, *(path.with_name(earlier(i)) for i in range(1, self.keep))]
        for newer, older in reversed(list(zip(names, names[1:]))):
            if newer.is_file():
                os.replace(newer, older)


def _sync_folder(folder: Path) -> None:
    """Make the renames in `folder` durable (a rename lives in the folder's entry, not in the file)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LastCheckpoint(ModelCheckpoint):
    def __init__(self, dirpath: Path, every_steps: int, minutes: Optional[float], signals: StopSignals,
                 keep: int) -> None:
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
        self.io = AtomicCheckpointIO(keep, deferred=Path(dirpath))  # the Trainer's checkpoint writer (train/run.py)

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
        # Here, not right after the save, Lightning has logged the step's metrics (and run its validation, if
        # one was due), as an uninterrupted run does: now its checkpoint is written, and training may stop.
        self.io.write()
        if self._stop is not None:
            raise Interrupted(self._stop, f"stopped by {name(self._stop)} at step {trainer.global_step}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.training = False
        # ModelCheckpoint alone saves at the end only when max_steps is a multiple of the interval
        if not self._should_skip_saving_checkpoint(trainer):  # skips when this step is already saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self.io.write()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # a checkpoint taken before the error is whole: keep it; the run ends with the original error
        with contextlib.suppress(Exception):
            self.io.write()
