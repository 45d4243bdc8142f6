"""The token step: token mode (b = 1) over preallocated slots, in place (docs/cache-policies.md#token-step).

`BoundedDecoder` is the reference: every token and layer it appends the new row (a copy of every kept K/V
row) and sorts the rows on the tie rule's key. This decoder gives the same bits with a fixed slot layout:

- each layer holds S = C + 1 slots per lane and head in any order: the kept rows and one free slot, into
  which the next row is written in place (the XL reset cache's zero rows, when shown, sit in Z slots before
  them and are never written). An empty slot holds the position VOID, so far in the past that
  it is never visible and always expired: one distance test covers empty, expired and visible;
- a query attends over every slot under a visibility mask built from the stored positions (distances do not
  depend on slot order; `cache_relative` ranks the visible rows by comparing positions);
- after scoring, each lane and head evicts exactly one slot, the first row in the tie rule's order
  (docs/cache-policies.md#tie-rule): the smallest of (class, fp32 score), where expired and empty slots
  are below every score and protected rows above, then the oldest among equals. The reference's sort on the
  composite key (class, score, position) drops the same row first.

Settings in one pass. Every budgeted policy of one evaluation, at every budget, runs as G groups of the B
lanes (a group of lanes per setting, each reading the same tokens), each lane with its own knobs: score rule
(H2O accumulates, TOVA replaces, the FIFO policies keep 0), granularity, pinned rows and recent window. The
groups of one cap form a block with C + 1 slots; the model's projections, FFN and logits run once over all
lanes per step, the attention and eviction once per block. The knobs the settings share (positions,
include-self, protect-newest, T_eval) are the evaluation's.

`compile=True` runs the layer step under `torch.compile` (docs/cache-policies.md#token-step); eager is the
reference it is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from lrexp.cache.decode import check_model
from lrexp.cache.multistate import EMPTY
from lrexp.cache.policy import Policy, PolicyError
from lrexp.kernels.attention.reference import SINK_LOGIT
from lrexp.layers.block import AttentionLayer
from lrexp.lit.metrics import token_nll

VOID = -(2**30)  # the position of an empty slot: no query reaches it, every eviction takes it first
PROTECTED = 3.0e38  # a protected row's eviction score: above any sum of probabilities


@dataclass(frozen=True)
class SlotState:
    """Per layer: k [B, H, D, Z + S] (keys transposed, Z zero rows first), v [B, H, Z + S, D], pos [B, H, S]
    int32 (VOID on an empty slot), score [B, H, S] fp32, free [B, H] int64 (the slot the next row goes to);
    next_pos [B] int64."""

    k: Tuple[Tensor, ...]
    v: Tuple[Tensor, ...]
    pos: Tuple[Tensor, ...]
    score: Tuple[Tensor, ...]
    free: Tuple[Tensor, ...]
    next_pos: Tensor

    def reset_rows(self, lanes: Tensor) -> "SlotState":
        """Lanes flagged [B] lose every row and score (in place): a document reset."""
        lanes = lanes.to(self.next_pos.device)
        for pos, score, free in zip(self.pos, self.score, self.free):
            pos.masked_fill_(lanes[:, None, None], VOID)
            score.masked_fill_(lanes[:, None, None], 0.0)
            free.masked_fill_(lanes[:, None], 0)
        self.next_pos.masked_fill_(lanes, 0)
        return self

    def lanes(self, index) -> "SlotState":
        """The lanes `index` (a slice or an index tensor) selects, as new tensors."""
        return SlotState(*(tuple(t[index].clone() for t in field) for field in
                           (self.k, self.v, self.pos, self.score, self.free)), next_pos=self.next_pos[index].clone())

    def narrow(self, lanes: int, groups: int) -> "SlotState":
        """The first `lanes` lanes of each of `groups` equal groups: an evaluation batch that shrinks."""
        per_group = self.next_pos.shape[0] // groups
        index = (torch.arange(groups)[:, None] * per_group + torch.arange(lanes)[None, :]).flatten()
        return self.lanes(index.to(self.next_pos.device))


@dataclass(frozen=True)
class StepState:
    """The token step's state: a `SlotState` per block of settings that share a cap (S = cap + 1 slots each,
    `sizes` settings side by side)."""

    blocks: Tuple[SlotState, ...]
    sizes: Tuple[int, ...]

    def narrow(self, lanes: int, groups: int) -> "StepState":
        """The first `lanes` lanes of each setting: an evaluation batch that shrinks."""
        assert groups == sum(self.sizes)
        return StepState(tuple(b.narrow(lanes, n) for b, n in zip(self.blocks, self.sizes)), self.sizes)


class SlotDecoder:
    """`decoder.score(tokens, labels, mask, state, doc_start)`: token mode of a Full / XL / Slide model under
    any budgeted policies at any budgets (the settings), in one pass; `BoundedDecoder`'s interface. Inside,
    the settings are ordered by cap and those of one cap form a block with its own slot count, so a small
    budget never pays for a large one's slots."""

    def __init__(self, model, policies: Sequence[Policy], context: int, positions: str = "original",
                 compile: bool = False) -> None:
        check_model(model)
        self.policies = list(policies)
        if context < 1 or not self.policies or any(p.budget is None for p in self.policies):
            raise PolicyError("the token step takes budgeted policies and a context >= 1")
        if any(p.knobs != self.policies[0].knobs for p in self.policies):
            raise PolicyError("settings decoded together must share the policy knobs")
        self.model = model
        self.context = context
        self.positions = positions
        self.layers: List[AttentionLayer] = list(model.layers)
        self.include_self = self.layers[0].include_self
        self.reach = context - (1 if self.include_self else 0)  # the farthest visible distance
        # the newest row is kept one step: it has no score yet (exclude-self), or the knob says so
        newest = int(not self.include_self or self.policies[0].knobs.protect_newest)
        caps = [min(p.budget, context) for p in self.policies]
        self.caps = torch.tensor(caps)  # [G]
        self.order = sorted(range(len(caps)), key=lambda g: caps[g])  # internal position -> setting
        self.inverse = torch.tensor(sorted(range(len(caps)), key=lambda g: self.order[g]))  # setting -> position
        ordered = [self.policies[g] for g in self.order]
        self.blocks: List[Tuple[int, int, int]] = []  # (first position, end position, cap)
        for i, p in enumerate(ordered):
            if self.blocks and self.blocks[-1][2] == caps[self.order[i]]:
                self.blocks[-1] = (self.blocks[-1][0], i + 1, self.blocks[-1][2])
            else:
                self.blocks.append((i, i + 1, caps[self.order[i]]))
        self.knobs = {  # per setting in internal order [G]: the score rule as factors (x * 1 = x, x * 0 = 0)
            "accumulate": torch.tensor([float(p.accumulates) for p in ordered]),
            "observes": torch.tensor([float(p.observes) for p in ordered]),
            "per_layer": torch.tensor([p.granularity == "layer" for p in ordered]),
            "pinned": torch.tensor([p.pinned for p in ordered], dtype=torch.int32),
            # rows newer than the last `fresh` positions are protected: H2O's recent window, the newest row
            "fresh": torch.tensor([max(p.recent, newest) for p in ordered], dtype=torch.int32),
        }
        self.granularity = {bool(f) for f in self.knobs["per_layer"]}  # {True}: every setting per layer
        self.zero_rows = [0 if layer.window is None or layer.mask_empty_cache else layer.window for layer in self.layers]
        self.resets_every_segment = all(layer.window is None for layer in self.layers)
        self._layer_step: Callable = torch.compile(self._step) if compile else self._step

    @property
    def groups(self) -> int:
        return len(self.policies)

    def initial_state(self, batch_size: int, device) -> StepState:
        """Every lane of every setting empty: G x batch_size lanes."""
        return StepState(tuple(self._empty((end - first) * batch_size, cap + 1, device)
                               for first, end, cap in self.blocks),
                         tuple(end - first for first, end, _ in self.blocks))

    def _empty(self, lanes: int, s: int, device) -> SlotState:
        return SlotState(
            k=tuple(torch.zeros(lanes, layer.num_heads, layer.head_dim, z + s, device=device)
                    for layer, z in zip(self.layers, self.zero_rows)),
            v=tuple(torch.zeros(lanes, layer.num_heads, z + s, layer.head_dim, device=device)
                    for layer, z in zip(self.layers, self.zero_rows)),
            pos=tuple(torch.full((lanes, layer.num_heads, s), VOID, dtype=torch.int32, device=device)
                      for layer in self.layers),
            score=tuple(torch.zeros(lanes, layer.num_heads, s, device=device) for layer in self.layers),
            free=tuple(torch.zeros(lanes, layer.num_heads, dtype=torch.int64, device=device) for layer in self.layers),
            next_pos=torch.zeros(lanes, dtype=torch.int64, device=device))

    def kept(self, state: StepState, setting: int, layer: int) -> Tensor:
        """The positions setting g's layer `layer` holds for the next query [B, H, C + 1] int64, ascending,
        EMPTY first (the reference's layout, short of its slot count): expired rows and empty slots are EMPTY."""
        at = int(self.inverse[setting])
        block = next(i for i, (first, end, _) in enumerate(self.blocks) if first <= at < end)
        first, end, _ = self.blocks[block]
        rows = state.blocks[block]
        lanes = rows.next_pos.shape[0] // (end - first)
        index = slice((at - first) * lanes, (at - first + 1) * lanes)
        pos = rows.pos[layer][index].long()
        gone = (rows.next_pos[index, None, None] - pos > self.reach) | (pos == VOID)
        return pos.masked_fill(gone, EMPTY).sort(-1).values

    def cache_bytes_per_lane(self, setting: int) -> int:
        """What setting g's multi-state takes per lane: fp32 K and V of its C rows in every layer and head,
        and their fp32 scores when the policy keeps them."""
        observes = int(self.policies[setting].observes)
        per_row = 4 * sum(layer.num_heads * (2 * layer.head_dim + observes) for layer in self.layers)
        return int(self.caps[setting]) * per_row

    @torch.no_grad()
    def score(self, tokens: Tensor, labels: Tensor, mask: Tensor, state: StepState,
              doc_start: Tensor) -> Tuple[Tensor, Tensor, StepState]:
        """NLL [G, B, N] (0 where mask [B, N] is false) of labels [B, N], query positions [B, N] and the state
        after the segment tokens [B, N]; the lanes flagged in doc_start [B] (every lane, for a Full row) start
        from an empty multi-state. The state is advanced in place."""
        g, (b_lanes, n) = self.groups, tokens.shape
        nll = torch.empty(g, b_lanes, n, device=tokens.device)
        positions = torch.empty(b_lanes, n, dtype=torch.int64, device=tokens.device)
        for t, (logits, qpos) in enumerate(self._steps(tokens, state, doc_start)):
            nll[:, :, t] = token_nll(logits, labels[:, t:t + 1].repeat(g, 1), mask[:, t:t + 1].repeat(g, 1)).view(g, b_lanes)
            positions[:, t] = qpos
        return nll[self.inverse.to(nll.device)], positions, state

    @torch.no_grad()
    def run(self, tokens: Tensor, state: StepState, doc_start: Tensor) -> Tuple[Tensor, Tensor, StepState]:
        """Logits [G, B, N, V] (setting g, lane b) and query positions [B, N] of one segment tokens [B, N]."""
        g, (b_lanes, n) = self.groups, tokens.shape
        steps = list(self._steps(tokens, state, doc_start))
        logits = torch.cat([s[0] for s in steps], 1).view(g, b_lanes, n, -1)
        return logits[self.inverse.to(logits.device)], torch.stack([s[1] for s in steps], 1), state

    def _steps(self, tokens: Tensor, state: StepState, doc_start: Tensor):
        """Per token: logits [G*B, 1, V] (internal order, setting-major) and query positions [B]; `state`
        advances."""
        b_lanes, device = tokens.shape[0], tokens.device
        reset = torch.ones_like(doc_start) if self.resets_every_segment else doc_start
        blocks = []  # per block: its lanes, state, knobs per lane [lanes, 1, 1] and tables per layer
        for (first, end, cap), rows in zip(self.blocks, state.blocks):
            rows.reset_rows(reset.repeat(end - first))
            knobs = {name: t[first:end].to(device).repeat_interleave(b_lanes)[:, None, None] for name, t in self.knobs.items()}
            tables = [_Tables.of(layer, z, (end - first) * b_lanes, cap + 1) for layer, z in zip(self.layers, self.zero_rows)]
            blocks.append((slice(first * b_lanes, end * b_lanes), rows, knobs, tables))
        tokens = tokens.repeat(self.groups, 1)  # [G*B, N]: every setting reads the same tokens
        for t in range(tokens.shape[1]):
            qpos = state.blocks[0].next_pos[:b_lanes].clone()  # [B]
            x = self.model.embed(tokens[:, t:t + 1])  # [G*B, 1, d]
            for i, layer in enumerate(self.layers):
                q, k, v = layer.qkv(x)  # [G*B, H, 1, D] each
                outputs = []
                for lanes, rows, knobs, tables in blocks:
                    kb, vb, pos, score, free = rows.k[i], rows.v[i], rows.pos[i], rows.score[i], rows.free[i]
                    at = tables[i].base + free.flatten()  # [lanes * H]: the flat slot that takes the new row
                    here = rows.next_pos.int()  # [lanes]
                    _write(tables[i], kb, vb, pos, score, at, k[lanes], v[lanes], here)
                    o, new_score, drop = self._layer_step(tables[i], q[lanes], kb, vb, pos, score, at, here, knobs)
                    score.copy_(new_score)  # [lanes, H, S]
                    pos.view(-1).index_fill_(0, tables[i].base + drop.flatten(), VOID)  # the next free slot
                    free.copy_(drop)
                    outputs.append(o)
                x = layer.output(x, torch.cat(outputs, 0))  # [G*B, 1, d]
            for _, rows, _, _ in blocks:
                rows.next_pos.add_(1)
            yield self.model.logits(x), qpos

    def _step(self, tables: "_Tables", q: Tensor, kb: Tensor, vb: Tensor, pos: Tensor, score: Tensor, at: Tensor,
              qpos: Tensor, lanes: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """One layer of one token step over one block after the new row is written (flat slot `at` [B*H]),
        reading the state only: the attention output o [B, H, 1, D] of query q [B, H, 1, D] at positions
        qpos [B] int32, the rows' new scores [B, H, S] and the slot each lane and head evicts [B, H]."""
        b, h = q.shape[:2]
        z = tables.zero_rows
        dist = qpos[:, None, None] - pos  # [B, H, S]: VOID is always out of reach
        hidden = dist > self.reach
        if not self.include_self:  # the query's own row, the one at distance 0
            hidden = hidden.view(-1).index_fill(0, at, True).view(dist.shape)
        distance = dist
        if self.positions == "cache_relative":
            # rank among the visible rows from the newest (self: 0 under include-self, else 1 for the newest)
            later = (pos[:, :, None, :] >= pos[:, :, :, None]) & ~hidden[:, :, None, :]  # [B, H, S, S]
            distance = later.sum(-1) - int(self.include_self)
        if z:  # the reset XL cache: zero K/V at positions -Z .. -1, at their original distances
            zdist = (qpos[:, None, None] + tables.zero_offsets).expand(b, h, z)  # [B, H, Z]
            distance = torch.cat([zdist, distance], -1)
            hidden = torch.cat([zdist > z - 1 + int(not self.include_self), hidden], -1)
        probs = tables.probs(q, kb, distance, hidden)  # [B, H, Z + S]
        o = (probs[:, :, None, :] @ vb).to(q.dtype)  # [B, H, 1, D]
        observed = probs[:, :, z:]  # [B, H, S]: the real rows
        if self.granularity == {True}:
            observed = observed.mean(1, keepdim=True)  # [B, 1, S]: one kept set per layer
        elif len(self.granularity) > 1:
            observed = torch.where(lanes["per_layer"], observed.mean(1, keepdim=True), observed)
        score = score * lanes["accumulate"] + observed * lanes["observes"]  # [B, H, S]
        # eviction: expired and empty slots first (-1), protected rows last
        protected = (pos < lanes["pinned"]) | (pos > qpos[:, None, None] - lanes["fresh"])
        evict = score.masked_fill(protected, PROTECTED).masked_fill_(dist >= self.reach, -1.0)  # [B, H, S]
        first = evict == evict.amin(-1, keepdim=True)
        drop = torch.where(first, pos, torch.iinfo(torch.int32).max).argmin(-1)  # [B, H]: the oldest of them
        return o, score, drop


def _write(tables: "_Tables", kb: Tensor, vb: Tensor, pos: Tensor, score: Tensor, at: Tensor, k: Tensor, v: Tensor,
           qpos: Tensor) -> None:
    """The new rows k, v [B, H, 1, D] at positions qpos [B] into the flat slots `at` [B*H], in place; their
    scores start at 0."""
    h, d = k.shape[1], k.shape[-1]
    slot = at - tables.base  # [B*H]
    kb.view(-1).index_copy_(0, (tables.k_base + slot[:, None]).flatten(), k.reshape(-1))
    vb.view(-1, d).index_copy_(0, tables.v_base + slot, v.reshape(-1, d))
    pos.view(-1).index_copy_(0, at, qpos.repeat_interleave(h))
    score.view(-1).index_fill_(0, at, 0.0)


@dataclass(frozen=True)
class _Tables:
    """What one layer's steps over one batch share: flat slot offsets, the bias by distance and the scale."""

    zero_rows: int  # Z
    base: Tensor  # [B*H] the first flat slot of each lane and head in pos / score
    k_base: Tensor  # [B*H, D] the flat index of each lane, head and channel's first real slot in k
    v_base: Tensor  # [B*H] the flat row of each lane and head's first real slot in v
    zero_offsets: Tensor  # [Z] the zero rows' distances from position 0: Z .. 1
    bias: Optional[Tensor]  # [B, H, max_distance + 1] the T5 bias at each distance (a broadcast view)
    max_distance: int
    scale: Optional[Tensor]  # [H, 1]

    @classmethod
    def of(cls, layer: AttentionLayer, z: int, lanes: int, slots: int) -> "_Tables":
        h, d, width = layer.num_heads, layer.head_dim, z + slots
        spec = layer.rel_bias()
        lane_head = torch.arange(lanes * h)  # [B*H]
        k_base = (lane_head * d)[:, None] * width + torch.arange(d)[None, :] * width + z  # [B*H, D]
        scale = layer.scale()
        return cls(z, lane_head * slots, k_base, lane_head * width + z, torch.arange(z, 0, -1),
                   None if spec is None else spec.by_distance()[None].expand(lanes, h, spec.max_distance + 1),
                   0 if spec is None else spec.max_distance, None if scale is None else scale.float()[:, None])

    def probs(self, q: Tensor, kb: Tensor, distance: Tensor, hidden: Tensor) -> Tensor:
        """p [B, H, T] fp32 of the one query q [B, H, 1, D] over the slots kb [B, H, D, T] at `distance`,
        `hidden` [B, H, T]: `reference_probs`'s safe softmax, the same numbers on every visible slot, the
        hidden ones kept out of the exp rather than pushed to -1e6 (an exp that far below 0 is slow)."""
        logits = (q.float() @ kb)[:, :, 0]  # [B, H, T]
        if self.bias is not None:
            logits = logits + self.bias.gather(2, distance.clamp(0, self.max_distance).long())
        if self.scale is not None:
            logits = logits * self.scale
        m = logits.masked_fill(hidden, SINK_LOGIT).amax(-1, keepdim=True)  # [B, H, 1]: max(visible, -1000)
        e = torch.exp((logits - m).clamp_(max=0.0)).masked_fill_(hidden, 0.0)  # the clamp: no-op where visible
        return e / (e.sum(-1, keepdim=True) + torch.exp(SINK_LOGIT - m))
