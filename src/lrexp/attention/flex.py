"""The `flex` attention backend: torch's FlexAttention with the lrexp semantics (docs/design.md#attention-backends).

- block mask: the structural part of the `MaskSpec` (causal, window, include_self), from which FlexAttention
  skips the key blocks no query of a block can see; cached per shape, since building one costs a pass over
  every block and the structure repeats every call;
- score_mod: a_ij = s_h (q . k + b_h(n_ij)), and -1e6 (the reference's masked logit) where `memory_valid`
  hides key j of lane b: it changes every step, so it stays out of the cached block mask;
- the sink: FlexAttention's softmax has none; with its log-sum-exp L_i of the visible logits the lrexp output
  is o_i exp(L_i) / (exp(L_i) + exp(-1000)) = o_i sigmoid(L_i + 1000), which is 0 for a row with no visible key.

On CUDA the call is `torch.compile`d once (dynamic=False: one kernel per shape, as the bench measures it); on the
CPU it runs eagerly, forward only (this torch has no FlexAttention backward on the CPU). No dropout: a dropout
on the normalised probabilities has no place in a score_mod.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask, flex_attention

from lrexp.attention.bias import BiasSpec
from lrexp.attention.errors import BackendError
from lrexp.attention.mask import MaskSpec
from lrexp.kernels.attention.reference import MASKED_LOGIT, SINK_LOGIT


@functools.lru_cache(maxsize=64)
def _block_mask(causal: bool, window: int, nearest: int, t_q: int, t_k: int, device: str) -> Optional[BlockMask]:
    """FlexAttention's block mask of the structural mask (None: every key visible); keyed by value."""
    if not causal:
        return None
    shift = t_k - t_q

    def visible(b, h, i, j):
        n = shift + i - j  # distance back from query i to key j
        keep = n >= nearest
        return keep & (n <= window - 1 + nearest) if window else keep

    return create_block_mask(visible, None, None, t_q, t_k, device=device)


@functools.lru_cache(maxsize=1)
def _compiled():
    return torch.compile(flex_attention, dynamic=False)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec, bias: Optional[BiasSpec], scale: Optional[Tensor],
              dropout_p: float) -> Tensor:
    """Output [B, H, Tq, D] of q [B, H, Tq, D] over k, v [B, H, Tk, D] (`attend`'s `flex` backend)."""
    if dropout_p > 0:
        raise BackendError("the flex attention backend has no attention dropout; use model.attn.backend=triton "
                           "or sdpa, or model.dropout=0")
    if mask.prefix:
        raise BackendError("the flex attention backend takes no prefix keys (model.slots.read=prefix_kv); "
                           "use model.attn.backend=sdpa")
    if not q.is_cuda and torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (
            q, k, v, scale, None if bias is None else bias.table)):
        raise BackendError("the flex attention backend has no backward on the CPU in this torch; use "
                           "model.attn.backend=sdpa there, or run it on CUDA")
    h, t_q, t_k = q.shape[1], q.shape[2], k.shape[2]
    shift = t_k - t_q
    s = torch.ones(h, device=q.device) if scale is None else scale.float()  # [H]
    table = None if bias is None else bias.by_distance().float()  # [H, L]
    valid = mask.memory_valid  # [B, Mv] bool or None

    def score_mod(score, b, hh, i, j):
        if table is not None:
            n = (shift + i - j).clamp(0, table.shape[1] - 1)
            score = score + table[hh, n]
        score = score * s[hh]
        if valid is not None:
            hidden = (j < valid.shape[1]) & ~valid[b, j.clamp(max=valid.shape[1] - 1)]
            score = torch.where(hidden, MASKED_LOGIT, score)
        return score

    block_mask = _block_mask(mask.causal, mask.window or 0, 0 if mask.include_self else 1, t_q, t_k, str(q.device))
    run = _compiled() if q.is_cuda else flex_attention
    out, aux = run(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0, return_aux=AuxRequest(lse=True))
    keep = torch.sigmoid(aux.lse.float() - SINK_LOGIT)[..., None]  # [B, H, Tq, 1]: the sink's share removed
    return (out.float() * keep).to(q.dtype)
