"""Lane schedules: which segment of which document every lane reads at every step (docs/data.md#lanes).

A schedule is a pure function of (document lengths, order, total lanes, N): each document goes, in order,
to the lane with the fewest segments so far (ties: the lowest lane), and a lane reads its documents one
after the other, one segment per step. Segment s of a document reads doc[sN : sN+N+1] (N inputs, N shifted
targets), so a document of L tokens has ceil((L - 1) / N) segments. Training truncates every lane to the
shortest (every rank must take the same number of steps).

Staggered training lanes (`data.stagger_lanes`, docs/data.md#staggered-lanes): each lane enters the first
document of an epoch at a segment drawn from (seed, epoch, lane), its head left unread that epoch, so the
lanes' document boundaries spread over the steps instead of falling on the same steps when documents are of
equal length. A step then mixes early and late positions of different documents, and the optimiser no longer
sees every lane start a fresh cast of names at once.

Evaluation scores the same targets whatever N and the lane count (docs/models.md#evaluation): the documents of a pass
and how much of each is read (`eval_lengths`) depend on the split and a token budget alone, in one fixed
order. Its lanes are sorted longest first, so the lanes still reading at any step are a prefix: the batch
shrinks as lanes finish instead of carrying padding to the end of the longest document.
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

DUMMY = (-1, -1)  # (document, segment) of a padding step


def num_segments(doc_lengths: np.ndarray, segment_len: int) -> np.ndarray:
    """[D] segments per document; a document of one token has no target and no segment."""
    targets = np.maximum(np.asarray(doc_lengths, dtype=np.int64) - 1, 0)  # [D]
    return -(-targets // segment_len)  # [D] ceil


def shuffled(num_docs: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_docs)


@dataclass(frozen=True)
class Schedule:
    lane_docs: Tuple[np.ndarray, ...]  # per lane: document indices in reading order
    lane_starts: Tuple[np.ndarray, ...]  # per lane: first step of each document, then the lane's length
    steps: int

    def locate(self, lane: int, step: int) -> Tuple[int, int]:
        """(document, segment) read by `lane` at `step`, or DUMMY past the lane's last document."""
        starts = self.lane_starts[lane]
        i = int(np.searchsorted(starts, step, side="right")) - 1
        if i >= len(self.lane_docs[lane]):
            return DUMMY
        return int(self.lane_docs[lane][i]), int(step - starts[i])

    def entering(self, lane: int, step: int) -> bool:
        """Whether `lane` reads its first segment of a document at `step` (a staggered lane's first document
        starts before step 0: it is entered at step 0, past its head); the state is fresh there."""
        starts = self.lane_starts[lane]
        i = int(np.searchsorted(starts, step, side="right")) - 1
        return i < len(self.lane_docs[lane]) and step == max(int(starts[i]), 0)


def build(segments: np.ndarray, order: np.ndarray, total_lanes: int, truncate: bool,
          stagger: Optional[np.random.Generator] = None) -> Schedule:
    """Greedy assignment of the documents in `order` to the currently shortest lane. With `stagger`, a
    lane's first document is entered at a segment drawn from it, uniform over the document's segments:
    its start lies that many steps before step 0."""
    heap = [(0, lane) for lane in range(total_lanes)]
    docs: List[List[int]] = [[] for _ in range(total_lanes)]
    heads = np.zeros(total_lanes, dtype=np.int64)  # [lanes] segments of the first document left unread
    for d in order:
        if segments[d] == 0:
            continue
        length, lane = heapq.heappop(heap)
        if stagger is not None and not docs[lane]:
            heads[lane] = int(stagger.integers(int(segments[d])))
            length -= int(heads[lane])
        docs[lane].append(int(d))
        heapq.heappush(heap, (length + int(segments[d]), lane))
    starts = tuple(np.concatenate([[0], np.cumsum(segments[np.asarray(ds, dtype=np.int64)])]).astype(np.int64) - head
                   for ds, head in zip(docs, heads))
    lengths = [int(s[-1]) for s in starts]
    return Schedule(
        lane_docs=tuple(np.asarray(ds, dtype=np.int64) for ds in docs),
        lane_starts=starts,
        steps=min(lengths) if truncate else max(lengths),
    )


