"""`MaskSpec`: which keys each query may see, as a value (docs/models.md#sliding-window-and-its-exact-mask).

Queries are aligned with the **last** T_q of the T_k keys (bottom-right), so with a memory prefix of M keys
query i sits at key position M + i and its distance to key j is n = M + i - j. Every mask of lrexp is one
of these values:

- causal over the segment (`MaskSpec(window=None)`): visible iff n >= 1 (n >= 0 with `include_self`);
- sliding window (`MaskSpec(window=W)`): exactly W keys, 1 <= n <= W (0 <= n <= W-1 with `include_self`);
  with a memory prefix (the XL cache, or the previous block of a tile) this is the XL mask;
- unmasked (`MaskSpec(causal=False)`): every key visible (the recurrent cell's state attentions);
- `memory_valid` [B, M] hides the first M keys of a lane (empty XL cache slots after a document reset,
  `attn.mask_empty_cache`).

`prefix` P puts P keys in front of all of these, outside the positions: every query sees them and they carry
no position bias (memory slots read as prefix keys, `model.slots.read=prefix_kv`). The rules above then apply
to the T_k - P keys after them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from lrexp.attention.errors import MaskError


@dataclass(frozen=True, eq=False)
class MaskSpec:
    causal: bool = True
    window: Optional[int] = None  # W: only the W closest previous keys; None: every previous key
    include_self: bool = False  # docs/models.md#paper-and-code: the code excludes the query's own token
    memory_valid: Optional[Tensor] = None  # [B, M] bool: False hides memory slot m of lane b
    prefix: int = 0  # P keys in front, visible to every query, without position bias

    def __post_init__(self) -> None:
        if self.window is not None and (not self.causal or self.window < 1):
            raise MaskError(f"a sliding window must be causal and >= 1, got window={self.window}")
        if self.memory_valid is not None and (self.memory_valid.dtype != torch.bool or self.memory_valid.dim() != 2):
            raise MaskError("MaskSpec.memory_valid must be a bool tensor [batch, memory_len]")
        if self.prefix < 0:
            raise MaskError(f"MaskSpec.prefix must be >= 0, got {self.prefix}")

    def check(self, t_q: int, t_k: int) -> None:
        """Raise a `MaskError` when this mask cannot apply to t_q queries over t_k keys."""
        if self.prefix > t_k:
            raise MaskError(f"a prefix of {self.prefix} keys needs at least as many keys, got {t_k}")
        t_k -= self.prefix
        if self.causal and t_q > t_k:
            raise MaskError(f"a causal mask needs at least as many keys as queries, got {t_q} queries, {t_k} keys")
        if self.memory_valid is not None and self.memory_valid.shape[1] > t_k:
            raise MaskError(f"memory_valid covers {self.memory_valid.shape[1]} keys but there are only {t_k}")

    def visible(self, t_q: int, t_k: int, device: torch.device) -> Tensor:
        """Dense boolean mask [B or 1, t_q, t_k]: True where query i may attend to key j. Read-only: without
        `memory_valid` it is one tensor per shape, built once and shared by every caller (`static_visible`)."""
        self.check(t_q, t_k)
        vis = static_visible(self.causal, self.window, self.include_self, self.prefix, t_q, t_k,
                             torch.device(device))  # [1, t_q, t_k]
        if self.memory_valid is not None:
            b, m = self.memory_valid.shape
            rest = torch.ones(b, t_k - self.prefix - m, dtype=torch.bool, device=device)
            key_ok = torch.cat([self.memory_valid.to(device), rest], dim=1)  # [B, t_k - P]
            if self.prefix:
                key_ok = torch.cat([key_ok.new_ones(b, self.prefix), key_ok], dim=1)  # [B, t_k]
            vis = vis & key_ok[:, None, :]  # [B, t_q, t_k]
        return vis


@functools.lru_cache(maxsize=256)
def static_visible(causal: bool, window: Optional[int], include_self: bool, prefix: int, t_q: int, t_k: int,
                   device: torch.device) -> Tensor:
    """The part of a mask that depends on shapes alone, [1, t_q, t_k]: built once per shape and device rather
    than at every layer of every step (the tiles of a segment share one). Callers never write to it."""
    if prefix:
        vis = static_visible(causal, window, include_self, 0, t_q, t_k - prefix, device)  # [1, t_q, t_k - P]
        return torch.cat([vis.new_ones(1, t_q, prefix), vis], dim=2)  # [1, t_q, t_k]
    if causal:
        q_pos = torch.arange(t_q, device=device)[:, None] + (t_k - t_q)  # [t_q, 1]
        n = q_pos - torch.arange(t_k, device=device)[None, :]  # [t_q, t_k] distance back to key j
        nearest = 0 if include_self else 1
        vis = n >= nearest
        if window is not None:
            vis = vis & (n <= window - 1 + nearest)
    else:
        vis = torch.ones(t_q, t_k, dtype=torch.bool, device=device)
    return vis[None]  # [1, t_q, t_k]
