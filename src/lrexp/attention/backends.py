"""`attend` and the backend registry (DESIGN.md principle 2).

Every backend computes the same function (models.md 3.2 steps 4-5), per lane b, head h, query i, key j:

    a_ij = s_h * (q_i . k_j + bias_hij)            q and k already L2-normalised; no 1/sqrt(d_h)
    a_ij = -1e6 where the mask hides key j         (after the scale)
    m_i  = max(max_j a_ij, -1000)
    p_ij = exp(a_ij - m_i) / (sum_j exp(a_ij - m_i) + exp(-1000 - m_i))   the "sink" term
    o_i  = sum_j Drop(p_ij) v_j                    a fully masked row outputs exactly 0

`reference` is plain torch in fp32 (the test oracle). `sdpa` is torch's scaled_dot_product_attention with
s_h folded into q and the bias and mask in one additive float mask; the sink is one extra key of logit
exactly -1000 and value 0, which adds exp(-1000 - m) to the denominator and nothing to the output.
A backend is chosen by name once, at model build time (`resolve_backend`); there is no silent fallback.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lrexp.attention.mask import MaskSpec
from lrexp.errors import UserError

MASKED_LOGIT = -1e6
SINK_LOGIT = -1000.0

# (q, k, v, visible [B|1, Tq, Tk] bool, bias [.., H, Tq, Tk] | None, scale [H] | None, dropout_p) -> [B, H, Tq, D]
BackendFn = Callable[[Tensor, Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor], float], Tensor]


class BackendError(UserError, ValueError):
    """An unknown attention backend, or a case the chosen backend does not support."""


BACKENDS: Dict[str, BackendFn] = {}


def register_backend(name: str) -> Callable[[BackendFn], BackendFn]:
    def wrap(fn: BackendFn) -> BackendFn:
        if name in BACKENDS:
            raise ValueError(f"attention backend '{name}' is registered twice")
        BACKENDS[name] = fn
        return fn

    return wrap


def resolve_backend(name: str) -> str:
    """The backend's registered name, or a one-line error listing the available ones."""
    if name not in BACKENDS:
        raise BackendError(f"unknown attention backend '{name}'; available: {', '.join(sorted(BACKENDS))}")
    return name


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: MaskSpec,
    bias: Optional[Tensor] = None,
    scale: Optional[Tensor] = None,
    backend: str = "reference",
    dropout_p: float = 0.0,
) -> Tensor:
    """Attention output [B, H, Tq, D] of q [B, H, Tq, D] over k, v [B, H, Tk, D].

    bias broadcasts to [B, H, Tq, Tk] (usually [H, Tq, Tk]); scale is the per-head s_h [H] (1 when None);
    dropout_p applies to the probabilities (pass 0 in eval).
    """
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise BackendError(f"attend needs q [B, H, Tq, D] and k, v [B, H, Tk, D]; got {tuple(q.shape)}, "
                           f"{tuple(k.shape)}, {tuple(v.shape)}")
    visible = mask.visible(q.shape[2], k.shape[2], q.device)  # [B|1, Tq, Tk]
    return BACKENDS[resolve_backend(backend)](q, k, v, visible, bias, scale, dropout_p)


@register_backend("reference")
def _reference(q, k, v, visible, bias, scale, dropout_p):
    """Plain torch in fp32 with the explicit mask: the test oracle."""
    logits = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float())  # [B, H, Tq, Tk]
    if bias is not None:
        logits = logits + bias.float()
    if scale is not None:
        logits = logits * scale.float()[:, None, None]
    logits = logits.masked_fill(~visible[:, None], MASKED_LOGIT)
    m = logits.amax(-1, keepdim=True).clamp(min=SINK_LOGIT)  # [B, H, Tq, 1]
    e = torch.exp(logits - m)
    probs = e / (e.sum(-1, keepdim=True) + torch.exp(SINK_LOGIT - m))
    probs = F.dropout(probs, dropout_p, training=dropout_p > 0)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.float()).to(q.dtype)


@register_backend("sdpa")
def _sdpa(q, k, v, visible, bias, scale, dropout_p):
    """torch scaled_dot_product_attention with s_h folded into q, one additive float mask and a sink key."""
    dtype = q.dtype
    b, h, _, d = k.shape
    s = torch.ones(h, dtype=dtype, device=q.device) if scale is None else scale.to(dtype)
    q_s = q * s[:, None, None]  # [B, H, Tq, D]: s_h (q . k) is then a plain dot product
    add = torch.zeros((), dtype=dtype, device=q.device) if bias is None else bias.to(dtype) * s[:, None, None]
    masked = max(MASKED_LOGIT, torch.finfo(dtype).min)
    add = torch.where(visible[:, None], add, torch.tensor(masked, dtype=dtype, device=q.device))  # [B|1, H|1, Tq, Tk]
    add = add.expand(add.shape[0], h, q.shape[2], k.shape[2])
    sink = torch.full((*add.shape[:3], 1), SINK_LOGIT, dtype=dtype, device=q.device)
    add = torch.cat([add, sink], dim=-1)  # [B|1, H, Tq, Tk + 1]
    zero = torch.zeros(b, h, 1, d, dtype=k.dtype, device=k.device)
    k_sink = torch.cat([k, zero], dim=2)  # [B, H, Tk + 1, D]: q . 0 = 0, so the sink's logit is exactly -1000
    v_sink = torch.cat([v, zero.to(v.dtype)], dim=2)  # the sink's value is 0
    return F.scaled_dot_product_attention(q_s, k_sink, v_sink, attn_mask=add, dropout_p=dropout_p, scale=1.0)
