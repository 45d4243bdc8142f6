"""Model FLOPs of one training step, counted from the layer specs: the numerator of model FLOP utilisation.

Model FLOPs are the work the model's definition needs, not what a kernel executes: a windowed query sees W
keys (the band), although the tiled attention computes scores for 2W and masks half; a dense causal query
sees the keys up to itself. A multiply-add is 2 FLOPs. Per lane and segment of T tokens:

- matmuls: every `nn.Linear` over the rows it maps (T tokens; in a recurrent cell the state module and the
  update map S states once per block), and the tied logits 2 T d V;
- attention: 4 d per (query, visible key) pair, QK^T and AV over all heads (H x D = d): the band T W of a
  windowed layer, T (T +- 1) / 2 of a dense one, T S for the tokens reading a state, S S and S x (2W or W)
  for the state's own P and R per block, T k for the kNN memory's retrieved entries;
- search: the kNN memory's selection scores every slot, 2 d per (query, slot): forward only (stop-gradient).

A training step is forward + backward, 3x the forward's matmuls and attention (the backward computes two
products per forward product) plus the search once. Elementwise work (norms, softmax, gates) is not counted,
by the usual convention. `tests/unit/test_flops.py` checks the matmul count against torch's FLOP counter.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lrexp.layers.block import AttentionLayer
from lrexp.layers.feedback import StateReadingLayer
from lrexp.layers.memorizing import MemorizingLayer
from lrexp.layers.recurrent import RecurrentLayer


@dataclass(frozen=True)
class Flops:
    """Forward FLOPs of one segment over every lane, by kind."""

    matmul: int
    attention: int
    search: int

    @property
    def train_step(self) -> int:
        """Forward + backward: the differentiable work three times, the stop-gradient search once."""
        return 3 * (self.matmul + self.attention) + self.search


def linear_flops(module: nn.Module) -> int:
    """FLOPs of mapping one row through every nn.Linear inside `module`."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _layer(layer: nn.Module, t: int, d: int, states: int) -> tuple[int, int, int]:
    """(matmul, attention, search) FLOPs of one layer over one lane's segment of t tokens; `states`: S of the
    stack's recurrent cell, which a Feedback row's other layers read."""
    pair = 4 * d
    if isinstance(layer, RecurrentLayer):
        blocks, s = t // layer.window, layer.num_states
        state_side = linear_flops(layer.state) + linear_flops(layer.update)
        matmul = (linear_flops(layer) - state_side) * t + state_side * s * blocks
        keys_r = 2 * layer.window if layer.reads_prev_block else layer.window
        attention = pair * (t * layer.window + t * s + blocks * s * (s + keys_r))  # A, B; P and R per block
        return matmul, attention, 0
    matmul = linear_flops(layer) * t
    if isinstance(layer, StateReadingLayer):  # a Feedback row's other layers: A and B
        return matmul, pair * (t * layer.window + t * states), 0
    if isinstance(layer, MemorizingLayer):
        return matmul, pair * (t * layer.window + t * layer.k), 2 * d * t * layer.memory_size
    if isinstance(layer, AttentionLayer):
        if layer.window is not None:
            return matmul, pair * t * layer.window, 0
        pairs = t * (t + 1) // 2 if layer.include_self else t * (t - 1) // 2
        return matmul, pair * pairs, 0
    raise TypeError(f"no FLOP count for layer {type(layer).__name__}")


def forward_flops(model: nn.Module, lanes: int, segment_len: int) -> Flops:
    """Forward FLOPs of a `LongRangeLM` over `lanes` segments of `segment_len` tokens."""
    d = model.embed.embedding_dim
    matmul = 2 * segment_len * d * model.vocab_size  # tied logits
    attention = search = 0
    states = next((layer.num_states for layer in model.layers if isinstance(layer, RecurrentLayer)), 0)
    for layer in model.layers:
        m, a, s = _layer(layer, segment_len, d, states)
        matmul, attention, search = matmul + m, attention + a, search + s
    return Flops(lanes * matmul, lanes * attention, lanes * search)