EVAL_ORDER_SEED = 0  # the evaluation's document order: fixed, so every run of every row reads the same prefix


def eval_order(num_docs: int) -> np.ndarray:
    return shuffled(num_docs, EVAL_ORDER_SEED, 0)


def eval_lengths(doc_lengths: np.ndarray, budget: Optional[int]) -> np.ndarray:
    """[D] tokens of each document an evaluation pass reads: every document whole (budget None), or the
    documents in the fixed evaluation order until `budget` targets are read, the last one cut where the
    budget ends (causal models predict a prefix exactly as they predict it inside the whole document)."""
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    if budget is None:
        return lengths.copy()
    out = np.zeros_like(lengths)
    left = int(budget)
    for d in eval_order(len(lengths)):
        if left <= 0:
            break
        targets = min(max(int(lengths[d]) - 1, 0), left)
        out[d] = targets + 1 if targets else 0
        left -= targets
    return out


def eval_schedule(segments: np.ndarray, total_lanes: int) -> Schedule:
    """Validation / test: every document of the pass to its end, lanes sorted longest first."""
    schedule = build(segments, eval_order(len(segments)), total_lanes, truncate=False)
    order = sorted(range(total_lanes), key=lambda lane: -int(schedule.lane_starts[lane][-1]))
    return Schedule(
        lane_docs=tuple(schedule.lane_docs[lane] for lane in order),
        lane_starts=tuple(schedule.lane_starts[lane] for lane in order),
        steps=schedule.steps,
    )


def lane_lengths(schedule: Schedule) -> np.ndarray:
    """[lanes] steps each lane reads."""
    return np.array([int(starts[-1]) for starts in schedule.lane_starts], dtype=np.int64)


class TrainStream:
    """The endless training stream: epoch e (documents shuffled with (seed, first_epoch + e), lanes truncated
    to the shortest) follows epoch e - 1, so the (document, segment) at a global step is a pure function of it.
    A curriculum stage reads a stream of its own, from its own `first_epoch` (lrexp.curriculum)."""

    def __init__(self, segments: np.ndarray, total_lanes: int, seed: int, first_epoch: int = 0,
                 stagger: bool = False) -> None:
        self.segments = segments
        self.total_lanes = total_lanes
        self.seed = seed
        self.first_epoch = first_epoch
        self.stagger = stagger
        self._ends: List[int] = []  # cumulative steps at the end of each epoch computed so far
        self._recent: Dict[int, Schedule] = {}  # the last two epochs' schedules (a plain dict pickles)

    def schedule(self, epoch: int) -> Schedule:
        if epoch not in self._recent:
            order = shuffled(len(self.segments), self.seed, self.first_epoch + epoch)
            # a generator of its own (the extra word): the shuffle is the same with and without staggering
            heads = np.random.default_rng([self.seed, self.first_epoch + epoch, 1]) if self.stagger else None
            self._recent = {e: s for e, s in self._recent.items() if e == epoch - 1}
            self._recent[epoch] = build(self.segments, order, self.total_lanes, truncate=True, stagger=heads)
        return self._recent[epoch]

    def epoch_of(self, step: int) -> Tuple[int, int]:
        """(epoch, step within the epoch) of a global step."""
        while not self._ends or self._ends[-1] <= step:
            self._ends.append((self._ends[-1] if self._ends else 0) + self.schedule(len(self._ends)).steps)
        epoch = bisect.bisect_right(self._ends, step)
        return epoch, step - (self._ends[epoch - 1] if epoch else 0)

    def locate(self, lane: int, step: int) -> Tuple[int, int]:
        epoch, t = self.epoch_of(step)
        return self.schedule(epoch).locate(lane, t)

    def entering(self, lane: int, step: int) -> bool:
        epoch, t = self.epoch_of(step)
        return self.schedule(epoch).entering(lane, t)
