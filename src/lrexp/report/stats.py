"""The statistics of a comparison table (docs/grids.md#differences-and-their-evidence): mean ± sample std over
seeds, and a group's difference to the reference, paired by seed, with its 95% t interval and the seeds that
would resolve a difference of the observed size at the observed spread.

Pairing: equal seeds share the data order and the initialisation's random stream, so a shift common to both
rows cancels in the per-seed difference d_s. Over n pairs with mean m and sample std s, the 95% interval is
m ± t_{0.975, n-1} · s / √n (Student's t, n - 1 degrees of freedom); it resolves the difference when it
leaves 0 out. When it holds 0, the seeds needed is the least n with t_{0.975, n-1} · s / √n < |m|: the seeds
at which the same mean and spread would give an interval without 0.

Student's t quantile is computed here, exactly for integer degrees of freedom (the closed-form CDF of
Abramowitz & Stegun 26.7.3-4, inverted by bisection), so the report needs no statistics package.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

MAX_SEEDS = 1000  # seeds needed beyond this read "more than 1,000": not a budget anyone spends


@dataclass
class Stat:
    mean: Optional[float] = None
    std: Optional[float] = None
    n: int = 0

    @classmethod
    def of(cls, values: Sequence[Optional[float]]) -> "Stat":
        vals = [v for v in values if v is not None]
        if not vals:
            return cls()
        return cls(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals))

    def scaled(self, by: Optional[float]) -> "Stat":
        if self.mean is None or not by:
            return Stat()
        return Stat(self.mean / by, None if self.std is None else self.std / by, self.n)

    def text(self, digits: int) -> str:
        if self.mean is None:
            return "–"
        out = f"{self.mean:.{digits}f}"
        return out + (f" ± {self.std:.{digits}f}" if self.std is not None else "")


def t_central(t: float, df: int) -> float:
    """P(|T| < t) for Student's T with `df` (an integer ≥ 1) degrees of freedom: a finite sum in
    cos²θ with θ = atan(t / √df)."""
    theta = math.atan(t / math.sqrt(df))
    c2, sin = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: (2/π)(θ + sinθ Σ_k a_k cos^{2k+1}θ), a_0 = 1, a_k = a_{k-1} · 2k / (2k + 1)
        term, total = math.cos(theta), 0.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * 2 * k / (2 * k + 1)
        return 2 / math.pi * (theta + sin * total)
    term, total = 1.0, 0.0  # even: sinθ Σ_k b_k cos^{2k}θ, b_0 = 1, b_k = b_{k-1} · (2k - 1) / 2k
    for k in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return sin * total


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided `level` quantile of Student's t: t with P(|T| < t) = level (t_{0.975, df} at 0.95)."""
    lo, hi = 0.0, 1.0
    while t_central(hi, df) < level:
        hi *= 2
    for _ in range(60):  # 2^-60 of the bracket: below a float's resolution
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_central(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def half_width(std: float, n: int) -> float:
    """Half the 95% interval of a mean over n ≥ 2 values of sample std `std`."""
    return t_quantile(n - 1) * std / math.sqrt(n)


def seeds_needed(mean: float, std: float) -> Optional[int]:
    """The least n ≥ 2 with t_{0.975, n-1} · std / √n < |mean|; None beyond MAX_SEEDS (or a zero mean)."""
    if std == 0:
        return 2 if mean else None
    if not mean:
        return None
    # t_{0.975} > 1.96 at every df, so no n below (1.96 std / |mean|)² can do; start there
    n = max(2, math.ceil((1.959964 * std / abs(mean)) ** 2))
    while n <= MAX_SEEDS:
        if half_width(std, n) < abs(mean):
            return n
        n += 1
    return None


@dataclass
class Delta:
    """A metric of a group minus the reference's, seed by seed (`relative`: mine / reference - 1)."""

    per_seed: Dict[str, float] = field(default_factory=dict)  # seed -> difference
    is_reference: bool = False
    relative: bool = False

    @classmethod
    def paired(cls, mine: Dict[str, float], ref: Dict[str, float], relative: bool = False) -> "Delta":
        seeds = sorted(set(mine) & set(ref), key=_seed_order)
        if relative:
            return cls({s: mine[s] / ref[s] - 1 for s in seeds if ref[s]}, relative=True)
        return cls({s: mine[s] - ref[s] for s in seeds})

    @property
    def stat(self) -> Stat:
        return Stat.of(list(self.per_seed.values()))

    @property
    def interval(self) -> Optional[Tuple[float, float]]:
        """The 95% t interval of the mean difference; None below two pairs."""
        s = self.stat
        if s.mean is None or s.std is None:
            return None
        h = half_width(s.std, s.n)
        return s.mean - h, s.mean + h

    @property
    def resolved(self) -> Optional[bool]:
        """Whether the seeds resolve the difference (the interval leaves 0 out); None: no spread known."""
        ci = self.interval
        return None if ci is None else (ci[0] > 0 or ci[1] < 0)

    @property
    def seeds_needed(self) -> Optional[int]:
        """Seeds at which this mean and spread would resolve it (None: resolved, unknown, or over MAX_SEEDS)."""
        s = self.stat
        if self.resolved is not False:
            return None
        return seeds_needed(s.mean, s.std)


def _seed_order(seed: Optional[str]) -> Tuple[int, str]:
    """Seeds sort as numbers ("2" before "10"); a run without one first."""
    text = "" if seed is None else str(seed)
    return (int(text), "") if text.lstrip("-").isdigit() else (-(10**9), text)
