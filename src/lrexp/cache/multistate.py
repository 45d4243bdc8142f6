"""The bounded multi-state of one attention layer: at most C real-token rows per lane and head, with their
original positions and fp32 scores, and the one eviction rule every policy shares (docs/cache-policies.md#tie-rule).

Slots hold a row or are empty (position -1, zero K/V, score 0). Kept rows are in temporal order, empty slots
first, so a lane that has read fewer rows (its document started later) simply has more empty slots: lanes
are never ragged. Positions count from the lane's last reset: the document start (XL, Slide), or the
segment start for a Full row, which attends within its segment alone.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
from torch import Tensor

EMPTY = -1  # the position of an empty slot


@dataclass(frozen=True)
class KVRows:
    k: Tensor  # [B, H, n, D] keys k-hat
    v: Tensor  # [B, H, n, D]
    pos: Tensor  # [B, H, n] int64, position since the lane's reset; EMPTY on an empty slot
    score: Tensor  # [B, H, n] fp32, the policy's score of each row

    @classmethod
    def empty(cls, batch_size: int, num_heads: int, slots: int, head_dim: int, device) -> "KVRows":
        zeros = torch.zeros(batch_size, num_heads, slots, head_dim, device=device)
        return cls(k=zeros, v=zeros.clone(),
                   pos=torch.full((batch_size, num_heads, slots), EMPTY, dtype=torch.int64, device=device),
                   score=torch.zeros(batch_size, num_heads, slots, device=device))

    @property
    def valid(self) -> Tensor:
        return self.pos != EMPTY  # [B, H, n]

    def reset_rows(self, lanes: Tensor) -> "KVRows":
        """Lanes flagged [B] lose every row and score: a document reset (sinks are re-chosen after it)."""
        m = lanes.to(self.k.device)[:, None, None]  # [B, 1, 1]
        return KVRows(k=self.k.masked_fill(m[..., None], 0.0), v=self.v.masked_fill(m[..., None], 0.0),
                      pos=self.pos.masked_fill(m, EMPTY), score=self.score.masked_fill(m, 0.0))

    def lanes(self, index: slice) -> "KVRows":
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def append(self, k: Tensor, v: Tensor, pos: Tensor) -> "KVRows":
        """The rows with b new ones behind them: k, v [B, H, b, D], pos [B, H, b]; their scores start at 0."""
        return KVRows(k=torch.cat([self.k, k], 2), v=torch.cat([self.v, v], 2), pos=torch.cat([self.pos, pos], 2),
                      score=torch.cat([self.score, self.score.new_zeros(pos.shape)], 2))

    def take_last(self, slots: int) -> "KVRows":
        """The last `slots` slots of every lane and head."""
        return replace(self, **{f.name: getattr(self, f.name)[:, :, -slots:] for f in fields(self)})

    def take(self, index: Tensor) -> "KVRows":
        """The slots index [B, H, m] of every lane and head (each head gathers its own)."""
        b, h, n, d = self.k.shape
        # one row copy per kept slot: gather along a flat [B*H*n] axis is much faster on a CPU than a gather
        # of an index expanded over D
        flat = (index + n * torch.arange(b * h, device=index.device).view(b, h, 1)).flatten()  # [B*H*m]
        m = index.shape[-1]
        return KVRows(k=self.k.reshape(b * h * n, d)[flat].view(b, h, m, d),
                      v=self.v.reshape(b * h * n, d)[flat].view(b, h, m, d),
                      pos=self.pos.gather(2, index), score=self.score.gather(2, index))


def evict(rows: KVRows, slots: int, protected: Tensor, caps: Optional[Tensor] = None) -> KVRows:
    """The `slots` slots every lane and head keeps, in temporal order (empty ones first), of which lane l
    fills at most caps[l] [B] (default: all) with rows.

    The tie rule (docs/cache-policies.md#tie-rule): empty slots go first, then the unprotected rows by (score ascending, position
    ascending), the lowest score first and on equal scores the oldest; protected rows [B, H, n] only when
    nothing else is left. Scores compare exactly in fp32. One sort on the composite key (class, score,
    position) packed into an int64, unique per row, gives that order without relying on `topk`, whose order
    among ties is implementation-defined: a non-negative fp32's bits read as an int32 order as the float does.
    """
    if bool((~(rows.score >= 0)).any()):  # NaN too
        raise ValueError("eviction scores must be non-negative numbers (attention probabilities and their sums)")
    valid = rows.valid  # [B, H, n]
    rank = torch.where(valid, 1 + protected.long(), torch.zeros_like(rows.pos))  # 0 empty, 1 evictable, 2 kept
    bits = (rows.score.float() + 0.0).view(torch.int32).long()  # [B, H, n] in [0, 2^31): -0.0 + 0.0 is +0.0
    key = (rank << 61) | (bits << 30) | (rows.pos + 1)  # positions below 2^30 - 1
    keep = key.sort(dim=-1).indices[..., -slots:]  # [B, H, slots]: the last in eviction order survive
    pos = rows.pos.gather(-1, keep)  # [B, H, slots]
    if caps is not None:  # a lane with a smaller budget empties the first of its survivors too
        pos = pos.masked_fill(torch.arange(slots, device=pos.device) < (slots - caps)[:, None, None], EMPTY)
    temporal = pos.sort(dim=-1, stable=True).indices  # [B, H, slots]
    return replace(rows.take(keep.gather(-1, temporal)), pos=pos.gather(-1, temporal))
