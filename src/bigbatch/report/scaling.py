"""Batch-size scaling numbers of a sweep: steps and time to a target, the critical batch size, and
means with 95% intervals over seeds.

The critical batch size follows McCandlish et al. (2018, "An Empirical Model of Large-Batch
Training", eq. 2.11 with E -> infinity): the steps to reach a target fall with batch size B as

    S(B) = S_min (1 + B_crit / B),

perfect scaling (S halves when B doubles) well below B_crit, no gain well above it. The model is
linear in 1/B (S = a + b / B with a = S_min, b = S_min B_crit), so it is fitted by weighted least
squares with weights 1 / S^2: relative residuals, because steps-to-target varies in proportion to
itself (an epoch's resolution at small B is hundreds of steps, at large B a few). Standard errors
come from the fit's covariance (residual variance times (X^T W X)^-1), propagated to B_crit = b / a
by the delta method.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Student's t 0.975 quantiles for 1..30 degrees of freedom (two-sided 95%).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z975 = 1.959964


def t_quantile_975(dof: int) -> float:
    """Student's t 0.975 quantile: a table to 30 degrees of freedom, then the Cornish-Fisher
    expansion (within 1e-3 of the exact value there)."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (nan with fewer than two values)."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    mean = statistics.fmean(finite)
    if len(finite) < 2:
        return mean, math.nan
    return mean, t_quantile_975(len(finite) - 1) * statistics.stdev(finite) / math.sqrt(len(finite))


def welch_interval(terms: Sequence[tuple[float, Sequence[float]]]) -> tuple[float, float]:
    """sum_i c_i mean(x_i) over independent groups ``terms`` = [(c_i, x_i), ...] and the
    half-width of its 95% Welch interval: variance sum_i c_i^2 s_i^2 / n_i, degrees of freedom by
    Welch-Satterthwaite, rounded down (the conservative side) for the t quantile. nan half-width
    when a group has fewer than two values; 0 when every group's values are all equal."""
    groups = [(c, [v for v in xs if not math.isnan(v)]) for c, xs in terms]
    if any(not xs for _, xs in groups):
        return math.nan, math.nan
    estimate = sum(c * statistics.fmean(xs) for c, xs in groups)
    if any(len(xs) < 2 for _, xs in groups):
        return estimate, math.nan
    parts = [(c**2 * statistics.variance(xs) / len(xs), len(xs)) for c, xs in groups]
    total = sum(v for v, _ in parts)
    if total == 0:
        return estimate, 0.0
    dof = total**2 / sum(v**2 / (n - 1) for v, n in parts)
    return estimate, t_quantile_975(max(1, math.floor(dof + 1e-9))) * math.sqrt(total)


def value_at_target(
    rows: list[dict[str, Any]], target: float, key: str = "step", interpolate: bool = False
) -> float | None:
    """``key`` (steps, wall time, ...) at the first evaluation whose test accuracy reaches
    ``target``; None if none does. With ``interpolate``, the value is interpolated linearly in
    accuracy between that evaluation and the one before it (from 0 at accuracy 0 before the first),
    which removes most of an epoch's resolution when accuracy rises steadily."""
    previous_value, previous_acc = 0.0, 0.0
    for row in rows:
        acc, value = row["test_acc"], float(row[key])
        if acc >= target:
            if not interpolate or acc <= previous_acc:
                return value
            share = (target - previous_acc) / (acc - previous_acc)
            return previous_value + max(0.0, share) * (value - previous_value)
        previous_value, previous_acc = value, acc
    return None


def steps_to_target(
    rows: list[dict[str, Any]], target: float, interpolate: bool = False
) -> float | None:
    """Optimizer steps until test accuracy first reaches ``target`` (None if never)."""
    return value_at_target(rows, target, "step", interpolate)


def time_to_target(
    rows: list[dict[str, Any]], target: float, interpolate: bool = False
) -> float | None:
    """Wall-clock seconds (training and evaluation) until test accuracy first reaches ``target``."""
    return value_at_target(rows, target, "wall_time", interpolate)


@dataclass
class CriticalBatchFit:
    s_min: float
    s_min_se: float
    b_crit: float
    b_crit_se: float
    points: int  # (batch size, steps) pairs fitted: one per seed that reached the target
    batch_sizes: int  # distinct batch sizes among them

    @property
    def valid(self) -> bool:
        """Both parameters positive: otherwise the model does not describe these points."""
        return self.s_min > 0 and self.b_crit > 0

    def steps(self, batch_size: float) -> float:
        return self.s_min * (1 + self.b_crit / batch_size)


def fit_critical_batch(
    batch_sizes: Sequence[float], steps: Sequence[float]
) -> CriticalBatchFit | None:
    """S_min and B_crit of S(B) = S_min (1 + B_crit / B) with standard errors (see the module
    docstring); None with fewer than two distinct batch sizes. Exactly two points fit exactly and
    have no standard errors (nan)."""
    b = np.asarray(batch_sizes, dtype=np.float64)
    s = np.asarray(steps, dtype=np.float64)
    if b.shape != s.shape or b.ndim != 1:
        raise ValueError("batch_sizes and steps must be two lists of the same length")
    if np.any(b <= 0) or np.any(s <= 0):
        raise ValueError("batch sizes and steps must be positive")
    distinct = len(set(b.tolist()))
    if distinct < 2:
        return None
    x = np.stack([np.ones_like(b), 1.0 / b], axis=1)
    w = 1.0 / s**2
    normal = x.T @ (w[:, None] * x)
    inverse = np.linalg.inv(normal)
    a, slope = inverse @ (x.T @ (w * s))
    dof = len(s) - 2
    if dof > 0:
        residual = s - x @ np.array([a, slope])
        cov = float(np.sum(w * residual**2)) / dof * inverse
        var_a, var_b, cov_ab = cov[0, 0], cov[1, 1], cov[0, 1]
        b_crit = slope / a
        # Delta method: the gradient of b / a is (-b / a^2, 1 / a).
        var_crit = (b_crit**2 * var_a - 2 * b_crit * cov_ab + var_b) / a**2
        a_se, crit_se = math.sqrt(max(var_a, 0.0)), math.sqrt(max(var_crit, 0.0))
    else:
        a_se = crit_se = math.nan
    return CriticalBatchFit(float(a), a_se, float(slope / a), crit_se, len(s), distinct)


def perfect_scaling(
    batch_sizes: Sequence[float], base_batch: float, base_steps: float
) -> list[float]:
    """Steps under perfect scaling from (base_batch, base_steps): S(B) = base_steps base_batch / B
    (steps halve when the batch doubles)."""
    return [base_steps * base_batch / batch for batch in batch_sizes]


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Slope of log y against log x by least squares, and its standard error (nan with two points;
    both nan with fewer than two distinct x): 1 is linear scaling, 0.5 square-root scaling."""
    lx, ly = np.log(np.asarray(xs, np.float64)), np.log(np.asarray(ys, np.float64))
    if len(set(lx.tolist())) < 2:
        return math.nan, math.nan
    centred = lx - lx.mean()
    slope = float(np.sum(centred * (ly - ly.mean())) / np.sum(centred**2))
    if len(lx) < 3:
        return slope, math.nan
    residual = ly - ly.mean() - slope * centred
    se = math.sqrt(float(np.sum(residual**2)) / (len(lx) - 2) / float(np.sum(centred**2)))
    return slope, se
