"""Attention over keys at arbitrary positions, returning the probabilities too: the core of a bounded KV
cache (lrexp.cache), whose kept rows are no longer a contiguous run of positions that a `MaskSpec` and a
`BiasSpec` describe. The math is the reference backend's (`reference_probs`), with the distances and the
visibility given per lane, head, query and key.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from lrexp.attention.bias import BiasSpec
from lrexp.kernels.attention.reference import reference_probs


def attend_rows(
    q: Tensor, k: Tensor, v: Tensor, distance: Tensor, visible: Tensor, bias: Optional[BiasSpec],
    scale: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """Output [B, H, Tq, D] and probabilities [B, H, Tq, Tk] (fp32) of q [B, H, Tq, D] over k, v [B, H, Tk, D];
    distance [B, H, Tq, Tk] int64 from each query to each key (the T5 bias's n), visible [B, H, Tq, Tk] bool."""
    b = None if bias is None else bias.at(distance)  # [B, H, Tq, Tk]
    probs = reference_probs(q, k, b, scale, visible)  # [B, H, Tq, Tk]
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.float()).to(q.dtype), probs
