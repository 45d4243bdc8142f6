"""`StreamDataModule`: one segment of every lane of this rank per batch (docs/data.md#lanes, docs/models.md#lanes-and-tokens-per-step).

The dataset is map-style, indexed by step x total_lanes + lane, and builds a whole batch at once
(`__getitems__`); a rank-aware batch sampler gives rank r the lanes [r*B, (r+1)*B) step by step, so the
trainer must not wrap it (`Trainer(use_distributed_sampler=False)`). Every rank computes the same global
schedule and takes the same number of steps. With `train.lane_groups` G, a step is G micro-batches, lane
groups [r*B + g*B/G, r*B + (g+1)*B/G), all at the same stream step.

Training reads an endless stream (epoch after epoch, each a fresh shuffle) and has no length: the trainer
stops at `max_steps`, and the cursor (`state_dict`) is the number of training batches consumed, so a resumed
run reads exactly the batch the uninterrupted run would have read next. Under a curriculum (lrexp.curriculum)
each stage has a stream, lanes and segment length of its own; one DataLoader serves them all, its batch
sampler switching stage at the stage's first step, and each batch says its stage (`stage`).

Evaluation scores one fixed set of (document, position) targets per pass, whatever N and the lanes
(docs/models.md#evaluation), and always scores the segment-boundary target (its input token is in the segment, so the
model can predict it; `loss.cross_segment_target` is a training choice). The validations during `fit` read
the first `train.val_tokens` targets of the fixed document order; `trainer.validate` and `trainer.test`
(the run's final numbers) read the whole split. A segment-invariant row (its logits do not depend on where
the stream is cut) reads segments of `derived.eval_segment_len` (8 x the scale's window) in
`derived.eval_lanes_per_rank` lanes: XL's pass then takes as few sequential steps as Slide's. An
evaluation batch holds only the lanes still reading:
lanes are sorted longest first, so they form a prefix of this rank's lanes and the batch shrinks at their
end (`TBPTTCallback` narrows the state to match).

Batch (a dict of tensors, B = lanes of this rank, N = segment length):
  tokens, labels int64 [B, N]; loss_mask bool [B, N]; target_bytes, doc_pos int64 [B, N] (0 where masked);
  doc_start bool [B] (the lane enters a document: a fresh state); lane, doc_id int64 [B] (doc_id -1 on
  padding steps); step_targets int64 [] (the targets
  of every lane of every rank at this step: the denominator of an exact token mean over micro-batches and
  ranks); for probe corpora also answer_mask bool [B, N] (labels that are answer tokens); for mention corpora
  also mention_dist int64 [B, N] (labels on a name: -1 a first mention, else the distance back to the
  previous one; 0 elsewhere and where masked); under a curriculum
  also stage int64 [] (its index).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

from lrexp.config.schema import RunConfig
from lrexp.train.curriculum import Stage, stage_at, stages
from lrexp.data_modules.lanes import Schedule, TrainStream, eval_lengths, eval_schedule, lane_lengths, num_segments
from lrexp.data_modules.prepared import Prepared, SplitData
from lrexp.data_modules.store import check_stream, prepare


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
        doc_ends: Optional[np.ndarray] = None,
    ) -> None:
        """`doc_ends` [D]: where each document's reading stops in the token stream (an evaluation pass
        may cut a document); default: the document's end."""
        self.split = split
        self.locator = locator
        self.total_lanes = total_lanes
        self.segment_len = segment_len
        self.eos_id = eos_id
        self.token_bytes = token_bytes  # [V]
        self.cross_segment_target = cross_segment_target
        self.doc_ends = split.offsets[1:] if doc_ends is None else doc_ends  # [D]
        self._step_targets = (-1, 0)  # (step, its targets): the lane groups of a step ask in turn

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
        distances = self.split.mention
        mention = np.zeros((B, N), dtype=np.int64) if distances is not None else None  # [B, N]
        stream = self.split.tokens
        for i, index in enumerate(indices):
            step, lane[i] = divmod(int(index), self.total_lanes)
            read = self._read(int(lane[i]), step)
            if read is None:
                continue  # a padding step of an evaluation lane
            doc, seg, start, k = read  # k tokens read: k - 1 targets, the rest is padding
            window = stream[start: start + k].astype(np.int64)  # [k]
            tokens[i, : k - 1] = window[:-1]
            labels[i, : k - 1] = window[1:]
            loss_mask[i, : k - 1] = True
            doc_pos[i, : k - 1] = np.arange(seg * N + 1, seg * N + k)
            doc_start[i] = self.locator.entering(int(lane[i]), step)  # a staggered lane enters past seg 0
            doc_id[i] = doc
            if answer is not None:
                answer[i, : k - 1] = flags[start + 1: start + k] != 0
            if mention is not None:
                mention[i, : k - 1] = distances[start + 1: start + k]
        if not self.cross_segment_target:
            loss_mask[:, N - 1] = False  # docs/models.md#inputs-targets-and-the-loss-mask: the segment-boundary token is never a target
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
        if mention is not None:
            batch["mention_dist"] = torch.from_numpy(np.where(loss_mask, mention, 0))
        batch["step_targets"] = torch.tensor(self.step_targets(step))
        return batch

    def _read(self, lane: int, step: int) -> Optional[tuple]:
        """(document, segment, first token, tokens read) of `lane` at `step`, None on a padding step."""
        doc, seg = self.locator.locate(lane, step)
        if doc < 0:
            return None
        start = int(self.split.offsets[doc]) + seg * self.segment_len
        return doc, seg, start, min(self.segment_len + 1, int(self.doc_ends[doc]) - start)

    def step_targets(self, step: int) -> int:
        """Targets of every lane at `step`, computed from the schedule alone (no tokens read)."""
        if self._step_targets[0] != step:
            total = 0
            for lane in range(self.total_lanes):
                read = self._read(lane, step)
                if read is not None:
                    targets = read[3] - 1
                    total += targets - (targets == self.segment_len and not self.cross_segment_target)
            self._step_targets = (step, total)
        return self._step_targets[1]


