"""Dropout randomness as a pure function of the position in training.

Lightning does not checkpoint the RNGs, and the global torch RNG is also drawn by things that differ
between an uninterrupted and a resumed run (every new DataLoader iterator draws a base seed: the sanity
check, each validation, the first epoch after a resume). Re-seeding at every training batch from
(seed, rank, optimiser step, micro-batch) makes the dropout masks independent of all that, so a resumed
run draws exactly the masks of the uninterrupted one, as the data cursor is a pure function of the step.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch


def step_seed(seed: int, rank: int, step: int, micro_batch: int) -> int:
    mixed = np.random.SeedSequence([seed, rank, step, micro_batch]).generate_state(1, dtype=np.uint64)[0]
    return int(mixed) & 0x7FFF_FFFF_FFFF_FFFF  # torch.manual_seed takes a non-negative int64


class StepSeedCallback(pl.Callback):
    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        micro_batch = batch_idx % trainer.accumulate_grad_batches
        torch.manual_seed(step_seed(self.seed, trainer.global_rank, trainer.global_step, micro_batch))
