"""Layers whose tokens read a recurrent state (models.md 4.4, 5): x' = x + W_O [A ; B].

A is the plain layer's windowed self-attention and B the tokens' cross-attention (second query Q2, scale
s2; no mask, bias or dropout) to the keys and values K_s, V_s of a state c; W_O widens to 2H heads -> d.
`StateReadingLayer` is that token side. The block-recurrent cell extends it with the state's own update
(lrexp.layers.recurrent); registered alone as kind "feedback" it is every non-recurrent layer of a Feedback
row, which the model runs block by block, handing each block the recurrent layer's K_s, V_s of c_t.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

import torch
from torch import Tensor

from lrexp.attention import HeadScale, MaskSpec, attend, l2_normalize, sliding_window_attention
from lrexp.layers import LayerSpec, register_layer
from lrexp.layers.block import AttentionLayer
from lrexp.layers.common import linear, merge_heads, split_heads
from lrexp.state import XLCache

if TYPE_CHECKING:
    from lrexp.config import RunConfig

UNMASKED = MaskSpec(causal=False)  # B, P and R: every key visible, no position bias, no dropout (4.3)


class StateReadingLayer(AttentionLayer):
    """A sliding-window layer plus B; `layer(x, state, feedback=(K_s, V_s)) -> (x, new_cache)`."""

    def __init__(self, spec: LayerSpec, cfg: "RunConfig", backend: str) -> None:
        if spec.window is None:
            raise ValueError(f"a '{spec.kind}' layer needs a window (its block length)")
        super().__init__(spec, cfg, backend)
        m = cfg.model
        self.wq2 = linear(m.d_model, m.d_model)  # Q2: the tokens' query into the state
        self.scale2 = HeadScale(m.num_heads, m.attn.scale_abs)  # s2, for B
        self.wo = linear(2 * m.d_model, m.d_model)  # W_O over [A ; B]: 2H heads -> d

    def attend_tokens(self, x: Tensor, state: XLCache) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """A [B, H, T, D] over the window, with the second query q2 and the keys/values k, v [B, H, T, D]."""
        w = self.window
        h = self.qkv.norm_input(x)  # [B, T, d]
        q, k, v = self.qkv.project(h)  # [B, H, T, D] each
        q2 = l2_normalize(split_heads(self.wq2(h), self.num_heads))  # [B, H, T, D]
        a = sliding_window_attention(
            q, k, v, state.k, state.v, window=w, bias=self.rel_bias(), scale=self.scale(),
            include_self=self.include_self, prev_valid=~state.fresh if self.mask_empty_cache else None,
            backend=self.backend, dropout_p=self.dropout if self.training else 0.0,
        )  # [B, H, T, D]
        return a, q2, k, v

    def read_state(self, x: Tensor, a: Tensor, q2: Tensor, k_s: Tensor, v_s: Tensor) -> Tensor:
        """x + W_O [A ; B] [B, T, d], block t's queries reading the state keys k_s, v_s [B*nb, H, S, D]
        (lane-major: lane b's block t at b*nb + t)."""
        b, hd, t, dh = q2.shape
        blocks = t // self.window
        q2 = q2.reshape(b, hd, blocks, self.window, dh).transpose(1, 2).flatten(0, 1)  # [B*nb, H, W, D]
        cross = attend(q2, k_s, v_s, UNMASKED, scale=self.scale2(), backend=self.backend)  # [B*nb, H, W, D]
        cross = cross.reshape(b, blocks, hd, self.window, dh).transpose(1, 2).reshape(b, hd, t, dh)  # [B, H, T, D]
        return x + self.wo(merge_heads(torch.cat([a, cross], dim=1)))  # [B, T, d]; [A ; B] along the head axis

    def forward(
        self, x: Tensor, state: XLCache, feedback: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[Tensor, XLCache]:
        if feedback is None or x.shape[1] != self.window:
            raise ValueError("a feedback layer runs one block at a time with the state's keys: the model's job")
        a, q2, k, v = self.attend_tokens(x, state)
        y = self.read_state(x, a, q2, *feedback)
        return self.ffn(y), state.advance(k, v)


register_layer("feedback", StateReadingLayer)
