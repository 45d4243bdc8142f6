"""The plain layer (kind "attention"): pre-norm attention sublayer + FFN sublayer (docs/models.md#one-layer).

With `spec.window = W` it is a sliding-window layer: blockwise attention over [previous block; current
block], block 0's previous block being the carried `XLCache`, which the layer rewrites with the segment's
last W keys and values (the model detaches them: the cache is a constant at the next step). With
`spec.window = None` it attends densely and causally over the segment alone and carries nothing (the Full row).

The recurrent cell's token self-attention is this layer's windowed attention over the same tiles: it reuses
`SelfAttentionProjections` (LN, dropout, Q/K/V, QK norm), `HeadScale`, `RelativePositionBias` and
`sliding_window_attention`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Optional, Tuple

from torch import Tensor, nn

from lrexp.attention import HeadScale, MaskSpec, RelativePositionBias, attend, l2_normalize, sliding_window_attention
from lrexp.layers.common import FeedForward, RMSNorm, linear, merge_heads, split_heads
from lrexp.layers.registry import LayerSpec, register_layer
from lrexp.model.flops import Flops, linear_flops
from lrexp.model.state import XLCache

if TYPE_CHECKING:
    from lrexp.config.schema import RunConfig


class SelfAttentionProjections(nn.Module):
    """h = Drop(LN(x)); q-hat, k-hat (L2-normalised per head) and v, each [B, H, T, D]."""

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = RMSNorm(d_model)
        self.drop = nn.Dropout(dropout)
        self.wq = linear(d_model, d_model)
        self.wk = linear(d_model, d_model)
        self.wv = linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return self.project(self.norm_input(x))

    def norm_input(self, x: Tensor) -> Tensor:
        """h = Drop(LN(x)) [B, T, d]; the recurrent cell's second token query reads the same h."""
        return self.drop(self.norm(x))

    def project(self, h: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        q = l2_normalize(split_heads(self.wq(h), self.num_heads))  # [B, H, T, D]
        k = l2_normalize(split_heads(self.wk(h), self.num_heads))  # [B, H, T, D]
        v = split_heads(self.wv(h), self.num_heads)  # [B, H, T, D]
        return q, k, v


class AttentionLayer(nn.Module):
    """x -> x + W_O attn(x), then the FFN sublayer; `layer(x, state) -> (x, new_state)`."""

    # a kind that measures itself for the training log names its stats "<prefix><layer index>/<name>" and takes
    # `layer(x, state, stats={})` (lrexp.model.lm); None: nothing to measure
    stats_prefix: ClassVar[Optional[str]] = None

    def __init__(self, spec: LayerSpec, cfg: "RunConfig", backend: str) -> None:
        super().__init__()
        m, a = cfg.model, cfg.model.attn
        self.window = spec.window
        self.num_heads = m.num_heads
        self.head_dim = m.d_model // m.num_heads
        self.include_self = a.window_includes_self
        self.mask_empty_cache = a.mask_empty_cache
        self.dropout = m.dropout
        self.backend = backend
        self.qkv = SelfAttentionProjections(m.d_model, m.num_heads, m.dropout)
        self.scale = HeadScale(m.num_heads, a.scale_abs)
        self.rel_bias = RelativePositionBias(m.num_heads, a.num_buckets, a.max_distance)
        self.wo = linear(m.d_model, m.d_model)
        self.ffn = FeedForward(m.d_model, m.d_ff, m.dropout)

    def initial_state(self, batch_size: int, device) -> Optional[XLCache]:
        if self.window is None:
            return None
        return XLCache.empty(batch_size, self.num_heads, self.window, self.head_dim, device)

    def forward(self, x: Tensor, state: Optional[XLCache]) -> Tuple[Tensor, Optional[XLCache]]:
        o, _, k, v = self.self_attention(x, state)  # [B, H, T, D] each
        new_state = None if self.window is None else state.advance(k, v)
        return self.output(x, o), new_state

    def flops(self, t: int, states: int) -> Flops:
        """Forward FLOPs over one lane's segment of t tokens (lrexp.model.flops): the band T W of a windowed
        layer, T (T +- 1) / 2 pairs of a dense one; `states` is for the kinds that read a recurrent state."""
        if self.window is not None:
            pairs = t * self.window
        else:
            pairs = t * (t + 1) // 2 if self.include_self else t * (t - 1) // 2
        return Flops(linear_flops(self) * t, self.pair_flops * pairs)

    @property
    def pair_flops(self) -> int:
        """FLOPs per (query, visible key) pair: QK^T and AV over all heads, 2 d each."""
        return 4 * self.num_heads * self.head_dim

    def output(self, x: Tensor, o: Tensor) -> Tensor:
        """The layer's output [B, T, d] from its input x [B, T, d] and attention output o [B, H, T, D]: the
        residual through W_O, then the FFN sublayer (a bounded-cache decode, lrexp.cache, reuses it)."""
        x = x + self.wo(merge_heads(o))  # no dropout after the attention projection (3.7)
        return self.ffn(x)

    def self_attention(self, x: Tensor, state: Optional[XLCache]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The attention output o before W_O, with the segment's q-hat, k-hat and v: each [B, H, T, D]."""
        q, k, v = self.qkv(x)  # [B, H, T, D] each
        return self.attend_window(q, k, v, state), q, k, v

    def attend_window(
        self, q: Tensor, k: Tensor, v: Tensor, state: Optional[XLCache],
        prefix: Optional[Tuple[Tensor, Tensor]] = None,
    ) -> Tensor:
        """o [B, H, T, D] of the segment's q-hat, k-hat, v [B, H, T, D] over this layer's window (or densely).

        prefix: each block's own prefix keys and values [B*nb, H, P, D] (`sliding_window_attention`). A windowed
        layer whose `rel_bias` is None (the kNN memory layer under `knn.local_position_bias=false`) attends
        without the T5 bias."""
        p = self.dropout if self.training else 0.0
        if self.window is None:
            return attend(q, k, v, MaskSpec(include_self=self.include_self), bias=self.rel_bias(),
                          scale=self.scale(), backend=self.backend, dropout_p=p)  # [B, H, T, D]
        bias = None if self.rel_bias is None else self.rel_bias()
        return sliding_window_attention(
            q, k, v, state.k, state.v, window=self.window, bias=bias, scale=self.scale(),
            include_self=self.include_self, prev_valid=~state.fresh if self.mask_empty_cache else None,
            backend=self.backend, dropout_p=p, prefix=prefix,
        )  # [B, H, T, D]


register_layer("attention", AttentionLayer)
