"""`StreamDataModule`: one segment of every lane of this rank per batch (engineering.md 2, models.md 7.1-7.2).

The dataset is map-style, indexed by step x total_lanes + lane, and builds a whole batch at once
(`__getitems__`); a rank-aware batch sampler gives rank r the lanes [r*B, (r+1)*B) step by step, so the
trainer must not wrap it (`Trainer(use_distributed_sampler=False)`). Every rank computes the same global
schedule and takes the same number of steps.

Training reads an endless stream (epoch after epoch, each a fresh shuffle) and has no length: the trainer
stops at `max_steps`, and the cursor (`state_dict`) is the number of training batches consumed, so a resumed
run reads exactly the batch the uninterrupted run would have read next. Validation and test read every
document to its end, lanes padded with fully masked steps.

Batch (a dict of tensors, B = lanes of this rank, N = segment length):
  tokens, labels int64 [B, N]; loss_mask bool [B, N]; target_bytes, doc_pos int64 [B, N] (0 where masked);
  doc_start bool [B]; lane, doc_id int64 [B] (doc_id -1 on padding steps); for probe corpora also
  answer_mask bool [B, N] (labels that are answer tokens).
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

from lrexp.config import RunConfig
from lrexp.data_modules.lanes import Schedule, TrainStream, eval_schedule, num_segments
from lrexp.data_modules.store import Prepared, SplitData, check_stream, prepare


class SegmentDataset(Dataset):
    """Index step x total_lanes + lane -> the segment that lane reads at that step."""

    def __init__(
        self,
        split: SplitData,
        locator: Union[TrainStream, Schedule],
        total_lanes: int,
        segment_len: int,
        eos_id: int,
        token_bytes: np.ndarray,
        cross_segment_target: bool,
    ) -> None:
        self.split = split
        self.locator = locator
        self.total_lanes = total_lanes
        self.segment_len = segment_len
        self.eos_id = eos_id
        self.token_bytes = token_bytes  # [V]
        self.cross_segment_target = cross_segment_target

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        """A batch of one lane (the DataLoader calls `__getitems__` with every lane of a step)."""
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        B, N = len(indices), self.segment_len
        tokens = np.full((B, N), self.eos_id, dtype=np.int64)  # [B, N] padding reads <eos>, masked
        labels = np.full((B, N), self.eos_id, dtype=np.int64)  # [B, N]
        loss_mask = np.zeros((B, N), dtype=bool)  # [B, N]
        doc_pos = np.zeros((B, N), dtype=np.int64)  # [B, N]
        doc_start = np.zeros(B, dtype=bool)  # [B]
        lane = np.zeros(B, dtype=np.int64)  # [B]
        doc_id = np.full(B, -1, dtype=np.int64)  # [B]
        flags = self.split.answer
        answer = np.zeros((B, N), dtype=bool) if flags is not None else None  # [B, N]
        stream, offsets = self.split.tokens, self.split.offsets
        for i, index in enumerate(indices):
            step, lane[i] = divmod(int(index), self.total_lanes)
            doc, seg = self.locator.locate(int(lane[i]), step)
            if doc < 0:
                continue  # a padding step of an evaluation lane
            start = int(offsets[doc]) + seg * N
            k = min(N + 1, int(offsets[doc + 1]) - start)  # tokens read: k - 1 targets, the rest is padding
            window = stream[start: start + k].astype(np.int64)  # [k]
            tokens[i, : k - 1] = window[:-1]
            labels[i, : k - 1] = window[1:]
            loss_mask[i, : k - 1] = True
            doc_pos[i, : k - 1] = np.arange(seg * N + 1, seg * N + k)
            doc_start[i] = seg == 0
            doc_id[i] = doc
            if answer is not None:
                answer[i, : k - 1] = flags[start + 1: start + k] != 0
        if not self.cross_segment_target:
            loss_mask[:, N - 1] = False  # models.md 7.2: the segment-boundary token is never a target
        batch = {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "doc_start": torch.from_numpy(doc_start),
            "target_bytes": torch.from_numpy(np.where(loss_mask, self.token_bytes[labels], 0)),
            "doc_pos": torch.from_numpy(np.where(loss_mask, doc_pos, 0)),
            "lane": torch.from_numpy(lane),
            "doc_id": torch.from_numpy(doc_id),
        }
        if answer is not None:
            batch["answer_mask"] = torch.from_numpy(answer & loss_mask)
        return batch


def whole_batch(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The dataset already returns a collated batch."""
    return batch


