"""Model FLOPs of one training step: the numerator of model FLOP utilisation.

Model FLOPs are the work the model's definition needs, not what a kernel executes: a windowed query sees W
keys (the band), although the tiled attention computes scores for 2W and masks half; a dense causal query
sees the keys up to itself. A multiply-add is 2 FLOPs. Per lane and segment of T tokens:

- matmuls: every `nn.Linear` over the rows it maps (T tokens; in a recurrent cell the state module and the
  update map S states once per block), and the tied logits 2 T d V;
- attention: 4 d per (query, visible key) pair, QK^T and AV over all heads (H x D = d);
- search: the kNN memory's selection scores every slot, 2 d per (query, slot): forward only (stop-gradient).

Each layer kind counts its own (`layer.flops(t, states)`, in lrexp.layers); `forward_flops` sums them.
A training step is forward + backward, 3x the forward's matmuls and attention (the backward computes two
products per forward product) plus the search once. Elementwise work (norms, softmax, gates) is not counted,
by the usual convention. `tests/unit/test_flops.py` checks the matmul count against torch's FLOP counter.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Flops:
    """Forward FLOPs by kind: of one layer over one lane's segment, or of the model over every lane."""

    matmul: int
    attention: int
    search: int = 0

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(self.matmul + other.matmul, self.attention + other.attention, self.search + other.search)

    def __mul__(self, n: int) -> "Flops":
        return Flops(n * self.matmul, n * self.attention, n * self.search)

    @property
    def train_step(self) -> int:
        """Forward + backward: the differentiable work three times, the stop-gradient search once."""
        return 3 * (self.matmul + self.attention) + self.search


def linear_flops(module: nn.Module) -> int:
    """FLOPs of mapping one row through every nn.Linear inside `module`."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def forward_flops(model: nn.Module, lanes: int, segment_len: int) -> Flops:
    """Forward FLOPs of a `LongRangeLM` over `lanes` segments of `segment_len` tokens."""
    d = model.embed.embedding_dim
    total = Flops(matmul=2 * segment_len * d * model.vocab_size, attention=0)  # tied logits
    # S of the stack's recurrent cell, which a Feedback row's other layers read
    source = model.feedback_source
    states = 0 if source is None else model.layers[source].num_states
    for layer in model.layers:
        total = total + layer.flops(segment_len, states)
    return total * lanes
