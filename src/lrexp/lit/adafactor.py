"""Adafactor as the reference code steps (Shazeer & Stern 2018, in the Flax form meliad trains with; docs/models.md#optimiser-and-schedule).

Per parameter x with gradient g, at update t = 1, 2, ... (decay rate c = 0.8):

    beta2 = 1 - t^-c                                    the second moment's decay
    G     = g^2 + eps1                                  eps1 = 1e-30 *added*, never a clamp
    factored (the two largest dims r, c of x both >= min_dim_size_to_factor):
        R = beta2 R + (1 - beta2) mean_c(G)             [x without dim c]
        C = beta2 C + (1 - beta2) mean_r(G)             [x without dim r]
        u = g / sqrt((R / mean_r(R)) (x) C)
    otherwise:
        V = beta2 V + (1 - beta2) G;  u = g / sqrt(V)
    u     = u / max(1, RMS(u) / d)                      update clipping, d = 1
    step  = lr * max(RMS(x), eps2) * u                  relative to the parameter's scale
    m     = beta1 m + (1 - beta1) step   (beta1 set)    momentum on the scaled step
    x     = (1 - wd) x - m

Why not `torch.optim.Adafactor`: it clamps the mean row variance at eps1 (float32 machine epsilon when
eps1 is None), which the mean g^2 of a token-mean loss falls below at init, so its update is inflated and
then clipped to RMS exactly lr on every step; it factorises every matrix on its last two dims; and it has no
first moment. All state is fp32 whatever the parameter's dtype.
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
from torch import Tensor


def factored_dims(shape: Tuple[int, ...], min_dim_size_to_factor: int) -> Optional[Tuple[int, int]]:
    """(second largest, largest) dim of a shape whose two largest dims are both >= the threshold, else
    None: small matrices and vectors keep a full second moment."""
    if len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda i: (shape[i], i))  # ties: the later dim counts as larger
    second, largest = order[-2], order[-1]
    if shape[second] < min_dim_size_to_factor:
        return None
    return second, largest


class Adafactor(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        beta1: Optional[float] = 0.9,
        decay_rate: float = 0.8,
        clipping_threshold: float = 1.0,
        min_dim_size_to_factor: int = 128,
        eps1: float = 1e-30,
        eps2: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = dict(lr=lr, beta1=beta1, decay_rate=decay_rate, clipping_threshold=clipping_threshold,
                        min_dim_size_to_factor=min_dim_size_to_factor, eps1=eps1, eps2=eps2,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)

    def _init_state(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=torch.float32)  # on the CPU: read on the host every step
        dims = factored_dims(tuple(p.shape), group["min_dim_size_to_factor"])
        if dims is None:
            state["v"] = torch.zeros_like(p, dtype=torch.float32)
        else:
            second, largest = dims
            state["v_row"] = torch.zeros_like(p, dtype=torch.float32).mean(dim=largest)  # [x without largest]
            state["v_col"] = torch.zeros_like(p, dtype=torch.float32).mean(dim=second)  # [x without second]
        if group["beta1"] is not None:
            state["m"] = torch.zeros_like(p, dtype=torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p] or self._init_state(p, group)
                self._update(p, p.grad, state, group)
        return loss

    @staticmethod
    def _update(p: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        state["step"] += 1
        t = state["step"].item()
        beta2 = 1.0 - t ** -group["decay_rate"]
        g = grad.float()
        x = p.float()
        g2 = g * g + group["eps1"]
        dims = factored_dims(tuple(p.shape), group["min_dim_size_to_factor"])
        if dims is None:
            v = state["v"].mul_(beta2).add_(g2, alpha=1.0 - beta2)
            u = g * v.rsqrt()
        else:
            second, largest = dims
            row = state["v_row"].mul_(beta2).add_(g2.mean(dim=largest), alpha=1.0 - beta2)  # [x without largest]
            col = state["v_col"].mul_(beta2).add_(g2.mean(dim=second), alpha=1.0 - beta2)  # [x without second]
            # `second` indexes x; in `row` (largest removed) it moves down one when it came after `largest`
            row_second = second - 1 if second > largest else second
            row_factor = (row / row.mean(dim=row_second, keepdim=True)).rsqrt()
            u = g * row_factor.unsqueeze(largest) * col.rsqrt().unsqueeze(second)
        # tensor maxima, not .item(): no host sync per parameter on a GPU
        u = u / (u.square().mean().sqrt() / group["clipping_threshold"]).clamp(min=1.0)
        delta = u * (group["lr"] * x.square().mean().sqrt().clamp(min=group["eps2"]))
        if group["beta1"] is not None:
            delta = state["m"].mul_(group["beta1"]).add_(delta, alpha=1.0 - group["beta1"])
        p.copy_(x * (1.0 - group["weight_decay"]) - delta)
