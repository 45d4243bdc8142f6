"""QK normalisation and the learned per-head attention scale (docs/models.md#attention-logits-and-the-safe-softmax)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(|x|^2 + eps) over the last (head) dimension, computed in fp32."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


class HeadScale(nn.Module):
    """s_h, one learned scale per head, initialised to 1 (no 1/sqrt(d_h) factor: q and k are unit vectors).

    `scale_abs` uses |s_h| (meliad 2025) instead of s_h (2022, the default), docs/models.md#paper-and-code.
    """

    def __init__(self, num_heads: int, scale_abs: bool = False) -> None:
        super().__init__()
        self.scale_abs = scale_abs
        self.weight = nn.Parameter(torch.ones(num_heads))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self) -> Tensor:
        return self.weight.abs() if self.scale_abs else self.weight  # [H]
