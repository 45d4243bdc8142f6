"""Decode a Full / XL / Slide model as a bounded multi-state RNN, through its own layers (docs/cache-policies.md#formalism, docs/cache-policies.md#block-mode).

Each step takes b tokens of every lane (b = 1: token mode, the reference; b > 1: block mode). In every layer,
with the layer's own projections, bias table, scale, W_O and FFN (`AttentionLayer.output`):

1. the step's queries attend over [zero rows; kept rows; the step's own rows], each key at its distance;
   exclude-self (the default) hides a query's own row, include-self shows it;
2. the policy observes the probabilities of the real rows and scores them (fp32, per lane);
3. the step's rows are appended, rows past the context T_eval expire, and the multi-state evicts down to C.

Visibility. A real row is visible to a query iff it is kept, precedes the query (or is the query, under
include-self) and lies within T_eval: the trained window W is lifted to T_eval, whose default W makes the
`full` policy the native model. The zero K/V rows an XL cache holds at a document start (with
`attn.mask_empty_cache=false`) are outside the multi-state: never counted, never evicted, visible at their
original distances as in the native model. Under exclude-self the newest row has no score yet and is
protected for one step. In block mode a query sees the step's earlier rows too; for the FIFO policies
(`exact_block`) each query sees exactly the rows token mode would hold at it, so block mode equals token mode;
for the scored ones (H2O, TOVA) the eviction waits for the end of the block, an approximation.

Positions (`policy.positions`): `original` distances, or `cache_relative`, the kept real rows re-indexed in
temporal order with the query next (StreamingLLM's pos-shift); zero rows keep their original distances.

Settings in one pass. One policy at several budgets runs as G groups of the B lanes (lane g*B + b reads lane
b's tokens under budget g), each lane with its own cap: the per-step cost of a small batch is mostly fixed,
so G budgets cost little more than one. Every lane is independent (per-lane scores, caps and sets).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, List, Sequence, Tuple, Union

import torch
from torch import Tensor

from lrexp.attention.rows import attend_rows
from lrexp.cache.multistate import EMPTY, KVRows, evict
from lrexp.cache.policy import Policy, PolicyError
from lrexp.layers.block import AttentionLayer
from lrexp.lit.metrics import token_nll


@dataclass(frozen=True)
class DecodeState:
    rows: Tuple[KVRows, ...]  # per layer
    next_pos: Tensor  # [B] int64: the next token's position since the lane's reset

    def reset_rows(self, lanes: Tensor) -> "DecodeState":
        return DecodeState(rows=tuple(r.reset_rows(lanes) for r in self.rows),
                           next_pos=self.next_pos.masked_fill(lanes.to(self.next_pos.device), 0))

    def lanes(self, index) -> "DecodeState":
        """The lanes `index` (a slice or an index tensor) selects."""
        return DecodeState(rows=tuple(r.lanes(index) for r in self.rows), next_pos=self.next_pos[index])

    def narrow(self, lanes: int, groups: int) -> "DecodeState":
        """The first `lanes` lanes of each of `groups` equal groups: an evaluation batch that shrinks."""
        per_group = self.next_pos.shape[0] // groups
        index = (torch.arange(groups)[:, None] * per_group + torch.arange(lanes)[None, :]).flatten()
        return self.lanes(index.to(self.next_pos.device))


def holds_kv_caches(model) -> bool:
    """Whether every layer holds a plain KV cache (Full, XL, Slide), the one kind the policies apply to."""
    return all(s.kind == "attention" for s in model.specs)


def check_model(model) -> None:
    """A one-line error unless `holds_kv_caches` (docs/cache-policies.md#formalism: Rec, Feedback and Memorizing rows update their state
    or memory from whole blocks or segments, which eviction is undefined against)."""
    if not holds_kv_caches(model):
        other = sorted({s.kind for s in model.specs if s.kind != "attention"})
        raise PolicyError(f"cache policies apply to models whose layers hold plain KV caches (Full, XL, Slide); "
                          f"this one has {', '.join(other)} layers, whose state or memory reads whole blocks")


class BoundedDecoder:
    """`decoder.run(tokens, state, doc_start)` -> logits, query positions, state: a model under one policy at
    one or more budgets (the settings; see the module's docstring)."""

    def __init__(self, model, policies: Union[Policy, Sequence[Policy]], context: int, block: int = 1,
                 positions: str = "original", check_visible: bool = True) -> None:
        check_model(model)
        if context < 1 or block < 1:
            raise PolicyError(f"the context ({context}) and the block size ({block}) must be >= 1")
        self.policies = [policies] if isinstance(policies, Policy) else list(policies)
        policy = self.policy = self.policies[0]  # the behaviour the settings share
        if any(type(p) is not type(policy) or p.knobs != policy.knobs for p in self.policies):
            raise PolicyError("settings decoded together must be one policy with one set of knobs")
        self.model = model
        self.context = context
        self.block = block
        self.positions = positions
        self.check_visible = check_visible
        self.layers: List[AttentionLayer] = list(model.layers)
        self.include_self = self.layers[0].include_self
        self.near = 0 if self.include_self else 1  # the nearest visible distance
        # rows kept between steps: the budget, and never more than the context can show; slots: the largest
        caps = [context if p.budget is None else min(p.budget, context) for p in self.policies]
        self.caps = torch.tensor(caps)  # [G]
        self.slots = max(caps)
        self.budgets = torch.tensor([context if p.budget is None else p.budget for p in self.policies])  # [G]
        self.recent = torch.tensor([p.recent for p in self.policies])  # [G]
        # Window and the topline evict the oldest rows whatever the scores: the tie rule's sort is a slice there
        self.fifo = policy.budget is None or (policy.exact_block and policy.pinned == 0)
        # a layer without a window (the Full row) carries nothing from one segment to the next
        self.resets_every_segment = all(layer.window is None for layer in self.layers)

    @property
    def groups(self) -> int:
        return len(self.policies)

    def initial_state(self, batch_size: int, device) -> DecodeState:
        """Every lane of every setting empty: G x batch_size lanes."""
        lanes = self.groups * batch_size
        rows = tuple(KVRows.empty(lanes, layer.num_heads, self.slots, layer.head_dim, device) for layer in self.layers)
        return DecodeState(rows=rows, next_pos=torch.zeros(lanes, dtype=torch.int64, device=device))

    def cache_bytes_per_lane(self, setting: int) -> int:
        """What setting g's multi-state takes per lane: fp32 K and V of its C rows in every layer and head,
        and their fp32 scores when the policy keeps them."""
        per_row = 4 * sum(layer.num_heads * (2 * layer.head_dim + int(self.policy.observes)) for layer in self.layers)
        return int(self.caps[setting]) * per_row

    @torch.no_grad()
    def run(self, tokens: Tensor, state: DecodeState, doc_start: Tensor) -> Tuple[Tensor, Tensor, DecodeState]:
        """Logits [G, B, N, V] (setting g, lane b) and query positions [B, N] of one segment tokens [B, N];
        the lanes flagged in doc_start [B] (every lane, for a Full row) start from an empty multi-state."""
        g, (b_lanes, n) = self.groups, tokens.shape
        steps = list(self._steps(tokens, state, doc_start))
        logits = torch.cat([s[0] for s in steps], 1).view(g, b_lanes, n, -1)
        return logits, torch.cat([s[1] for s in steps], 1), steps[-1][2]

    @torch.no_grad()
    def score(self, tokens: Tensor, labels: Tensor, mask: Tensor, state: DecodeState,
              doc_start: Tensor) -> Tuple[Tensor, Tensor, DecodeState]:
        """`run` scored step by step: NLL [G, B, N] (0 where mask [B, N] is false) of labels [B, N], query
        positions [B, N] and the state, never holding more than one step's logits (G x B x b x V)."""
        g, b_lanes = self.groups, tokens.shape[0]
        nll, positions, start = [], [], 0
        for logits, qpos, state in self._steps(tokens, state, doc_start):
            b = qpos.shape[1]
            at = slice(start, start + b)
            start += b
            nll.append(token_nll(logits, labels[:, at].repeat(g, 1), mask[:, at].repeat(g, 1)).view(g, b_lanes, b))
            positions.append(qpos)
        return torch.cat(nll, 2), torch.cat(positions, 1), state

    def _steps(self, tokens: Tensor, state: DecodeState, doc_start: Tensor) -> Iterator[Tuple[Tensor, Tensor, DecodeState]]:
        """Per step: logits [G*B, b, V] (setting-major), query positions [B, b], the state after it."""
        g, b_lanes = self.groups, tokens.shape[0]
        reset = torch.ones_like(doc_start) if self.resets_every_segment else doc_start
        state = state.reset_rows(reset.repeat(g))
        tokens = tokens.repeat(g, 1)  # [G*B, N]: setting-major
        lanes = {name: t.to(tokens.device).repeat_interleave(b_lanes)  # [G*B] each
                 for name, t in (("caps", self.caps), ("budgets", self.budgets), ("recent", self.recent))}
        for block in tokens.split(self.block, dim=1):  # [G*B, b]
            qpos = state.next_pos[:, None] + torch.arange(block.shape[1], device=block.device)  # [G*B, b]
            x = self.model.embed(block)  # [G*B, b, d]
            rows = []
            for layer, kept in zip(self.layers, state.rows):
                x, kept = self._layer_step(layer, kept, x, qpos, lanes)
                rows.append(kept)
            state = DecodeState(rows=tuple(rows), next_pos=qpos[:, -1] + 1)
            yield self.model.logits(x), qpos[:b_lanes], state  # [G*B, b, V]

    def _layer_step(self, layer: AttentionLayer, kept: KVRows, x: Tensor, qpos: Tensor,
                    lanes: dict) -> Tuple[Tensor, KVRows]:
        b_lanes, b = qpos.shape
        q, k, v = layer.qkv(x)  # [B, H, b, D] each
        heads = q.shape[1]
        rows = kept.append(k, v, qpos[:, None, :].expand(b_lanes, heads, b))  # [B, H, n + b, ...]
        dist = qpos[:, None, :, None] - rows.pos[:, :, None, :]  # [B, H, b, n + b]
        visible = rows.valid[:, :, None, :] & (dist >= self.near) & (dist <= self.context - 1 + self.near)
        exact = self.policy.exact_block and self.policy.budget is not None
        if exact:
            # token mode holds, at each query, the pinned rows still in context and the most recent others up
            # to C in all (the query itself too, under include-self)
            pinned = rows.valid[:, :, None, :] & (rows.pos[:, :, None, :] < self.policy.pinned)  # [B, H, 1, n + b]
            recent = lanes["budgets"][:, None, None, None] - (visible & pinned).sum(-1, keepdim=True)  # [B, H, b, 1]
            visible &= (dist <= recent) | pinned
        if self.check_visible:  # docs/cache-policies.md#formalism: a query never sees more real rows than the multi-state may hold
            most = lanes["caps"] + (1 - self.near if exact else b - self.near)  # [B]
            if bool((visible.sum(-1) > most[:, None, None]).any()):
                raise RuntimeError("a query sees more real rows than its policy's budget allows")
        n_real = dist
        if self.positions == "cache_relative":
            # rank among the visible rows from the newest: the newest previous row is 1 away (self: 0)
            n_real = visible.long().flip(-1).cumsum(-1).flip(-1) - (1 - self.near)  # [B, H, b, n + b]
        keys, values, distance, shown = rows.k, rows.v, n_real, visible
        zero_rows = 0 if layer.window is None or layer.mask_empty_cache else layer.window
        if zero_rows:  # the reset XL cache: zero K/V at positions -W .. -1, at their original distances
            zdist = qpos[:, None, :, None] + torch.arange(zero_rows, 0, -1, device=qpos.device)  # [B, 1, b, Z]
            zdist = zdist.expand(b_lanes, heads, b, zero_rows)
            zeros = rows.k.new_zeros(b_lanes, heads, zero_rows, rows.k.shape[-1])  # [B, H, Z, D]
            keys, values = torch.cat([zeros, keys], 2), torch.cat([zeros, values], 2)
            distance = torch.cat([zdist, distance], -1)
            shown = torch.cat([zdist <= zero_rows - 1 + self.near, shown], -1)
        o, probs = attend_rows(q, keys, values, distance, shown, layer.rel_bias(), layer.scale())  # [B, H, b, ...]
        if self.policy.observes:
            observed = probs[..., zero_rows:]  # [B, H, b, n + b]: the real rows only
            if self.policy.granularity == "layer":
                observed = observed.mean(1, keepdim=True).expand_as(observed)  # one kept set per layer
            rows = replace(rows, score=self.policy.scores(rows.score, observed))
        last = qpos[:, -1][:, None, None]  # [B, 1, 1]
        expired = last + 1 - rows.pos > self.context - 1 + self.near  # the next query cannot see them
        rows = replace(rows, pos=rows.pos.masked_fill(expired & rows.valid, EMPTY))
        caps = lanes["caps"]
        if self.fifo:  # rows stay in temporal order, empty slots first: the newest are what evict keeps
            kept = rows.take_last(self.slots)
            dropped = torch.arange(self.slots, device=caps.device) < (self.slots - caps)[:, None, None]  # [B, 1, slots]
            return layer.output(x, o), replace(kept, pos=kept.pos.masked_fill(dropped, EMPTY))
        valid = rows.valid
        protected = valid & (rows.pos < self.policy.pinned)
        if bool((lanes["recent"] > 0).any()):
            protected |= valid & (rows.pos > last - lanes["recent"][:, None, None])
        if not self.include_self or self.policy.knobs.protect_newest:
            protected |= rows.pos == last  # exclude-self: the newest row has no score yet
        return layer.output(x, o), evict(rows, self.slots, protected, caps)
