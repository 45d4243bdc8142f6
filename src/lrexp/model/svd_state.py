"""Rank-k compression of the carried state at the segment boundary (docs/knobs.md#rank-k-state-compression, `model.svd_state`).

Every carried matrix X of a target, one per lane (per lane and head for a cache), is replaced by its best
rank-k approximation X_k = U_k S_k V_k^T, computed in fp32 on the detached state: no gradient ever flows
through the SVD, which is unstable where singular values nearly repeat. The targets:

- `recurrent_state`: the block-recurrent cell's c, S x d per lane;
- `slots`: the gated memory slots' M, n x d per lane (docs/knobs.md#gated-memory-slots);
- `xl_cache`: the keys and values of every layer's XL cache (the cell's and the kNN layer's local cache
  included), W x D per lane and head.

Cache keys are stored L2-normalised (docs/models.md#xl-cache) and a reconstruction is not, so `renormalize_keys`
scales every reconstructed key row back to the norm it had: 1 for a real key, 0 for an empty slot (a
renormalised rounding error would otherwise become a unit-norm key out of nothing).

The retained energy E_k = sum_{i<=k} s_i^2 / sum_i s_i^2 and the relative error |X - X_k|_F / |X|_F of what
is carried (sqrt(1 - E_k) before the keys are renormalised) are returned per target, averaged over the
matrices that are not all zero, for the training log.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Dict, List, Tuple

import torch
from torch import Tensor

from lrexp.model.state import ModelState, RecurrentState, SlotState, XLCache

if TYPE_CHECKING:
    from lrexp.config.schema import SVDStateConfig

LOWRANK_NITER = 2  # subspace iterations of torch.svd_lowrank (docs/knobs.md#rank-k-state-compression)
LOWRANK_SEED = 0  # its random start: fixed, so a compressed run is reproducible and resumes exactly


def truncate(x: Tensor, rank: int, method: str) -> Tuple[Tensor, Tensor]:
    """X_k [..., n, m] (fp32) and E_k [...] of the matrices x [..., n, m]; E_k is NaN for a zero matrix.

    `rank` above min(n, m) is min(n, m): the full decomposition, X_k = X up to rounding."""
    x32 = x.detach().float()  # [..., n, m]
    k = min(rank, x32.shape[-2], x32.shape[-1])
    if method == "exact":
        u, s, vh = torch.linalg.svd(x32, full_matrices=False)  # [..., n, r], [..., r], [..., r, m]
        u, s, vh = u[..., :k], s[..., :k], vh[..., :k, :]
    else:
        # its random projection must neither depend on nor advance the global generator (dropout's)
        with torch.random.fork_rng(devices=[x32.device] if x32.is_cuda else []):
            torch.manual_seed(LOWRANK_SEED)
            u, s, v = torch.svd_lowrank(x32, q=k, niter=LOWRANK_NITER)  # [..., n, k], [..., k], [..., m, k]
        vh = v.mT  # [..., k, m]
    x_k = (u * s[..., None, :]) @ vh  # [..., n, m]
    energy = s.square().sum(-1) / x32.square().sum((-2, -1))  # [...]
    return x_k, energy


def _relative_error(x: Tensor, x_k: Tensor) -> Tensor:
    """|X - X_k|_F / |X|_F per matrix [...] of x, x_k [..., n, m]; NaN for a zero matrix."""
    x32 = x.detach().float()
    return (x_k - x32).square().sum((-2, -1)).sqrt() / x32.square().sum((-2, -1)).sqrt()


def _with_norms_of(x_k: Tensor, x: Tensor) -> Tensor:
    """x_k [..., n, m] with each row scaled to the norm of the same row of x."""
    want = x.detach().float().norm(dim=-1, keepdim=True)  # [..., n, 1]
    have = x_k.norm(dim=-1, keepdim=True)  # [..., n, 1]
    return x_k * (want / have.clamp_min(torch.finfo(x_k.dtype).tiny))


def compress(state: ModelState, cfg: "SVDStateConfig") -> Tuple[ModelState, Dict[str, Tensor]]:
    """The state with every target matrix at rank `cfg.rank` (fp32), and {"<target>_energy",
    "<target>_rel_error": mean over the non-zero matrices} for the targets present."""
    measured: Dict[str, List[Tensor]] = {}

    def approximate(target: str, x: Tensor, is_key: bool = False) -> Tensor:
        x_k, energy = truncate(x, cfg.rank, cfg.method)
        if is_key and cfg.renormalize_keys:
            x_k = _with_norms_of(x_k, x)
        measured.setdefault(f"{target}_energy", []).append(energy.flatten())
        measured.setdefault(f"{target}_rel_error", []).append(_relative_error(x, x_k).flatten())
        return x_k

    layers = []
    for s in state.layers:
        if isinstance(s, XLCache) and "xl_cache" in cfg.targets:
            # k, v [B, H, W, D]: one W x D matrix per lane and head
            s = replace(s, k=approximate("xl_cache", s.k, is_key=True), v=approximate("xl_cache", s.v))
        if isinstance(s, RecurrentState) and "recurrent_state" in cfg.targets:
            s = replace(s, c=approximate("recurrent_state", s.c))  # c [B, S, d]: one S x d matrix per lane
        if isinstance(s, SlotState) and "slots" in cfg.targets:
            s = replace(s, c=approximate("slots", s.c))  # M [B, n, d]: one n x d matrix per lane
        layers.append(s)
    stats = {}
    for name, values in measured.items():
        v = torch.cat(values)
        stats[name] = v[~v.isnan()].mean()  # NaN where every matrix is zero (a fresh cache)
    return replace(state, layers=tuple(layers)), stats
