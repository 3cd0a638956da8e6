"""Statistics of per-episode accuracies: mean and 95% CI, paired differences, Holm's correction.

Statistics use one distribution throughout: Student's t with n - 1 degrees of freedom and the sample
standard deviation (ddof = 1). The 95% CI half-width is ``t_{0.975, n-1} * s / sqrt(n)`` and the paired
p-value is the two-sided t-test on the same t, so a paired CI excludes 0 exactly when p < 0.05.
Several comparisons are corrected together with :func:`holm_adjust` (Holm's step-down).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

ALPHA = 0.05  # two-sided: 95% intervals, significance at p < 0.05


def _t_quantile(df: int, alpha: float = ALPHA) -> float:
    from scipy import stats  # imported lazily: scipy is slow to import and only needed here

    return float(stats.t.ppf(1 - alpha / 2, df))


def _two_sided_p(t: float, df: int) -> float:
    from scipy import stats

    return float(2 * stats.t.sf(abs(t), df))


def _t_summary(values: torch.Tensor, alpha: float = ALPHA) -> tuple[float, float, float]:
    """(mean, CI half-width, two-sided p-value of mean = 0), all from Student's t with n - 1 dof.

    n = 1: the spread is unknown, so the interval is unbounded (half-width ``inf``) and p = 1.
    Zero sample variance (n >= 2): the half-width is 0; p = 0 when the mean is non-zero (the limit of
    the t-test as s -> 0), p = 1 when it is zero. Both keep "CI excludes 0" <=> "p < alpha".
    """
    n = values.numel()
    if n == 0:
        raise ValueError("no accuracies to summarise")
    mean = float(values.mean())
    if n == 1:
        return mean, math.inf, 1.0
    se = float(values.std(unbiased=True)) / math.sqrt(n)
    if se == 0.0:
        return mean, 0.0, (1.0 if mean == 0.0 else 0.0)
    half = _t_quantile(n - 1, alpha) * se
    p = _two_sided_p(mean / se, n - 1)
    # One decision, two views of it: |mean| > half and p < alpha can only disagree by rounding when
    # |t| equals the quantile to the last bit; the p-value is nudged to the CI's side in that case.
    if (abs(mean) > half) != (p < alpha):
        p = math.nextafter(alpha, 0.0) if abs(mean) > half else alpha
    return mean, half, p


def mean_ci95(accuracies: Sequence[float] | torch.Tensor) -> tuple[float, float]:
    """Mean and 95% CI half-width ``t_{0.975, n-1} * s / sqrt(n)`` (s: sample std, ddof = 1).

    One value (n = 1) has an unbounded interval (half-width ``inf``); equal values have half-width 0.
    """
    mean, half, _ = _t_summary(torch.as_tensor(accuracies, dtype=torch.float64).flatten())
    return mean, half


@dataclass(frozen=True)
class PairedDifference:
    """A - B on the same episodes: mean, 95% CI half-width and two-sided paired t-test p-value.

    CI and p-value come from the same t distribution (n - 1 dof, sample std of the differences), so
    :attr:`excludes_zero` (``|mean| > ci95``) holds exactly when ``p_value < 0.05``.
    """

    mean: float
    ci95: float
    p_value: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return abs(self.mean) > self.ci95


def paired_difference(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    """Paired A - B (see :func:`_t_summary` for n = 1 and zero variance)."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same episodes: {len(a)} vs {len(b)} accuracies")
    diff = torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)
    mean, ci, p = _t_summary(diff)
    return PairedDifference(mean, ci, p, diff.numel())


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values, in the input order.

    With the m p-values sorted ascending, p_(1) <= ... <= p_(m), the adjusted value of the i-th is
    ``min(1, max_{j <= i} (m - j + 1) * p_(j))``. Rejecting where the adjusted p < alpha is Holm's
    procedure: it controls the family-wise error rate at alpha over the m comparisons.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))
        adjusted[i] = running
    return adjusted
