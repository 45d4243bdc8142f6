"""`attend` and the backend registry (docs/design.md#attention-backends).

Every backend computes the function of `lrexp.kernels.attention.reference` (docs/models.md#attention-logits-and-the-safe-softmax) from
the same arguments: q, k, v, the `MaskSpec` itself and the T5 bias as a `BiasSpec` (table and bucket
parameters), never a dense mask or bias tensor, so a fused kernel can compute both per tile.

- `reference`: plain torch in fp32 with the materialised mask and bias (the test oracle).
- `sdpa`: torch's scaled_dot_product_attention with s_h folded into q and the bias and mask in one additive
  float mask; the sink is one extra key of logit exactly -1000 and value 0, which adds exp(-1000 - m) to
  the denominator and nothing to the output.
- `triton`: the fused kernel of `lrexp.kernels.attention` (CUDA, or CPU under TRITON_INTERPRET=1). It is
  *banded*: a sliding window over a whole segment costs O(T W) in one call, so `sliding_window_attention`
  hands it the segment instead of the [previous; current] block tiles the dense backends need. It requires
  the triton package (Linux only), which resolving the backend checks.

- `flex`: torch's FlexAttention (`lrexp.attention.flex`): a cached block mask for the window and causal
  structure, a score_mod for the bias, the scale and memory_valid; compiled on CUDA, forward-only on the CPU, no
  dropout. Banded like `triton` (the block mask skips the blocks outside the band): the anchor the fused
  kernel is measured against.

A backend is chosen by name once, at model build time (`resolve_backend`); there is no silent fallback.
`auto` (the default, docs/design.md#backends-and-precision) names one of them by the device: `triton` on CUDA
where triton imports, `sdpa` elsewhere; `lrexp train` resolves it once at the run's start and tags it.

The sink: every backend's softmax has one more key of logit exactly -1000 (`SINK_LOGIT`) and value 0, so the
denominator gains exp(-1000 - m) and the output nothing, and a row with no visible key outputs 0, not NaN.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lrexp.attention.bias import BiasSpec
from lrexp.attention.errors import BackendError
from lrexp.attention.mask import MaskSpec
from lrexp.kernels.attention.reference import MASKED_LOGIT, SINK_LOGIT, attention_reference

# (q, k, v, mask, bias, scale [H] | None, dropout_p) -> [B, H, Tq, D]
BackendFn = Callable[[Tensor, Tensor, Tensor, MaskSpec, Optional[BiasSpec], Optional[Tensor], float], Tensor]


@dataclass(frozen=True)
class Backend:
    fn: BackendFn
    banded: bool  # computes a sliding window over a whole segment in O(T W) work and memory
    requires: Optional[str]  # a package the backend imports, checked when it is resolved


BACKENDS: Dict[str, Backend] = {}
AUTO = "auto"  # model.attn.backend: chosen by the device (`auto_backend`)


def register_backend(
    name: str, banded: bool = False, requires: Optional[str] = None
) -> Callable[[BackendFn], BackendFn]:
    def wrap(fn: BackendFn) -> BackendFn:
        if name in BACKENDS:
            raise ValueError(f"attention backend '{name}' is registered twice")
        BACKENDS[name] = Backend(fn, banded, requires)
        return fn

    return wrap


@functools.lru_cache(maxsize=None)
def _importable(package: str) -> bool:
    """Looked up once: `attend` resolves its backend on every call, a hot path."""
    return importlib.util.find_spec(package) is not None


def auto_backend(device_type: str, prefix_keys: bool = False) -> str:
    """The backend `auto` stands for on a device of this type: the fused kernel on CUDA when triton imports,
    `sdpa` elsewhere and whenever the model reads per-block prefix keys (which no banded backend takes)."""
    return "triton" if device_type == "cuda" and _importable("triton") and not prefix_keys else "sdpa"


def resolve_backend(name: str) -> str:
    """The backend's registered name, or a one-line error: unknown name, or its package is not importable.
    `auto` resolves by this process's device (CUDA when one is available)."""
    if name == AUTO:
        name = auto_backend("cuda" if torch.cuda.is_available() else "cpu")
    if name not in BACKENDS:
        raise BackendError(f"unknown attention backend '{name}'; available: {', '.join(sorted(BACKENDS))}")
    requires = BACKENDS[name].requires
    if requires is not None and not _importable(requires):
        raise BackendError(f"attention backend '{name}' needs the '{requires}' package, which is not importable "
                           f"here (it is Linux-only); use model.attn.backend=sdpa")
    return name


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: MaskSpec,
    bias: Optional[BiasSpec] = None,
    scale: Optional[Tensor] = None,
    backend: str = "reference",
    dropout_p: float = 0.0,
) -> Tensor:
    """Attention output [B, H, Tq, D] of q [B, H, Tq, D] over k, v [B, H, Tk, D].

    bias is the layer's T5 bias (`RelativePositionBias()`), bottom-right aligned like the mask; scale is the
    per-head s_h [H] (1 when None); dropout_p applies to the probabilities (pass 0 in eval).
    """
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise BackendError(f"attend needs q [B, H, Tq, D] and k, v [B, H, Tk, D]; got {tuple(q.shape)}, "
                           f"{tuple(k.shape)}, {tuple(v.shape)}")
    if bias is not None and not isinstance(bias, BiasSpec):
        raise BackendError(f"attend takes the bias as a BiasSpec (table and buckets), got {type(bias).__name__}")
    mask.check(q.shape[2], k.shape[2])
    return BACKENDS[resolve_backend(backend)].fn(q, k, v, mask, bias, scale, dropout_p)


