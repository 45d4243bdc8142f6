"""Gated memory slots (kind "slots", docs/knobs.md#gated-memory-slots): a sliding-window layer that keeps n learned
slots M [n, d] per lane, written from every block through a gate and read by the block's tokens.

The slots are the block-recurrent cell (lrexp.layers.recurrent) with the options of `model.slots`, so they
share its state module, gates, topologies and scan rather than copying them:

- write, per block (no dropout): U = [SelfAttn(M) ; CrossAttn(slot queries -> block token K/V)], or the
  cross-attention alone (`self_attn=false`); z = W_o U; M' = Gate(M, z, h = U) (`gate`: fixed or lstm;
  `ffn=true` adds the dual topology's FFN and second gate); the tokens read are the previous and current
  block, or the current one (`token_keys`);
- read: `cross_attn` is BRT's vertical path (B, concatenated head-wise with the window before W_O);
  `prefix_kv` puts the slot keys and values in front of every query's window keys, one softmax, no bias;
- M starts a document at its learned initial value (std 0.1); the slot IDs are N(0, 1). The carry is a
  `SlotState`: the model resets it per document and detaches it at the segment's end, like every state.

With n = S, cross_attn, self_attn, fixed, ffn=false and prev_and_current, a layer of slots is the Rec
rows' fixed:skip cell, parameter for parameter (tested).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lrexp.layers.recurrent import CellOptions, RecurrentLayer
from lrexp.layers.registry import register_layer
from lrexp.model.state import SlotState

if TYPE_CHECKING:
    from lrexp.config.schema import RunConfig


class SlotLayer(RecurrentLayer):
    """`layer(x, state) -> (x, new_state)` with state a `SlotState`."""

    state_type = SlotState

    @staticmethod
    def options(cfg: "RunConfig") -> CellOptions:
        s = cfg.model.slots
        return CellOptions(
            num_states=s.n, gate=s.gate, topology="dual" if s.ffn else "skip", state_ids=True,
            candidate_tanh=False, reads_prev_block=s.token_keys == "prev_and_current", always_clear_state=False,
            self_attn=s.self_attn, read=s.read,
        )


register_layer("slots", SlotLayer)
