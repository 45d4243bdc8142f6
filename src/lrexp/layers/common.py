"""Pieces every layer kind shares: the RMS norm, the ReLU FFN, head split/merge and the fan-in init."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Flax variance_scaling(1.0, fan_in, truncated_normal) divides by the std of a unit normal truncated at +-2
_TRUNC_STD = 0.87962566103423978


def init_fan_in(weight: Tensor, scale: float = 1.0) -> None:
    """Truncated normal with variance scale/fan_in for an nn.Linear weight [out, in] (docs/models.md#initialisation)."""
    std = math.sqrt(scale / weight.shape[1]) / _TRUNC_STD
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def linear(d_in: int, d_out: int) -> nn.Linear:
    """A bias-free map with the fan-in init."""
    layer = nn.Linear(d_in, d_out, bias=False)
    init_fan_in(layer.weight)
    return layer


class RMSNorm(nn.Module):
    """LN(x) = gamma * x / sqrt(mean(x^2) + 1e-6): RMS statistics in fp32, no mean, no bias (docs/models.md#one-layer)."""

    def __init__(self, d_model: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: Tensor) -> Tensor:
        # torch's fused kernel of this formula: bitwise x32 * rsqrt(mean(x32^2) + eps) * gamma, forward and
        # backward (tests/unit/test_model.py), in fewer passes over x than the five operators it replaces
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class FeedForward(nn.Module):
    """The FFN sublayer y + Drop(W_2 ReLU(W_1 LN(y))), bias-free."""

    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model)
        self.w1 = linear(d_model, d_ff)
        self.w2 = linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, y: Tensor) -> Tensor:
        return y + self.drop(self.w2(torch.relu(self.w1(self.norm(y)))))  # [B, T, d]


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    b, t, _ = x.shape
    return x.view(b, t, num_heads, -1).transpose(1, 2)  # [B, H, T, D]


def merge_heads(x: Tensor) -> Tensor:
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)  # [B, T, H*D]
