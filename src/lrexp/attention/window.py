"""Blockwise sliding-window attention: cost linear in the segment length (docs/models.md#sliding-window-and-its-exact-mask).

The segment [B, H, N, D] is cut into N/W blocks of W queries; block t attends to the 2W keys
[K_{t-1}; K_t] under the tile mask (query i sees key j iff i <= j <= W+i-1, bias distance n = W+i-j).
The previous block of block 0 is the XL cache. For the dense backends all tiles run as one batched
`attend` of [B*N/W, H, W, 2W]: no N x N mask is ever built. A banded backend (the Triton kernel) gets the
segment itself, N queries over [cache; segment] with the same window mask, which is the same function.

Per-block prefix keys (memory slots read as prefix keys) join each tile in front of its 2W keys
(`MaskSpec.prefix`: seen by every query of the block, no position bias, one softmax with the window).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from lrexp.attention.backends import BACKENDS, attend, resolve_backend
from lrexp.attention.bias import BiasSpec
from lrexp.attention.errors import BackendError
from lrexp.attention.mask import MaskSpec


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_prev: Tensor,
    v_prev: Tensor,
    *,
    window: int,
    bias: Optional[BiasSpec] = None,
    scale: Optional[Tensor] = None,
    include_self: bool = False,
    prev_valid: Optional[Tensor] = None,
    backend: str = "reference",
    dropout_p: float = 0.0,
    prefix: Optional[Tuple[Tensor, Tensor]] = None,
) -> Tensor:
    """Output [B, H, N, D] of q, k, v [B, H, N, D] with block 0's previous keys k_prev, v_prev [B, H, W, D].

    bias is the layer's T5 bias; prev_valid [B] bool marks lanes whose k_prev/v_prev are real keys (None: all
    are; False hides them, `attn.mask_empty_cache`); prefix: each block's own prefix keys and values
    [B*nb, H, P, D], lane-major (lane b's block t at b*nb + t).
    """
    b, h, n, d = q.shape
    w = window
    if n % w:
        raise BackendError(f"segment length {n} is not a multiple of the window {w}")
    if k_prev.shape != (b, h, w, d) or v_prev.shape != (b, h, w, d):
        raise BackendError(f"previous block must be [{b}, {h}, {w}, {d}], got {tuple(k_prev.shape)}")
    blocks = n // w
    p = 0 if prefix is None else prefix[0].shape[2]
    if BACKENDS[resolve_backend(backend)].banded:
        if prefix is not None:
            raise BackendError(f"the '{backend}' backend takes no per-block prefix keys (model.slots.read="
                               f"prefix_kv); use model.attn.backend=sdpa")
        memory_valid = None if prev_valid is None else prev_valid[:, None].expand(b, w)  # [B, W]
        return attend(q, torch.cat([k_prev.to(k.dtype), k], 2), torch.cat([v_prev.to(v.dtype), v], 2),
                      MaskSpec(window=w, include_self=include_self, memory_valid=memory_valid),
                      bias=bias, scale=scale, backend=backend, dropout_p=dropout_p)  # [B, H, N, D]

    def tiles(x: Tensor) -> Tensor:
        return x.reshape(b, h, blocks, w, x.shape[-1]).transpose(1, 2)  # [B, nb, H, W, D]

    def with_previous(x: Tensor, prev: Tensor, front: Optional[Tensor]) -> Tensor:
        cur = tiles(x)  # [B, nb, H, W, D]
        before = torch.cat([prev.to(x.dtype).unsqueeze(1), cur[:, :-1]], dim=1)  # [B, nb, H, W, D]
        keys = torch.cat([before, cur], dim=3).reshape(b * blocks, h, 2 * w, x.shape[-1])  # [B*nb, H, 2W, D]
        return keys if front is None else torch.cat([front.to(x.dtype), keys], dim=2)  # [B*nb, H, P + 2W, D]

    memory_valid = None
    if prev_valid is not None:
        block_valid = torch.ones(b, blocks, dtype=torch.bool, device=q.device)
        block_valid[:, 0] = prev_valid
        memory_valid = block_valid.reshape(b * blocks, 1).expand(b * blocks, w)  # [B*nb, W]
    out = attend(
        tiles(q).reshape(b * blocks, h, w, d),
        with_previous(k, k_prev, None if prefix is None else prefix[0]),
        with_previous(v, v_prev, None if prefix is None else prefix[1]),
        MaskSpec(window=w, include_self=include_self, memory_valid=memory_valid, prefix=p),
        bias=bias,
        scale=scale,
        backend=backend,
        dropout_p=dropout_p,
    )  # [B*nb, H, W, D]
    return out.reshape(b, blocks, h, w, d).transpose(1, 2).reshape(b, h, n, d)
