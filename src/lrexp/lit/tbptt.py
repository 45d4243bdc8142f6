"""Truncated BPTT over a stream of segments: the lifecycle of the carried state (docs/design.md#the-tbptt-lifecycle).

One batch is one segment of every lane of this rank, trained with automatic optimisation, so clipping,
accumulation, precision plugins and DDP keep working. This callback decides *when* things happen to the
carried `ModelState`; the model's forward stays pure (state in, state out) and the LightningModule only
asks for the state of its stage and hands back the new one:

- one store per stage: train, val and test never share a state, so a validation in the middle of an epoch
  (or the sanity check) leaves the training state untouched; val and test start fresh at each epoch;
- at batch start, lanes flagged `doc_start` get a fresh state (`state.reset_rows`);
- after every batch the state is detached, so the truncation length is one segment;
- with `train.lane_groups` G, an optimiser step is G micro-batches, each a group of the rank's lanes with
  a state of its own (optionally kept on the CPU while the other groups run: `train.offload_state`);
- under a curriculum (lrexp.curriculum) a training batch says its stage: at a new stage every lane restarts
  with a fresh state, of the stage's lanes and window, and the model trains at the stage's window;
  validation and test run at the model's own window (the last stage's);
- the training state goes into the checkpoint in lane order (the groups joined), gathered from every rank,
  so a resumed run with the same world size and lanes continues exactly; otherwise every lane restarts
  with a fresh state and a warning.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lrexp.train.curriculum import stages
from lrexp.model.state import ModelState

CHECKPOINT_KEY = "lrexp_carried_state"


class TBPTTCallback(pl.Callback):
    def __init__(self, lane_groups: int = 1, offload: bool = False) -> None:
        self._groups: List[Optional[ModelState]] = [None] * lane_groups  # training state per lane group
        self._group = 0  # the lane group of the current training micro-batch
        self._offload = offload
        self._states: Dict[str, Optional[ModelState]] = {"val": None, "test": None}
        self._restored: Optional[Dict[str, Tensor]] = None  # this rank's train state from a checkpoint
        self._stage = 0  # the curriculum stage the training state belongs to

    # ---- used by the LightningModule ----------------------------------------------------------------

    def state(self, stage: str) -> ModelState:
        """The carried state for this batch of `stage`, already reset for lanes that start a document."""
        state = self._current(stage)
        if state is None:
            raise RuntimeError(f"no {stage} state: TBPTTCallback must be in Trainer(callbacks=...)")
        return state

    def update(self, stage: str, state: ModelState) -> None:
        """The state after this batch; detached at batch end, once backward has used the graph."""
        if stage == "train":
            self._groups[self._group] = state
        else:
            self._states[stage] = state

    def _current(self, stage: str) -> Optional[ModelState]:
        return self._groups[self._group] if stage == "train" else self._states[stage]

    # ---- lifecycle ----------------------------------------------------------------------------------

    def _begin_batch(self, stage: str, pl_module: pl.LightningModule, batch: Dict[str, Tensor]) -> None:
        doc_start = batch["doc_start"]  # [B] bool, on the device already
        cfg = pl_module.cfg
        if stage == "train":
            per_group = doc_start.shape[0]  # lanes of a micro-batch: a curriculum stage's own
            self._group = int(batch["lane"][0]) % (per_group * len(self._groups)) // per_group
            if self._restored is not None:  # the rank's lanes in order: one state per group
                whole = ModelState.from_tensors({k: v.to(doc_start.device) for k, v in self._restored.items()})
                self._groups = list(whole.split(len(self._groups)))
                self._restored = None
            if "stage" in batch:
                if int(batch["stage"]) != self._stage:  # new lanes, a new window: every lane starts afresh
                    self._stage = int(batch["stage"])
                    self._groups = [None] * len(self._groups)
                pl_module.model.set_window(stages(cfg)[self._stage].window)
        elif cfg.curriculum.stages:
            pl_module.model.set_window(cfg.model.window)
        state = self._current(stage)
        if state is None:
            state = pl_module.model.initial_state(doc_start.shape[0], doc_start.device)
        if state.batch_size > doc_start.shape[0]:  # an evaluation batch shrinks as its lanes finish (a prefix)
            state = state.lanes(slice(0, doc_start.shape[0]))
        if stage == "train" and self._offload:
            state = state.to(doc_start.device)
        self.update(stage, state.reset_rows(doc_start))

    def _end_batch(self, stage: str) -> None:
        state = self._current(stage)
        if state is not None:
            state = state.detach()
            self.update(stage, state.to("cpu") if stage == "train" and self._offload else state)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._begin_batch("train", pl_module, batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._end_batch("train")

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._states["val"] = None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._begin_batch("val", pl_module, batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._end_batch("val")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._states["val"] = None  # frees the memory; the next validation reads its documents from the start

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._states["test"] = None

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._begin_batch("test", pl_module, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._end_batch("test")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._states["test"] = None

    # ---- checkpoints --------------------------------------------------------------------------------

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        # Runs on every rank (only rank 0's dict is written), so the gather below is a valid collective.
        # Checkpoints fall between optimiser steps, when every lane group has run.
        groups = self._groups
        state = type(groups[0]).cat(groups) if all(g is not None for g in groups) else None
        tensors = None
        if state is not None:
            tensors = {}
            for name, value in state.to_tensors().items():
                # on the module's device: NCCL gathers CUDA tensors only, and some entries live on the CPU
                gathered = trainer.strategy.all_gather(value.detach().to(pl_module.device))
                tensors[name] = (gathered if trainer.world_size > 1 else gathered.unsqueeze(0)).cpu()  # [W, ...]
        checkpoint[CHECKPOINT_KEY] = {
            "world_size": trainer.world_size,
            "lanes_per_rank": pl_module.cfg.derived.lanes_per_rank,
            "stage": self._stage,
            "tensors": tensors,
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        self._restored = None
        self._groups = [None] * len(self._groups)
        self._stage = saved.get("stage", 0) if saved is not None else 0
        if saved is None or saved["tensors"] is None:
            return
        here = (trainer.world_size, pl_module.cfg.derived.lanes_per_rank)
        there = (saved["world_size"], saved["lanes_per_rank"])
        if here != there:
            rank_zero_warn(
                f"the checkpoint's carried state is from {there[0]} rank(s) x {there[1]} lanes, this run has "
                f"{here[0]} x {here[1]}: every lane restarts with a fresh state, so the resumed run is not exact"
            )
            return
        self._restored = {name: value[trainer.global_rank] for name, value in saved["tensors"].items()}
