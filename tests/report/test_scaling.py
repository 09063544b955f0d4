"""Scaling numbers (report/scaling.py): steps to a target, McCandlish's critical-batch fit on
curves with a known answer, t-intervals."""

import math

import numpy as np
import pytest

from bigbatch.report.scaling import (
    fit_critical_batch,
    loglog_slope,
    mean_interval,
    perfect_scaling,
    steps_to_target,
    t_quantile_975,
    time_to_target,
)


def _rows(accs, steps_per_epoch, seconds_per_epoch=2.0):
    return [
        {
            "epoch": e,
            "step": e * steps_per_epoch,
            "test_acc": a,
            "wall_time": e * seconds_per_epoch,
        }
        for e, a in enumerate(accs, 1)
    ]


def test_steps_to_target_is_the_first_evaluation_reaching_it():
    rows = _rows([0.3, 0.5, 0.62, 0.58, 0.7], steps_per_epoch=390)
    assert steps_to_target(rows, 0.6) == 3 * 390
    assert steps_to_target(rows, 0.62) == 3 * 390  # reaching means >=
    assert steps_to_target(rows, 0.65) == 5 * 390  # the dip at epoch 4 does not count
    assert steps_to_target(rows, 0.71) is None
    assert time_to_target(rows, 0.6) == 6.0


def test_interpolated_steps_to_target():
    rows = _rows([0.3, 0.5, 0.7], steps_per_epoch=100)
    # 0.6 lies halfway from 0.5 (step 200) to 0.7 (step 300).
    assert steps_to_target(rows, 0.6, interpolate=True) == pytest.approx(250.0)
    # Before the first evaluation: from (0 steps, accuracy 0) to (100, 0.3).
    assert steps_to_target(rows, 0.15, interpolate=True) == pytest.approx(50.0)


def test_two_points_give_the_hand_solution():
    # 5000 = a + b/128 and 1500 = a + b/1024  ->  b = 3500 * 1024 / 7 = 512000, a = 1000.
    fit = fit_critical_batch([128, 1024], [5000, 1500])
    assert fit.s_min == pytest.approx(1000.0)
    assert fit.b_crit == pytest.approx(512.0)
    assert math.isnan(fit.b_crit_se) and fit.valid


def _synthetic(s_min, b_crit, noise, seeds=3, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    batches, steps = [], []
    for b in (128, 256, 512, 1024, 2048, 4096, 8192):
        for _ in range(seeds):
            batches.append(b)
            steps.append(s_min * (1 + b_crit / b) * math.exp(noise * rng.standard_normal()))
    return batches, steps


def test_fit_recovers_known_parameters_and_uncertainty_shrinks_with_noise():
    exact = fit_critical_batch(*_synthetic(800.0, 1500.0, 0.0))
    assert exact.s_min == pytest.approx(800.0, rel=1e-9)
    assert exact.b_crit == pytest.approx(1500.0, rel=1e-9)
    assert exact.b_crit_se == pytest.approx(0.0, abs=1e-6)
    noisy = fit_critical_batch(*_synthetic(800.0, 1500.0, 0.10))
    quiet = fit_critical_batch(*_synthetic(800.0, 1500.0, 0.01))
    assert noisy.b_crit == pytest.approx(1500.0, rel=0.3)
    assert quiet.b_crit == pytest.approx(1500.0, rel=0.03)
    assert quiet.b_crit_se < noisy.b_crit_se / 5
    # The true value lies within three standard errors of the estimate.
    assert abs(noisy.b_crit - 1500.0) < 3 * noisy.b_crit_se
    assert abs(noisy.s_min - 800.0) < 3 * noisy.s_min_se
    assert noisy.points == 21 and noisy.batch_sizes == 7


def test_standard_errors_match_a_monte_carlo_spread():
    estimates = [
        fit_critical_batch(*_synthetic(800.0, 1500.0, 0.05, rng_seed=k)).b_crit for k in range(200)
    ]
    one = fit_critical_batch(*_synthetic(800.0, 1500.0, 0.05, rng_seed=0))
    assert one.b_crit_se == pytest.approx(float(np.std(estimates)), rel=0.35)


def test_limits_of_the_model():
    batches = [128, 512, 2048, 8192]
    # Perfect scaling everywhere (S = c / B): no S_min, B_crit beyond any batch measured.
    perfect = fit_critical_batch(batches, [1e6 / b for b in batches])
    assert abs(perfect.s_min) < 1e-9 * (1e6 / 128)
    # No gain from batch size at all (constant S): B_crit = 0.
    flat = fit_critical_batch(batches, [500.0] * 4)
    assert flat.s_min == pytest.approx(500.0) and flat.b_crit == pytest.approx(0.0, abs=1e-9)
    # Steps that grow with batch size: B_crit < 0, and the fit says it is no fit.
    assert not fit_critical_batch(batches, [400.0, 450.0, 500.0, 550.0]).valid
    assert fit_critical_batch([128, 128], [5.0, 6.0]) is None


def test_perfect_scaling_line_halves_per_doubling():
    assert perfect_scaling([128, 256, 1024], 128, 4000) == [4000, 2000, 500]


def test_t_quantiles_and_interval():
    assert t_quantile_975(2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile_975(40) == pytest.approx(2.021, abs=1e-3)
    assert t_quantile_975(120) == pytest.approx(1.980, abs=1e-3)
    mean, half = mean_interval([0.60, 0.62, 0.64])
    # sd 0.02, n 3: 4.303 * 0.02 / sqrt(3).
    assert mean == pytest.approx(0.62) and half == pytest.approx(4.303 * 0.02 / math.sqrt(3))
    assert math.isnan(mean_interval([0.5])[1]) and math.isnan(mean_interval([])[0])


def test_loglog_slope_tells_linear_from_square_root_scaling():
    batches = [128, 512, 2048, 8192]
    assert loglog_slope(batches, [1e-3 * b / 128 for b in batches])[0] == pytest.approx(1.0)
    slope, se = loglog_slope(batches, [1e-3 * math.sqrt(b / 128) for b in batches])
    assert slope == pytest.approx(0.5) and se == pytest.approx(0.0, abs=1e-9)
