"""Statistics of per-episode accuracies (dfml/evaluation/stats.py): t-based CIs and p-values that agree, paired
differences against scipy's paired t-test, edge cases, Holm's correction by hand."""

import math

import numpy as np
import pytest
from scipy import stats

from dfml.evaluation.stats import holm_adjust, mean_ci95, paired_difference


def test_mean_and_ci_of_known_accuracies():
    mean, ci = mean_ci95([1.0, 0.0, 1.0, 0.0])
    assert mean == 0.5
    # by hand: sample std s = sqrt(1/3) = 0.57735, t_{0.975, 3} = 3.18245 (tables), n = 4
    assert ci == pytest.approx(3.18245 * 0.57735 / 2, abs=1e-4)
    low, high = stats.t.interval(0.95, 3, loc=0.5, scale=stats.sem([1.0, 0.0, 1.0, 0.0]))
    assert (mean - ci, mean + ci) == pytest.approx((low, high))
    assert mean_ci95([0.3]) == (0.3, math.inf)  # one value: the spread is unknown, the interval unbounded
    assert mean_ci95([0.5, 0.5, 0.5]) == (0.5, 0.0)  # no spread measured
    with pytest.raises(ValueError, match="no accuracies"):
        mean_ci95([])


def test_paired_difference_matches_a_paired_t_test():
    a = [0.6, 0.7, 0.5, 0.9, 0.8, 0.4]
    b = [0.5, 0.6, 0.5, 0.7, 0.6, 0.5]
    diff = paired_difference(a, b)
    assert diff.mean == pytest.approx(sum(x - y for x, y in zip(a, b)) / 6)
    test = stats.ttest_rel(a, b)
    assert diff.p_value == pytest.approx(test.pvalue)
    interval = test.confidence_interval(0.95)
    assert (diff.mean - diff.ci95, diff.mean + diff.ci95) == pytest.approx((interval.low, interval.high))
    assert diff.n == 6
    same = paired_difference(a, a)
    assert same.mean == 0 and same.ci95 == 0 and same.p_value == 1.0 and not same.excludes_zero
    with pytest.raises(ValueError, match="same episodes: 2 vs 3"):
        paired_difference([0.1, 0.2], [0.1, 0.2, 0.3])


def test_paired_difference_edge_cases_keep_ci_and_p_consistent():
    one = paired_difference([0.7], [0.5])  # n = 1: no spread, no evidence
    assert one.ci95 == math.inf and one.p_value == 1.0 and not one.excludes_zero
    constant = paired_difference([0.75, 0.5, 0.25], [0.5, 0.25, 0.0])  # every episode +0.25: zero variance
    assert constant.mean == 0.25 and constant.ci95 == 0.0 and constant.p_value == 0.0 and constant.excludes_zero


def sample_with_t(t: float, n: int, seed: int = 0) -> np.ndarray:
    """n values whose one-sample t statistic (mean / (s / sqrt(n)), s with ddof = 1) is t."""
    base = np.random.default_rng(seed).normal(size=n)
    base = (base - base.mean()) / base.std(ddof=1)
    return base + t / math.sqrt(n)


def test_ci_excludes_zero_exactly_when_p_is_below_005():
    # The case: p = 0.051 must not be flagged by the CI (normal quantile + population SD did).
    d = paired_difference(sample_with_t(stats.t.isf(0.051 / 2, 29), 30), np.zeros(30))
    assert d.p_value == pytest.approx(0.051, abs=1e-6)
    assert not abs(d.mean) > d.ci95
    # Either side of the boundary t = t_{0.975, n-1}, and on it: the two views agree.
    for n in (2, 3, 5, 10, 30, 100, 600):
        critical = stats.t.ppf(0.975, n - 1)
        for relative in (1 - 1e-6, 1 - 1e-9, 1.0, 1 + 1e-9, 1 + 1e-6):
            d = paired_difference(sample_with_t(critical * relative, n, seed=n), np.zeros(n))
            assert (abs(d.mean) > d.ci95) == (d.p_value < 0.05), (n, relative, d)
            if relative != 1.0:
                assert (d.p_value < 0.05) == (relative > 1), (n, relative, d)
    rng = np.random.default_rng(1)
    for _ in range(500):
        n = int(rng.integers(2, 60))
        diffs = rng.normal(rng.normal(0, 0.3), 1.0, size=n)
        d = paired_difference(diffs, np.zeros(n))
        assert (abs(d.mean) > d.ci95) == (d.p_value < 0.05)


def test_holm_adjustment_by_hand():
    # sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> max(0.06, 0.04) = 0.06
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm_adjust([0.02, 0.02]) == pytest.approx([0.04, 0.04])
    assert holm_adjust([0.03]) == pytest.approx([0.03])  # a family of one is not corrected
    assert holm_adjust([]) == []