register_backend("reference")(attention_reference)


@register_backend("sdpa")
def _sdpa(q, k, v, mask, bias, scale, dropout_p):
    """torch scaled_dot_product_attention with s_h folded into q, one additive float mask and a sink key."""
    dtype = q.dtype
    b, h, t_k, d = k.shape
    t_q = q.shape[2]
    q_s = q if scale is None else q * scale.to(dtype)[:, None, None]  # [B, H, Tq, D]: s_h (q . k) is a plain dot
    if bias is None and mask.memory_valid is None:  # the whole additive mask is a constant of the shapes
        add = _constant_mask(mask.causal, mask.window, mask.include_self, mask.prefix, t_q, t_k, h, dtype, q.device)
    else:
        add = _additive_mask(mask, bias, scale, t_q, t_k, h, dtype, q.device)  # [B|1, H, Tq, Tk + 1]
    zero = _zeros(b, h, d, k.dtype, k.device)  # [B, H, 1, D]
    k_sink = torch.cat([k, zero], dim=2)  # [B, H, Tk + 1, D]: q . 0 = 0, so the sink's logit is exactly -1000
    v_sink = torch.cat([v, zero.to(v.dtype)], dim=2)  # the sink's value is 0
    if dropout_p > 0 and q.device.type == "cpu" and dtype == torch.float32:
        return _sdpa_math(q_s, k_sink, v_sink, add, dropout_p)
    return F.scaled_dot_product_attention(q_s, k_sink, v_sink, attn_mask=add, dropout_p=dropout_p, scale=1.0)


def _additive_mask(mask: MaskSpec, bias: Optional[BiasSpec], scale: Optional[Tensor], t_q: int, t_k: int, h: int,
                   dtype: torch.dtype, device: torch.device) -> Tensor:
    """s_h b_h(n) where the mask shows the key, the masked logit where it hides it, then the sink's logit
    as one more key: [B|1, H, Tq, Tk + 1]."""
    add = torch.zeros((), dtype=dtype, device=device)
    if bias is not None:
        add = bias.dense(t_q, t_k, mask.prefix).to(dtype)  # [H, Tq, Tk]
        if scale is not None:
            add = add * scale.to(dtype)[:, None, None]
    masked = max(MASKED_LOGIT, torch.finfo(dtype).min)
    visible = mask.visible(t_q, t_k, device)  # [B|1, Tq, Tk]
    add = torch.where(visible[:, None], add, torch.tensor(masked, dtype=dtype, device=device))  # [B|1, H|1, Tq, Tk]
    add = add.expand(add.shape[0], h, t_q, t_k)
    sink = torch.full((*add.shape[:3], 1), SINK_LOGIT, dtype=dtype, device=device)
    return torch.cat([add, sink], dim=-1)  # [B|1, H, Tq, Tk + 1]


@functools.lru_cache(maxsize=256)
def _constant_mask(causal: bool, window: Optional[int], include_self: bool, prefix: int, t_q: int, t_k: int, h: int,
                   dtype: torch.dtype, device: torch.device) -> Tensor:
    """`_additive_mask` without a bias or per-lane validity, which depends on the shapes alone: built once
    (the recurrent cell's state attentions ask for it at every block). Read-only."""
    return _additive_mask(MaskSpec(causal, window, include_self, prefix=prefix), None, None, t_q, t_k, h, dtype,
                          device)


@functools.lru_cache(maxsize=256)
def _zeros(b: int, h: int, d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The sink's key and value [B, H, 1, D], once per shape. Read-only: it is only concatenated."""
    return torch.zeros(b, h, 1, d, dtype=dtype, device=device)


def _sdpa_math(q: Tensor, k: Tensor, v: Tensor, add: Tensor, dropout_p: float) -> Tensor:
    """What scaled_dot_product_attention computes on a CPU when there is dropout (its math path), op for op,
    less its safe softmax's search for rows with every logit -inf: the masked logit is finite and the sink
    is in every row, so there are none, and the search cost a full pass over the probabilities per call."""
    logits = torch.matmul(q * 1.0, k.transpose(-2, -1) * 1.0)  # [B, H, Tq, Tk + 1]; the unit scales of scale=1.0
    probs = F.dropout(torch.softmax(logits + add, dim=-1), dropout_p, training=True)
    return torch.matmul(probs, v)  # [B, H, Tq, D]


@register_backend("triton", banded=True, requires="triton")
def _triton(q, k, v, mask, bias, scale, dropout_p):
    """The fused kernel; imported on first use, since importing it defines the kernels (and needs triton)."""
    from lrexp.kernels.attention.op import attention  # defines the kernels on import and needs triton

    return attention(q, k, v, mask, bias, scale, dropout_p)


@register_backend("flex", banded=True)
def _flex(q, k, v, mask, bias, scale, dropout_p):
    """FlexAttention; imported on first use (it pulls in torch's compiler front end)."""
    from lrexp.attention.flex import attention  # torch.nn.attention.flex_attention imports dynamo

    return attention(q, k, v, mask, bias, scale, dropout_p)
