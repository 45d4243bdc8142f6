"""The comparison table's statistics against values computed by hand (docs/grids.md#differences-and-their-evidence)."""

from __future__ import annotations

import math

import pytest

from lrexp.report import tables
from lrexp.report.stats import Delta, seeds_needed, t_central, t_quantile


@pytest.mark.parametrize("df, quantile", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622),
                                          (30, 2.0423), (100, 1.9840)])
def test_t_quantile_matches_the_printed_tables(df, quantile):
    assert t_quantile(df) == pytest.approx(quantile, abs=1e-4)


def test_t_cdf_closed_forms():
    # df 1 is Cauchy: P(|T| < 1) = 1/2; df 2: P(|T| < t) = t / sqrt(2 + t²)
    assert t_central(1.0, 1) == pytest.approx(0.5)
    assert t_central(3.0, 2) == pytest.approx(3 / math.sqrt(11))


def test_two_seeds_interval_and_seeds_needed():
    """Two seeds put a row behind the reference by 0.17 and 0.28 bits: mean 0.225, s = 0.11 / √2 = 0.07778;
    the interval 0.225 ± 12.706 · 0.07778 / √2 = 0.225 ± 0.6988 holds 0; at three seeds 4.303 · s / √3 = 0.1932
    < 0.225 would not."""
    d = Delta.paired({"0": 3.17, "1": 3.28}, {"0": 3.0, "1": 3.0})
    lo, hi = d.interval
    assert (lo, hi) == (pytest.approx(0.225 - 0.6988, abs=1e-4), pytest.approx(0.225 + 0.6988, abs=1e-4))
    assert d.resolved is False and d.seeds_needed == 3
    assert tables.delta_text(d) == "≈ +0.2250 [-0.4738, +0.9238]"
    assert tables.per_seed_text(d) == "0: +0.170, 1: +0.280"
    assert tables.verdict(d) == "not resolved; 3 seeds would"


def test_seeds_needed_edges():
    # at 2 seeds the interval is 12.706 · s / √2 = 8.98 s wide on each side: |mean| = 9 s resolves already
    assert seeds_needed(9.0, 1.0) == 2 and seeds_needed(8.9, 1.0) == 3
    assert seeds_needed(0.0, 1.0) is None and seeds_needed(1e-4, 1.0) is None  # over 1,000 seeds
    assert seeds_needed(0.1, 0.0) == 2


def test_relative_step_time_pairs_ratios_and_seeds_sort_as_numbers():
    d = Delta.paired({"10": 1.2, "2": 1.1}, {"10": 1.0, "2": 1.0}, relative=True)
    assert list(d.per_seed) == ["2", "10"] and d.stat.mean == pytest.approx(0.15)
    assert tables.per_seed_text(d) == "2: +10.0%, 10: +20.0%"
    assert Delta.paired({"0": 1.0}, {"1": 1.0}).interval is None  # no common seed
