"""Layers whose tokens read a recurrent state (docs/models.md#vertical-and-horizontal-directions, docs/models.md#feedback): x' = x + W_O [A ; B].

A is the plain layer's windowed self-attention and B the tokens' cross-attention (second query Q2, scale
s2; no mask, bias or dropout) to the keys and values K_s, V_s of a state c; W_O widens to 2H heads -> d.
`StateReadingLayer` is that token side. The block-recurrent cell extends it with the state's own update
(lrexp.layers.recurrent); registered alone as kind "feedback" it is every non-recurrent layer of a Feedback
row, which the model runs block by block, handing each block the recurrent layer's K_s, V_s of c_t.

Memory slots may read their state the other way instead (`model.slots.read=prefix_kv`,
docs/knobs.md#gated-memory-slots): K_s, V_s join each block's window keys in front, in one softmax with A and without position bias, and
W_O keeps its H heads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

import torch
from torch import Tensor

from lrexp.attention import HeadScale, MaskSpec, attend, l2_normalize
from lrexp.layers.block import AttentionLayer
from lrexp.layers.common import linear, merge_heads, split_heads
from lrexp.layers.registry import LayerSpec, register_layer
from lrexp.model.flops import Flops, linear_flops
from lrexp.model.state import XLCache

if TYPE_CHECKING:
    from lrexp.config.schema import RunConfig

UNMASKED = MaskSpec(causal=False)  # B, P and R: every key visible, no position bias, no dropout (4.3)


READS = ("cross_attn", "prefix_kv")


class StateReadingLayer(AttentionLayer):
    """A sliding-window layer that also reads a state; `layer(x, state, feedback=(K_s, V_s)) -> (x, new_cache)`.

    read: "cross_attn" (B, with Q2, s2 and the widened W_O) or "prefix_kv" (no parameters of its own)."""

    def __init__(self, spec: LayerSpec, cfg: "RunConfig", backend: str, read: str = "cross_attn") -> None:
        if spec.window is None:
            raise ValueError(f"a '{spec.kind}' layer needs a window (its block length)")
        if read not in READS:
            raise ValueError(f"unknown state read '{read}'; available: {', '.join(READS)}")
        super().__init__(spec, cfg, backend)
        m = cfg.model
        self.read = read
        if read == "cross_attn":
            self.wq2 = linear(m.d_model, m.d_model)  # Q2: the tokens' query into the state
            self.scale2 = HeadScale(m.num_heads, m.attn.scale_abs)  # s2, for B
            self.wo = linear(2 * m.d_model, m.d_model)  # W_O over [A ; B]: 2H heads -> d

    def project_tokens(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """h = Drop(LN(x)) [B, T, d] (Q2's input) and the tokens' q-hat, k-hat, v [B, H, T, D]."""
        h = self.qkv.norm_input(x)  # [B, T, d]
        return (h, *self.qkv.project(h))

    def read_state(
        self, x: Tensor, h: Tensor, q: Tensor, k: Tensor, v: Tensor, cache: XLCache, k_s: Tensor, v_s: Tensor
    ) -> Tensor:
        """The attention sublayer's output x' [B, T, d]: the tokens' window over their keys k, v and the XL
        cache, and block t's queries reading the state keys k_s, v_s [B*nb, H, S, D] (lane-major: lane b's
        block t at b*nb + t)."""
        if self.read == "prefix_kv":
            o = self.attend_window(q, k, v, cache, prefix=(k_s, v_s))  # [B, H, T, D]: one softmax over [K_s; window]
            return x + self.wo(merge_heads(o))  # [B, T, d]
        q2 = l2_normalize(split_heads(self.wq2(h), self.num_heads))  # [B, H, T, D]
        a = self.attend_window(q, k, v, cache)  # [B, H, T, D]
        b, hd, t, dh = q2.shape
        blocks = t // self.window
        q2 = q2.reshape(b, hd, blocks, self.window, dh).transpose(1, 2).flatten(0, 1)  # [B*nb, H, W, D]
        cross = attend(q2, k_s, v_s, UNMASKED, scale=self.scale2(), backend=self.backend)  # [B*nb, H, W, D]
        cross = cross.reshape(b, blocks, hd, self.window, dh).transpose(1, 2).reshape(b, hd, t, dh)  # [B, H, T, D]
        return x + self.wo(merge_heads(torch.cat([a, cross], dim=1)))  # [B, T, d]; [A ; B] along the head axis

    def flops(self, t: int, states: int) -> Flops:
        """A Feedback row's non-recurrent layer: A over the band T W and B over the `states` S of c_t."""
        return Flops(linear_flops(self) * t, self.pair_flops * (t * self.window + t * states))

    def forward(
        self, x: Tensor, state: XLCache, feedback: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[Tensor, XLCache]:
        if feedback is None or x.shape[1] != self.window:
            raise ValueError("a feedback layer runs one block at a time with the state's keys: the model's job")
        h, q, k, v = self.project_tokens(x)
        y = self.read_state(x, h, q, k, v, state, *feedback)
        return self.ffn(y), state.advance(k, v)


register_layer("feedback", StateReadingLayer)
