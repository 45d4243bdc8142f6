"""The block-recurrent cell (kind "recurrent", docs/models.md#block-recurrent-transformer): a sliding-window layer whose attention also
reads, and block by block rewrites, S state vectors per lane.

Two projection modules share their keys and values between two directions:

- token module (the layer's own Q/K/V plus Q2, from h = Drop(LN(x))): Q_e^v, K_e, V_e, Q_s^v;
- state module (`StateProjections`, from LN_s(c) + P, no dropout): Q_s^h, K_s, V_s, Q_e^h.

Vertical (tokens -> output), for block t: x' = x + W_O^v [A ; B] with A the windowed token self-attention
(T5 bias, dropout) and B the tokens' cross-attention to the state c_t before this block's update; then the
layer's FFN. Horizontal (state -> next state): u = [P ; R], P the states' self-attention and R their
cross-attention to the tokens of the previous and current block; c_{t+1} = update(c_t, u) (lrexp.layers.gates).

A does not depend on the state, so it runs over the whole segment at once, like a plain layer. Only the state
path is a scan over the N/W blocks, with gradient through the blocks of a segment; B then runs for every
block at once against the stacked per-block state keys. The layer's carry (`RecurrentState`) is its XL cache
and the state after the segment's last block; where a lane starts a document c is the learned c_init.

The cell is built from `CellOptions`; the Rec rows' cell reads them from `model.recurrent`. Gated memory
slots (lrexp.layers.slots) are this cell with options of their own: without P (`self_attn`), with u = R
alone, and with the state read as prefix keys instead of by B.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrexp.attention import HeadScale, MaskSpec, attend, l2_normalize
from lrexp.layers.common import RMSNorm, linear, merge_heads, split_heads
from lrexp.layers.feedback import UNMASKED, StateReadingLayer
from lrexp.layers.gates import build_update
from lrexp.layers.registry import LayerSpec, register_layer
from lrexp.model.flops import Flops, linear_flops
from lrexp.model.state import CellState, RecurrentState

if TYPE_CHECKING:
    from lrexp.config.schema import RunConfig

_C_INIT_STD = 0.1


@dataclass(frozen=True)
class CellOptions:
    """What a gated state cell is made of (docs/models.md#block-recurrent-transformer; docs/knobs.md#gated-memory-slots for the slots' choices)."""

    num_states: int  # S
    gate: str  # a name in lrexp.layers.gates.GATES
    topology: str  # a name in lrexp.layers.gates.TOPOLOGIES
    state_ids: bool
    candidate_tanh: bool
    reads_prev_block: bool  # R reads the previous and the current block (else the current one)
    always_clear_state: bool
    self_attn: bool = True  # P, the states' self-attention: u = [P ; R], else u = R
    read: str = "cross_attn"  # how the tokens read the state (lrexp.layers.feedback.READS)


class StateProjections(nn.Module):
    """The state module: h_s = LN_s(c) + P, then Q_s^h, K_s, V_s, Q_e^h, each [B, H, S, D] (keys and
    queries L2-normalised; Q_s^h None without the states' self-attention). P, the learned state IDs, tell
    weight-sharing states apart (4.2)."""

    def __init__(self, d_model: int, num_heads: int, num_states: int, state_ids: bool, self_attn: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = RMSNorm(d_model)
        self.ids = nn.Parameter(torch.randn(num_states, d_model)) if state_ids else None  # P [S, d], N(0, 1)
        self.wq = linear(d_model, d_model) if self_attn else None  # Q_s^h ("queries")
        self.wk = linear(d_model, d_model)
        self.wv = linear(d_model, d_model)
        self.wq2 = linear(d_model, d_model)  # Q_e^h ("queries2")

    def forward(self, c: Tensor) -> Tuple[Optional[Tensor], Tensor, Tensor, Tensor]:
        return self.stacked()(c)

    def stacked(self) -> Callable[[Tensor], Tuple[Optional[Tensor], Tensor, Tensor, Tensor]]:
        """The projection of a state c [B, S, d] with the three or four maps stacked into one weight, built
        once for the blocks of a segment: one matmul per block instead of four (gradients reach each map's
        weight through the stacking)."""
        maps = [m for m in (self.wq, self.wk, self.wv, self.wq2) if m is not None]
        weight = torch.cat([m.weight for m in maps], dim=0)  # [3d or 4d, d]

        def project(c: Tensor) -> Tuple[Optional[Tensor], Tensor, Tensor, Tensor]:
            h = self.norm(c)  # [B, S, d]
            if self.ids is not None:
                h = h + self.ids.to(h.dtype)  # the IDs join the projections' input only, never the state itself
            out = [split_heads(y, self.num_heads) for y in F.linear(h, weight).chunk(len(maps), dim=-1)]
            q_s = None if self.wq is None else l2_normalize(out.pop(0))  # [B, H, S, D]
            k_s, v_s, q_e = l2_normalize(out[0]), out[1], l2_normalize(out[2])  # [B, H, S, D] each
            return q_s, k_s, v_s, q_e

        return project


class RecurrentLayer(StateReadingLayer):
    """`layer(x, state) -> (x, new_state)` with state a `RecurrentState` (lrexp.model's layer interface).

    The token module is the state-reading layer's: Q/K/V, scale s (A), Q2 and s2 (B), T5 bias, the widened
    W_O^v and the FFN. The state module, c_init and the update are the cell's own."""

    state_type = RecurrentState  # the carry's kind

    @staticmethod
    def options(cfg: "RunConfig") -> CellOptions:
        r = cfg.model.recurrent
        return CellOptions(r.num_states, r.gate, r.topology, r.state_ids, r.candidate_tanh,
                           r.state_reads_prev_block, r.always_clear_state)

    def __init__(self, spec: LayerSpec, cfg: "RunConfig", backend: str) -> None:
        o = self.options(cfg)
        super().__init__(spec, cfg, backend, read=o.read)
        m, a = cfg.model, cfg.model.attn
        self.d_model = m.d_model
        self.num_states = o.num_states
        self.reads_prev_block = o.reads_prev_block
        self.always_clear_state = o.always_clear_state
        self.state = StateProjections(m.d_model, m.num_heads, o.num_states, o.state_ids, o.self_attn)
        self.state_scale = HeadScale(m.num_heads, a.scale_abs) if o.self_attn else None  # P
        self.state_scale2 = HeadScale(m.num_heads, a.scale_abs)  # R
        self.c_init = nn.Parameter(torch.randn(o.num_states, m.d_model) * _C_INIT_STD)  # [S, d]
        d_u = (2 if o.self_attn else 1) * m.d_model  # u = [P ; R] or R
        self.update = build_update(o.topology, o.gate, m.d_model, m.d_ff, o.candidate_tanh, d_u=d_u)

    def initial_state(self, batch_size: int, device) -> CellState:
        return self.state_type.initial(super().initial_state(batch_size, device), self.num_states, self.d_model)

    def begin_segment(self, state: CellState) -> CellState:
        """The carry as the segment's first block sees it: c_init where a lane starts a document, and in
        every lane under `always_clear_state` (the ablation where no state survives a segment boundary)."""
        if self.always_clear_state:
            c = self.c_init[None].expand(state.batch_size, -1, -1).to(state.c.dtype)  # [B, S, d]
        else:
            fresh = state.fresh.to(state.c.device)[:, None, None]  # [B, 1, 1]
            c = torch.where(fresh, self.c_init.to(state.c.dtype), state.c)  # [B, S, d]
        return replace(state, c=c)

    def flops(self, t: int, states: int) -> Flops:
        """The token side over T tokens, the state module and the update over S states once per block; A
        over the band T W, B over T S, and per block P (S S) and R (S keys of W or 2W tokens)."""
        blocks, s = t // self.window, self.num_states
        state_side = linear_flops(self.state) + linear_flops(self.update)
        matmul = (linear_flops(self) - state_side) * t + state_side * s * blocks
        keys_r = 2 * self.window if self.reads_prev_block else self.window
        return Flops(matmul, self.pair_flops * (t * self.window + t * s + blocks * s * (s + keys_r)))

    def forward(
        self, x: Tensor, state: CellState, projected: Optional[Tuple[Tensor, ...]] = None
    ) -> Tuple[Tensor, CellState]:
        """`projected`: the state module's output for the first block's c. A Feedback stack passes it: it
        runs the cell one block at a time, has begun the segment (`begin_segment`) before its first block,
        and hands the same K_s, V_s to the other layers."""
        if projected is None:
            state = self.begin_segment(state)
        h, q, k, v = self.project_tokens(x)  # h [B, T, d]; q, k, v [B, H, T, D]
        prev_valid = ~state.fresh if self.mask_empty_cache else None
        c, (k_s, v_s) = self._scan(state.c, k, v, state, prev_valid, projected)
        y = self.read_state(x, h, q, k, v, state, k_s, v_s)  # block t reads c_t, the state before its own update
        new_state = state.advance(k, v, c=c)
        return self.ffn(y), new_state

    def _scan(
        self, c: Tensor, k: Tensor, v: Tensor, state: CellState, prev_valid: Optional[Tensor],
        projected: Optional[Tuple[Tensor, ...]] = None,
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """The horizontal direction over the segment's blocks: c_0 [B, S, d] -> c_nb, and K_s, V_s of every
        c_t (t < nb) stacked lane-major [B*nb, H, S, D] for the vertical cross-attention B."""
        w = self.window
        k_prev, v_prev = state.k.to(k.dtype), state.v.to(v.dtype)  # [B, H, W, D]: block 0's previous block
        # per-block views taken once (their backward is one concatenation, not a full-size gradient per slice),
        # and what every block shares computed once: the scales and the state module's stacked weights
        k_blocks, v_blocks = k.split(w, dim=2), v.split(w, dim=2)  # nb x [B, H, W, D]
        scale_r = self.state_scale2()  # [H]
        scale_p = None if self.state_scale is None else self.state_scale()  # [H]
        project = self.state.stacked()
        keys, values = [], []
        for i, (k_cur, v_cur) in enumerate(zip(k_blocks, v_blocks)):
            q_s, k_s, v_s, q_e = projected if (i == 0 and projected is not None) else project(c)  # [B, H, S, D]
            keys.append(k_s)
            values.append(v_s)
            if self.reads_prev_block:  # docs/models.md#paper-and-code: the code reads previous + current block, unmasked
                k_e, v_e = torch.cat([k_prev, k_cur], dim=2), torch.cat([v_prev, v_cur], dim=2)  # [B, H, 2W, D]
                valid = None if (prev_valid is None or i > 0) else prev_valid[:, None].expand(-1, w)  # [B, W]
                mask = UNMASKED if valid is None else MaskSpec(causal=False, memory_valid=valid)
            else:
                k_e, v_e, mask = k_cur, v_cur, UNMASKED
            reads = [attend(q_e, k_e, v_e, mask, scale=scale_r, backend=self.backend)]  # R [B, H, S, D]
            if scale_p is not None:
                reads.insert(0, attend(q_s, k_s, v_s, UNMASKED, scale=scale_p, backend=self.backend))  # P
            u = merge_heads(torch.cat(reads, dim=1))  # [B, S, 2d] = [P ; R], or [B, S, d] = R
            c = self.update(c, u)  # [B, S, d]
            k_prev, v_prev = k_cur, v_cur
        k_s = torch.stack(keys, dim=1).flatten(0, 1)  # [B, nb, H, S, D] -> [B*nb, H, S, D]
        v_s = torch.stack(values, dim=1).flatten(0, 1)  # [B*nb, H, S, D]
        return c, (k_s, v_s)


register_layer("recurrent", RecurrentLayer)
