"""The horizontal state path of the block-recurrent cell: gates and topologies (docs/models.md#gates, docs/models.md#topologies).

A topology maps (c_t, u) -> c_{t+1}, where c_t [B, S, d] is the state before block t and u = [P ; R]
[B, S, d_u] what the states read from themselves and from the tokens (d_u = 2d; d for memory slots that
do not attend to themselves). It owns its bias-free maps and one or
two gates. A gate G(c, z, h) mixes the incoming state c with a candidate z computed from h:

    c' = keep(h) * c + write(h) * z

`fixed` (meliad "bias"): keep = sigma(b), write = 1 - keep, b in R^d: no weights that read the input.
`lstm`: keep = f = sigma(W_f h + b_f + 1), write = i = sigma(W_i h + b_i - 1); the +1/-1 are constants of the
forward pass, so at init f ~ 0.73 and i ~ 0.27 whatever the bias.

Nothing on this path has dropout (3.7). The gate kind is chosen in `build_gate` and the topology in
`build_update`, nowhere else.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from lrexp.layers.common import RMSNorm, init_fan_in, linear

_BIAS_STD = 0.1  # b, b_f, b_i ~ N(0, 0.1^2): small but not 0, so Adafactor's relative update moves them (3.8)
_KERNEL_SCALE = 0.1  # W_f, W_i: truncated normal with variance 0.1 / fan_in


class FixedGate(nn.Module):
    """g = sigma(b) per channel; c' = g * c + (1 - g) * z: a learned exponential moving average."""

    def __init__(self, d_in: int, d_model: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(d_model) * _BIAS_STD)  # [d]

    def coefficients(self, h: Tensor) -> Tuple[Tensor, Tensor]:
        keep = torch.sigmoid(self.bias.float()).to(h.dtype)  # [d], the same for every state and lane
        return keep, 1.0 - keep

    def forward(self, c: Tensor, z: Tensor, h: Tensor) -> Tensor:
        keep, write = self.coefficients(h)
        return keep * c + write * z  # [B, S, d]


class LSTMGate(nn.Module):
    """f = sigma(W_f h + b_f + 1), i = sigma(W_i h + b_i - 1); c' = f * c + i * z."""

    def __init__(self, d_in: int, d_model: int) -> None:
        super().__init__()
        self.w_f = nn.Linear(d_in, d_model, bias=False)
        self.w_i = nn.Linear(d_in, d_model, bias=False)
        init_fan_in(self.w_f.weight, _KERNEL_SCALE)
        init_fan_in(self.w_i.weight, _KERNEL_SCALE)
        self.b_f = nn.Parameter(torch.randn(d_model) * _BIAS_STD)  # [d]
        self.b_i = nn.Parameter(torch.randn(d_model) * _BIAS_STD)  # [d]

    def coefficients(self, h: Tensor) -> Tuple[Tensor, Tensor]:
        forget = torch.sigmoid(self.w_f(h) + self.b_f + 1.0)  # [B, S, d]
        write = torch.sigmoid(self.w_i(h) + self.b_i - 1.0)  # [B, S, d]
        return forget, write

    def forward(self, c: Tensor, z: Tensor, h: Tensor) -> Tensor:
        forget, write = self.coefficients(h)
        return forget * c + write * z  # [B, S, d]


GATES: Dict[str, Callable[[int, int], nn.Module]] = {"fixed": FixedGate, "lstm": LSTMGate}


def build_gate(kind: str, d_in: int, d_model: int) -> nn.Module:
    """The one place a gate kind is chosen. d_in: width of h, the input of the candidate's map."""
    if kind not in GATES:
        raise ValueError(f"unknown gate '{kind}'; available: {', '.join(sorted(GATES))}")
    return GATES[kind](d_in, d_model)


def _candidate(z: Tensor, tanh: bool) -> Tensor:
    """Paper choice 1: the paper's equations squash z with tanh; the code does not (the default)."""
    return torch.tanh(z) if tanh else z


class SkipUpdate(nn.Module):
    """c_{t+1} = G(c_t, z = W_o u, h = u): no FFN on the state path (the paper's best and cheapest)."""

    def __init__(self, gate: str, d_u: int, d_model: int, d_ff: int, candidate_tanh: bool) -> None:
        super().__init__()
        self.candidate_tanh = candidate_tanh
        self.w_o = linear(d_u, d_model)
        self.gate = build_gate(gate, d_u, d_model)

    def forward(self, c: Tensor, u: Tensor) -> Tensor:
        return self.gate(c, _candidate(self.w_o(u), self.candidate_tanh), u)  # [B, S, d]


class DualUpdate(nn.Module):
    """Two gates in place of a layer's two residuals: c1 = G1(c_t, W_o u, u), then
    c_{t+1} = G2(c1, W_2 r, r) with r = ReLU(W_1 LN(c1))."""

    def __init__(self, gate: str, d_u: int, d_model: int, d_ff: int, candidate_tanh: bool) -> None:
        super().__init__()
        self.candidate_tanh = candidate_tanh
        self.w_o = linear(d_u, d_model)
        self.gate1 = build_gate(gate, d_u, d_model)
        self.norm = RMSNorm(d_model)
        self.w_1 = linear(d_model, d_ff)
        self.w_2 = linear(d_ff, d_model)
        self.gate2 = build_gate(gate, d_ff, d_model)

    def forward(self, c: Tensor, u: Tensor) -> Tensor:
        c1 = self.gate1(c, _candidate(self.w_o(u), self.candidate_tanh), u)  # [B, S, d]
        r = torch.relu(self.w_1(self.norm(c1)))  # [B, S, d_ff]
        return self.gate2(c1, _candidate(self.w_2(r), self.candidate_tanh), r)  # [B, S, d]


class SingleUpdate(nn.Module):
    """One gate after an FFN that reads u directly (no W_o, no LN): c_{t+1} = G(c_t, tanh(W_2 r), r),
    r = ReLU(W_1 u). The tanh is the code's, in this topology only."""

    def __init__(self, gate: str, d_u: int, d_model: int, d_ff: int, candidate_tanh: bool) -> None:
        super().__init__()
        self.w_1 = linear(d_u, d_ff)
        self.w_2 = linear(d_ff, d_model)
        self.gate = build_gate(gate, d_ff, d_model)

    def forward(self, c: Tensor, u: Tensor) -> Tensor:
        r = torch.relu(self.w_1(u))  # [B, S, d_ff]
        return self.gate(c, torch.tanh(self.w_2(r)), r)  # [B, S, d]


TOPOLOGIES: Dict[str, Callable[[str, int, int, int, bool], nn.Module]] = {
    "dual": DualUpdate, "single": SingleUpdate, "skip": SkipUpdate,
}


def build_update(
    topology: str, gate: str, d_model: int, d_ff: int, candidate_tanh: bool, d_u: Optional[int] = None
) -> nn.Module:
    """The one place a topology is chosen: a module `update(c [B, S, d], u [B, S, d_u]) -> c' [B, S, d]`;
    d_u is 2d (u = [P ; R]) unless given."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology '{topology}'; available: {', '.join(sorted(TOPOLOGIES))}")
    return TOPOLOGIES[topology](gate, 2 * d_model if d_u is None else d_u, d_model, d_ff, candidate_tanh)
