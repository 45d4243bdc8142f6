"""T5-style relative position bias: unidirectional buckets, one table per layer (docs/models.md#t5-relative-position-bias).

Backends receive the bias as a `BiasSpec` (the table and its bucket parameters), never as a dense
[H, T_q, T_k] tensor (docs/design.md#attention-backends): the reference and SDPA backends materialise it, the Triton
kernel looks it up per tile. Queries are aligned with the last keys (bottom-right, as in `MaskSpec`), so
query i of T_q and key j of T_k are n = T_k - T_q + i - j apart.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def relative_bucket(n: Tensor, num_buckets: int = 32, max_distance: int = 128) -> Tensor:
    """Bucket of the distance n = max(i - j, 0): exact below num_buckets/2, log-spaced up to max_distance.

    With 32 buckets and max distance 128: n for n < 16, else min(31, 16 + floor(16 ln(n/16) / ln 8)).
    """
    exact = num_buckets // 2
    n = n.clamp(min=0)
    # float32 like T5; the clamp keeps log() away from 0 on the exact branch, which where() discards
    far = exact + (
        torch.log(n.clamp(min=exact).float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    ).long()
    return torch.where(n < exact, n, far.clamp(max=num_buckets - 1))


@dataclass(frozen=True, eq=False)
class BiasSpec:
    """b_h(bucket(n)) as a value: the table [H, num_buckets] (a parameter: gradients flow into it)."""

    table: Tensor  # [H, num_buckets]
    num_buckets: int
    max_distance: int

    def by_distance(self) -> Tensor:
        """The bias at every distance n = 0 .. max_distance [H, max_distance + 1]; every n >= max_distance is in
        the last bucket, so b(n) = by_distance()[:, min(n, max_distance)]. Exact against `relative_bucket` by
        construction, which an in-kernel float log (approximate on GPUs) would not be."""
        buckets = _distance_buckets(self.num_buckets, self.max_distance, self.table.device)  # [max_distance + 1]
        return self.table[:, buckets]  # [H, max_distance + 1]

    def dense(self, t_q: int, t_k: int, prefix: int = 0) -> Tensor:
        """Bias [H, t_q, t_k] for t_q queries at the end of t_k keys; the first `prefix` keys have none
        (`MaskSpec.prefix`: they stand outside the positions). Only the two gathers from the table run per
        call: the indices are built once per shape (gradients flow into the table through the gathers)."""
        bias = self.by_distance()[:, _distances(t_q, t_k - prefix, self.max_distance, self.table.device)]
        return torch.cat([bias.new_zeros(bias.shape[0], t_q, prefix), bias], dim=2) if prefix else bias  # [H, t_q, t_k]

    def at(self, n: Tensor) -> Tensor:
        """Bias [B, H, t_q, t_k] at explicit distances n [B, H, t_q, t_k] (head h reads its own row of the
        table): keys at arbitrary positions, as a bounded KV cache holds them (lrexp.cache)."""
        b, h, t_q, t_k = n.shape
        table = self.by_distance()[None, :, None, :].expand(b, h, t_q, self.max_distance + 1)  # [B, H, Tq, L]
        return table.gather(-1, n.clamp(0, self.max_distance))  # [B, H, Tq, Tk]


@functools.lru_cache(maxsize=64)
def _distance_buckets(num_buckets: int, max_distance: int, device: torch.device) -> Tensor:
    """relative_bucket(n) for n = 0 .. max_distance [max_distance + 1], once per device. Read-only."""
    return relative_bucket(torch.arange(max_distance + 1, device=device), num_buckets, max_distance)


@functools.lru_cache(maxsize=256)
def _distances(t_q: int, t_pos: int, max_distance: int, device: torch.device) -> Tensor:
    """min(n, max_distance) [t_q, t_pos] of t_q queries at the end of t_pos keys, once per shape. Read-only."""
    q_pos = torch.arange(t_q, device=device)[:, None] + (t_pos - t_q)  # [t_q, 1]
    n = q_pos - torch.arange(t_pos, device=device)[None, :]  # [t_q, t_pos]
    return n.clamp(0, max_distance)


class RelativePositionBias(nn.Module):
    """The layer's table [H, num_buckets]; calling it gives the `BiasSpec` that `attend` takes."""

    def __init__(self, num_heads: int, num_buckets: int = 32, max_distance: int = 128) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.table = nn.Parameter(torch.empty(num_heads, num_buckets))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.table, std=(1.0 / self.num_buckets) ** 0.5)  # N(0, 1/32): not material

    def forward(self) -> BiasSpec:
        return BiasSpec(self.table, self.num_buckets, self.max_distance)