class LaneBatchSampler(Sampler[List[int]]):
    """Rank `rank`'s lanes [rank*B, (rank+1)*B) at each step, step-major.

    `steps=None` is the endless training stream: it continues from `position` (the cursor, advanced as
    batches are drawn), so a second iteration or a restored cursor picks up where it stands. A finite
    sampler (evaluation) reads steps 0 .. steps-1 on every iteration.
    """

    def __init__(self, total_lanes: int, lanes_per_rank: int, rank: int, steps: Optional[int], position: int = 0):
        self.total_lanes = total_lanes
        self.lanes = range(rank * lanes_per_rank, (rank + 1) * lanes_per_rank)
        self.steps = steps
        self.position = position

    def _batch(self, step: int) -> List[int]:
        return [step * self.total_lanes + lane for lane in self.lanes]

    def __iter__(self) -> Iterator[List[int]]:
        if self.steps is not None:
            for step in range(self.steps):
                yield self._batch(step)
            return
        while True:
            step = self.position
            self.position += 1
            yield self._batch(step)

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("the training stream is endless; the trainer stops at max_steps")
        return self.steps


class StreamDataModule(pl.LightningDataModule):
    """Train / validation / test streams of `cfg.data.corpus`; `state_dict()` is the training cursor.

    The world size and rank come from the trainer in `setup`; `world_size` / `rank` override them (tests,
    use without a trainer).
    """

    def __init__(self, cfg: RunConfig, world_size: Optional[int] = None, rank: Optional[int] = None) -> None:
        super().__init__()
        self.cfg = cfg
        self._topology_override = (world_size, rank)
        self.segment_len = cfg.derived.segment_len
        self.lanes_per_rank = cfg.derived.lanes_per_rank
        self.prepared: Optional[Prepared] = None
        self.world_size = self.rank = self.total_lanes = None
        self._cursor = 0  # training batches consumed before this stream was built (a restored checkpoint)
        self._train_sampler: Optional[LaneBatchSampler] = None

    # ---- Lightning hooks ----------------------------------------------------------------------------

    def prepare_data(self) -> None:
        prepare(self.cfg)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.prepared is None:
            self.prepared = prepare(self.cfg)
        world_size, rank = self._topology_override
        if world_size is None and self.trainer is not None:
            world_size, rank = self.trainer.world_size, self.trainer.global_rank
        self.world_size = 1 if world_size is None else int(world_size)
        self.rank = 0 if rank is None else int(rank)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")
        self.total_lanes = self.lanes_per_rank * self.world_size
        check_stream(self.prepared, self.segment_len, self.total_lanes)

    def train_dataloader(self) -> DataLoader:
        stream = TrainStream(self._segments("train"), self.total_lanes, self.cfg.data.seed)
        self._train_sampler = LaneBatchSampler(
            self.total_lanes, self.lanes_per_rank, self.rank, steps=None, position=self._cursor
        )
        return self._loader("train", stream, self._train_sampler)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def state_dict(self) -> Dict[str, object]:
        return {
            "train_batches": self.batches_consumed(),
            "total_lanes": self.total_lanes,
            "segment_len": self.segment_len,
            "data_key": self.prepared.key if self.prepared is not None else None,
        }

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self._cursor = int(state["train_batches"])
        if self._train_sampler is not None:
            self._train_sampler.position = self._cursor
        here = (self.total_lanes, self.segment_len, self.prepared.key if self.prepared is not None else None)
        there = (state.get("total_lanes"), state.get("segment_len"), state.get("data_key"))
        if here != there:
            rank_zero_warn(
                f"the data cursor was saved for (lanes, segment length, dataset) = {there}, this run has {here}: "
                f"training continues at batch {self._cursor} of a different stream, so the resume is not exact"
            )

    # ---- helpers ------------------------------------------------------------------------------------

    def batches_consumed(self) -> int:
        """Training batches consumed so far, the cursor.

        Under a trainer this is its count of processed batches (restored with the loops on resume), which
        is exact even with DataLoader workers prefetching ahead of the sampler; without a trainer it is the
        sampler's position, exact with `num_workers=0`.
        """
        if self.trainer is not None:
            return int(self.trainer.fit_loop.epoch_loop.batch_progress.total.processed)
        if self._train_sampler is not None:
            return self._train_sampler.position
        return self._cursor

    def eval_steps(self, split: str) -> int:
        """Steps of a full pass over `split` (every document to its end)."""
        return eval_schedule(self._segments(split), self.total_lanes, self.cfg.data.seed).steps

    def _segments(self, split: str) -> np.ndarray:
        return num_segments(self.prepared.split(split).doc_lengths(), self.segment_len)

    def _eval_loader(self, split: str) -> DataLoader:
        schedule = eval_schedule(self._segments(split), self.total_lanes, self.cfg.data.seed)
        sampler = LaneBatchSampler(self.total_lanes, self.lanes_per_rank, self.rank, steps=schedule.steps)
        return self._loader(split, schedule, sampler)

    def _loader(self, split: str, locator: Union[TrainStream, Schedule], sampler: LaneBatchSampler) -> DataLoader:
        dataset = SegmentDataset(
            self.prepared.split(split),
            locator,
            self.total_lanes,
            self.segment_len,
            self.prepared.eos_id,
            self.prepared.token_bytes,
            self.cfg.loss.cross_segment_target,
        )
        workers = self.cfg.data.num_workers
        return DataLoader(
            dataset, batch_sampler=sampler, collate_fn=whole_batch, num_workers=workers, persistent_workers=workers > 0
        )
