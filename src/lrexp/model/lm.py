"""`LongRangeLM`: embed -> layers built from per-layer specs -> norm -> tied logits (docs/models.md#shared-backbone).

Layer interface. Every layer module built by `lrexp.layers.build_layer` provides

    layer.initial_state(batch_size, device) -> LayerState | None    every lane fresh; None: stateless
    layer(x, state) -> (x, new_state)                               x [B, T, d]; state as above

The state passed in is the one `initial_state` describes (same kind and shapes), possibly reset
(`fresh` lanes) and carried from the previous segment; the layer returns the state for the next one. The
model detaches the whole state once, at the segment's end: that is the truncated-BPTT boundary, and the
only one (inside a segment the previous block's keys and the recurrent state carry gradient). The model
checks kinds and shapes against `initial_state` before running, so a layer never sees a state built for
another model or batch. Layers run one after the other over the whole segment; nothing is stored on a
module between calls.

What a segment measures for the training log comes back in the new state's `stats`: the boundary
compression's energy and error every segment, and, with `measure=True`, what a layer kind that measures
itself reports (`layer.stats_prefix` set: the kNN memory's retrieval), from
`layer(x, state, stats={})`, which fills the dict.

At that boundary the carried state may be compressed to rank k (`model.svd_state`, lrexp.svd_state) and is
stored in `model.state_dtype` (docs/knobs.md#state-storage-dtype): layers read it upcast to fp32, so within a segment the carry
stays in the compute dtype and only the state kept between steps is reduced.

Feedback stacks (a "feedback" layer in the specs) run block by block instead (docs/models.md#feedback): before block t
the recurrent layer's state module projects c_t once, every feedback layer reads its K_s, V_s through
`layer(x, state, feedback=(K_s, V_s))`, and the recurrent layer takes the projection as `projected=`.
The states carry gradient from block to block within the segment, as the tiled layers' do.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Dict, List, Tuple, Union

import torch
from torch import Tensor, nn

from lrexp.attention import resolve_backend
from lrexp.errors import UserError
from lrexp.layers import LayerSpec, build_layer
from lrexp.layers.common import RMSNorm
from lrexp.model.state import STATE_DTYPES, ModelState, StateError
from lrexp.model.svd_state import compress
from lrexp.model.variants import layer_specs

if TYPE_CHECKING:
    from lrexp.config.schema import RunConfig


class ModelInputError(UserError, ValueError):
    """Tokens the model cannot take: wrong dtype, shape, or ids outside the vocabulary."""


class LongRangeLM(nn.Module):
    def __init__(self, cfg: "RunConfig", vocab_size: int, specs: List[LayerSpec]) -> None:
        super().__init__()
        m = cfg.model
        if vocab_size <= 0:
            raise ModelInputError(f"vocab_size must be > 0, got {vocab_size}")
        self.vocab_size = vocab_size
        self.specs = tuple(specs)
        self.backend = resolve_backend(m.attn.backend)
        self.embed = nn.Embedding(vocab_size, m.d_model)
        nn.init.normal_(self.embed.weight, std=1.0)  # E ~ N(0, 1), not scaled on input (3.8)
        self.layers = nn.ModuleList(build_layer(spec, cfg, self.backend) for spec in specs)
        self.norm_f = RMSNorm(m.d_model)
        self.drop_out = nn.Dropout(m.dropout)
        self.state_dtype = STATE_DTYPES[m.state_dtype]
        self.svd_state = m.svd_state if m.svd_state.rank is not None else None
        windows = {s.window for s in specs if s.window is not None}
        self.segment_multiple = math.lcm(*windows) if windows else 1
        self.feedback_source = None  # index of the recurrent layer whose state the feedback layers read
        if any(s.kind == "feedback" for s in specs):
            cells = [i for i, s in enumerate(specs) if s.kind == "recurrent"]
            if len(cells) != 1 or len(windows) != 1:
                raise ModelInputError("a feedback stack needs exactly one recurrent layer and one window")
            self.feedback_source = cells[0]

    def set_window(self, window: int) -> None:
        """W of every windowed layer, and so of the XL caches they carry: a curriculum stage's (docs/knobs.md#window-curriculum).
        No parameter depends on W (the T5 bias is by distance), so the stages train one set of weights; a
        state of another W no longer fits and is refused by the shape check."""
        windowed = [layer for layer in self.layers if layer.window is not None]
        for layer in windowed:
            layer.window = window
        self.segment_multiple = window if windowed else 1

    def initial_state(self, batch_size: int, device: torch.device | str) -> ModelState:
        """Every lane fresh, as at the start of a document."""
        return ModelState(
            layers=tuple(layer.initial_state(batch_size, device) for layer in self.layers), batch_size=batch_size
        ).cast(self.state_dtype)

    def _check_inputs(self, tokens: Tensor, state: ModelState) -> None:
        if not isinstance(tokens, Tensor) or tokens.dtype != torch.int64 or tokens.dim() != 2:
            what = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ModelInputError(f"tokens must be an int64 tensor [batch, segment_len], got {what}")
        b, t = tokens.shape
        if t == 0 or t % self.segment_multiple:
            raise ModelInputError(
                f"segment length {t} is not a positive multiple of the window {self.segment_multiple}"
            )
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ModelInputError(
                f"token ids must be in [0, {self.vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]"
            )
        if not isinstance(state, ModelState):
            raise StateError(f"state must be a ModelState (model.initial_state), got {type(state).__name__}")
        if state.batch_size != b:
            raise StateError(f"the state was built for batch size {state.batch_size}, the tokens have {b} lanes")
        if len(state.layers) != len(self.layers):
            raise StateError(f"the state has {len(state.layers)} layers, the model {len(self.layers)}")
        for i, (layer, s) in enumerate(zip(self.layers, state.layers)):
            want = layer.initial_state(b, "meta")
            if type(s) is not type(want):
                raise StateError(f"layer {i} carries {type(want).__name__}, the state has {type(s).__name__}")
            if want is not None:
                have = {k: tuple(v.shape) for k, v in s.to_tensors().items()}
                need = {k: tuple(v.shape) for k, v in want.to_tensors().items()}
                if have != need:
                    raise StateError(f"layer {i}'s {s.kind} state has shapes {have}, this model needs {need}")

    def forward(self, tokens: Tensor, state: ModelState, measure: bool = False) -> Tuple[Tensor, ModelState]:
        """logits [B, T, V] of tokens [B, T] int64, and the state after this segment, whose `stats` hold the
        layers' own measurements too when `measure` (they cost work: the trainer asks on its logging steps)."""
        self._check_inputs(tokens, state)
        state = state.cast(torch.float32)  # stored in model.state_dtype, computed with in fp32
        return self._segment(tokens, state, measure)

    def compile(self, *args, **kwargs) -> None:
        """`torch.compile` the segment's work (`train.compile`) in place. The input checks stay eager: they read
        token values, a graph break each. Parameters and state_dict keys are unchanged."""
        self._segment = torch.compile(self._segment, *args, **kwargs)

    def _segment(self, tokens: Tensor, state: ModelState, measure: bool) -> Tuple[Tensor, ModelState]:
        x = self.embed(tokens)  # [B, T, d]; no dropout on the embedding (3.7)
        stats: Dict[str, Union[Tensor, float]] = {}
        if self.feedback_source is None:
            new_layers = []
            for i, (layer, s) in enumerate(zip(self.layers, state.layers)):
                if measure and layer.stats_prefix is not None:
                    measured: Dict[str, float] = {}
                    x, s = layer(x, s, stats=measured)
                    stats.update({f"{layer.stats_prefix}{i}/{name}": value for name, value in measured.items()})
                else:
                    x, s = layer(x, s)
                new_layers.append(s)
        else:
            x, new_layers = self._block_serial(x, list(state.layers))
        carried = ModelState(layers=tuple(new_layers), batch_size=state.batch_size).detach()
        if self.svd_state is not None:
            carried, compressed = compress(carried, self.svd_state)
            stats.update({f"svd/{name}": value for name, value in compressed.items()})
        return self.logits(x), replace(carried.store(self.state_dtype), stats=stats)

    def logits(self, x: Tensor) -> Tensor:
        """Logits [B, T, V] of the last layer's output x [B, T, d]: final norm, then the tied embedding."""
        h = self.drop_out(self.norm_f(x))  # [B, T, d]
        # the 1/sqrt(V) scale on the d-wide side: one pass over [B, T, d] instead of two (forward and backward)
        # over the V-wide logits, the largest tensor of a step; equal up to float rounding
        return (h / math.sqrt(self.vocab_size)) @ self.embed.weight.t()  # [B, T, V]

    def _block_serial(self, x: Tensor, states: list) -> Tuple[Tensor, list]:
        """The whole stack on block t before any layer sees block t+1; x [B, T, d] -> [B, T, d]."""
        src = self.feedback_source
        cell = self.layers[src]
        states[src] = cell.begin_segment(states[src])
        outputs = []
        project = cell.state.stacked()  # the state module's maps stacked once for every block
        for xb in x.split(self.segment_multiple, dim=1):  # [B, W, d]
            projected = project(states[src].c)  # Q_s^h, K_s, V_s, Q_e^h of c_t
            for i, layer in enumerate(self.layers):
                if i == src:
                    xb, states[i] = layer(xb, states[i], projected=projected)
                else:
                    xb, states[i] = layer(xb, states[i], feedback=projected[1:3])
            outputs.append(xb)
        return torch.cat(outputs, dim=1), states


def build_model(cfg: "RunConfig", vocab_size: int) -> LongRangeLM:
    """The model of cfg's variant: its per-layer specs assembled into one LongRangeLM."""
    return LongRangeLM(cfg, vocab_size, layer_specs(cfg))