def whole_batch(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The dataset already returns a collated batch."""
    return batch


class LaneBatchSampler(Sampler[List[int]]):
    """The endless training stream: rank `rank`'s lanes [rank*B, (rank+1)*B) at each step, step-major, in
    `groups` micro-batches of B / groups lanes each.

    It continues from `position` (the cursor in micro-batches, advanced as batches are drawn), so a second
    iteration or a restored cursor picks up where it stands.
    """

    def __init__(self, total_lanes: int, lanes_per_rank: int, rank: int, groups: int = 1, position: int = 0):
        self.total_lanes = total_lanes
        self.first = rank * lanes_per_rank
        self.per_group = lanes_per_rank // groups
        self.groups = groups
        self.position = position

    def __iter__(self) -> Iterator[List[int]]:
        while True:
            self.position += 1
            yield self.batch(self.position - 1)

    def batch(self, position: int) -> List[int]:
        """The indices of micro-batch `position` (a step's lane groups in turn)."""
        step, group = divmod(position, self.groups)
        first = self.first + group * self.per_group
        return [step * self.total_lanes + lane for lane in range(first, first + self.per_group)]


class StagedDataset(Dataset):
    """A curriculum's training stream: index (stage, index in that stage's `SegmentDataset`) -> its segment."""

    def __init__(self, stages: Sequence[SegmentDataset]) -> None:
        self.stages = stages

    def __getitem__(self, index: tuple) -> Dict[str, torch.Tensor]:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[tuple]) -> Dict[str, torch.Tensor]:
        stage = indices[0][0]  # a batch never mixes stages
        batch = self.stages[stage].__getitems__([index for _, index in indices])
        batch["stage"] = torch.tensor(stage)
        return batch


class StagedBatchSampler(Sampler[List[tuple]]):
    """A curriculum's endless stream: micro-batch `position` is the one of its step's stage, counted from the
    stage's start (`samplers[i]`: stage i's lanes of this rank). It continues from `position` like
    `LaneBatchSampler`, so a restored cursor resumes inside any stage."""

    def __init__(self, schedule: Sequence[Stage], samplers: Sequence[LaneBatchSampler], groups: int, position: int):
        self.schedule = list(schedule)
        self.samplers = samplers
        self.groups = groups
        self.position = position

    def __iter__(self) -> Iterator[List[tuple]]:
        while True:
            stage = stage_at(self.schedule, self.position // self.groups)
            local = self.position - self.schedule[stage].start_step * self.groups
            self.position += 1
            yield [(stage, index) for index in self.samplers[stage].batch(local)]


class EvalBatchSampler(Sampler[List[int]]):
    """One evaluation pass: at each step, the lanes of this rank that are still reading.

    The schedule's lanes are sorted longest first and dealt to ranks in turn (lane i to rank i mod world),
    so every rank's lanes are sorted too and the ones still reading are a prefix. A rank with nothing to
    read takes one fully masked step, so every rank runs the evaluation's collectives.
    """

    def __init__(self, schedule: Schedule, world_size: int, rank: int):
        self.total_lanes = len(schedule.lane_starts)
        self.lanes = list(range(rank, self.total_lanes, world_size))
        self.lengths = lane_lengths(schedule)[self.lanes]  # [lanes of this rank], non-increasing

    def __iter__(self) -> Iterator[List[int]]:
        for step in range(len(self)):
            reading = max(1, int((self.lengths > step).sum()))
            yield [step * self.total_lanes + lane for lane in self.lanes[:reading]]

    def __len__(self) -> int:
        return max(1, int(self.lengths[0]) if len(self.lengths) else 0)


@dataclass(frozen=True)
class EvalPass:
    """What one evaluation pass scores: `lengths` [D] tokens read per document of the split (0: not read),
    `targets` scored in all, and `docs_hash`, a digest of (document id, tokens read) over the documents read,
    so runs can show they scored the same targets."""

    split: str
    lengths: np.ndarray
    targets: int
    docs_hash: str


def eval_pass(prepared: Prepared, split: str, budget: Optional[int]) -> EvalPass:
    """The targets of an evaluation of `split`: the whole split (budget None) or its first `budget`."""
    data = prepared.split(split)
    lengths = eval_lengths(data.doc_lengths(), budget)  # [D]
    ids = data.doc_ids()
    read = sorted(np.flatnonzero(lengths), key=ids.__getitem__)
    digest = hashlib.sha256("\n".join(f"{ids[d]}\t{lengths[d]}" for d in read).encode()).hexdigest()
    return EvalPass(split, lengths, int(np.maximum(lengths - 1, 0).sum()), digest[:16])


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
        self._train_sampler: Optional[Union[LaneBatchSampler, StagedBatchSampler]] = None

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
        schedule, seed, groups = stages(self.cfg), self.cfg.derived.data_seed, self.cfg.train.lane_groups
        if not schedule:
            stream = TrainStream(self._segments("train", self.segment_len), self.total_lanes, seed,
                                 stagger=self.cfg.data.stagger_lanes)
            self._train_sampler = LaneBatchSampler(self.total_lanes, self.lanes_per_rank, self.rank, groups,
                                                   self._cursor)
            return self._loader(self._dataset("train", stream, self.total_lanes, self.segment_len), self._train_sampler)
        datasets, samplers = [], []
        for stage in schedule:
            stream = TrainStream(self._segments("train", stage.segment_len), stage.lanes, seed, stage.first_epoch,
                                 stagger=self.cfg.data.stagger_lanes)
            datasets.append(self._dataset("train", stream, stage.lanes, stage.segment_len))
            samplers.append(LaneBatchSampler(stage.lanes, stage.lanes // self.world_size, self.rank, groups))
        self._train_sampler = StagedBatchSampler(schedule, samplers, groups, self._cursor)
        return self._loader(StagedDataset(datasets), self._train_sampler)

    def val_dataloader(self) -> DataLoader:
        """The validations inside `fit` read `train.val_tokens` targets; `trainer.validate` the whole split."""
        fitting = self.trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        return self.eval_loader("validation", self.cfg.train.val_tokens if fitting else None)

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader("test", None)

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

    def eval_pass(self, split: str, budget: Optional[int]) -> EvalPass:
        return eval_pass(self.prepared, split, budget)

    def eval_loader(self, split: str, budget: Optional[int]) -> DataLoader:
        """One evaluation pass over `split` (see `eval_pass`), boundary targets scored."""
        data = self.prepared.split(split)
        lengths = self.eval_pass(split, budget).lengths
        n, lanes = self.cfg.derived.eval_segment_len, self.cfg.derived.eval_lanes_per_rank * self.world_size
        schedule = eval_schedule(num_segments(lengths, n), lanes)
        sampler = EvalBatchSampler(schedule, self.world_size, self.rank)
        return self._loader(self._dataset(split, schedule, lanes, n, data.offsets[:-1] + lengths), sampler)

    def _segments(self, split: str, segment_len: int) -> np.ndarray:
        return num_segments(self.prepared.split(split).doc_lengths(), segment_len)

    def _dataset(
        self, split: str, locator: Union[TrainStream, Schedule], total_lanes: int, segment_len: int,
        doc_ends: Optional[np.ndarray] = None,
    ) -> SegmentDataset:
        evaluating = doc_ends is not None
        return SegmentDataset(
            self.prepared.split(split),
            locator,
            total_lanes,
            segment_len,
            self.prepared.eos_id,
            self.prepared.token_bytes,
            cross_segment_target=evaluating or self.cfg.loss.cross_segment_target,
            doc_ends=doc_ends,
        )

    def _loader(self, dataset: Dataset, sampler: Sampler) -> DataLoader:
        workers = self.cfg.data.num_workers
        return DataLoader(
            dataset, batch_sampler=sampler, collate_fn=whole_batch, num_workers=workers, persistent_workers=workers > 0
        )
