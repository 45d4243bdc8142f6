"""The torch reference of the attention kernel: the test oracle and the `reference` backend.

Per lane b, head h, query i, key j (docs/models.md#attention-logits-and-the-safe-softmax):

    a_ij = s_h * (q_i . k_j + b_h(n_ij))           q and k already L2-normalised; no 1/sqrt(d_h)
    a_ij = -1e6 where the mask hides key j         (after the scale)
    m_i  = max(max_j a_ij, -1000)
    p_ij = exp(a_ij - m_i) / (sum_j exp(a_ij - m_i) + exp(-1000 - m_i))   the "sink" term
    o_i  = sum_j Drop(p_ij) v_j                    a fully masked row outputs exactly 0
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from lrexp.attention.bias import BiasSpec
    from lrexp.attention.mask import MaskSpec

MASKED_LOGIT = -1e6
SINK_LOGIT = -1000.0


def attention_reference(
    q: Tensor, k: Tensor, v: Tensor, mask: "MaskSpec", bias: Optional["BiasSpec"], scale: Optional[Tensor],
    dropout_p: float,
) -> Tensor:
    """Output [B, H, Tq, D] of q [B, H, Tq, D] over k, v [B, H, Tk, D], in fp32 with the dense mask and bias."""
    t_q, t_k = q.shape[2], k.shape[2]
    b = None if bias is None else bias.dense(t_q, t_k, mask.prefix)  # [H, Tq, Tk]
    probs = reference_probs(q, k, b, scale, mask.visible(t_q, t_k, q.device)[:, None])
    probs = F.dropout(probs, dropout_p, training=dropout_p > 0)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.float()).to(q.dtype)


def reference_probs(q: Tensor, k: Tensor, bias: Optional[Tensor], scale: Optional[Tensor], visible: Tensor) -> Tensor:
    """The probabilities p_ij [B, H, Tq, Tk] in fp32 of q [B, H, Tq, D] over k [B, H, Tk, D], given the bias
    values and the visibility (both broadcastable to [B, H, Tq, Tk]) as tensors: the dense mask and bias of a
    `MaskSpec` / `BiasSpec`, or those of keys at arbitrary positions (a bounded KV cache, lrexp.cache)."""
    logits = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float())  # [B, H, Tq, Tk]
    if bias is not None:
        logits = logits + bias.float()
    if scale is not None:
        logits = logits * scale.float()[:, None, None]
    logits = logits.masked_fill(~visible, MASKED_LOGIT)
    m = logits.amax(-1, keepdim=True).clamp(min=SINK_LOGIT)  # [B, H, Tq, 1]
    e = torch.exp(logits - m)
    return e / (e.sum(-1, keepdim=True) + torch.exp(SINK_LOGIT - m))
