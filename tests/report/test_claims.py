"""The reference study's claims (report/claims.py) on fake runs with known numbers: held, not held,
undecided, one seed, runs that never reach the target, missing and ambiguous configs; the Welch
interval against hand computations."""

import csv
import math

import pytest
from fake_runs import fake_run

from bigbatch.report.claims import (
    HELD,
    NEEDS_SEEDS,
    NOT_HELD,
    UNDECIDED,
    evaluate_claims,
)
from bigbatch.report.report import load_run, summarize, write_report
from bigbatch.report.scaling import welch_interval

TARGET = 0.5


def test_welch_interval_against_hand_computations():
    # Means 2 and 6, variances 1 and 2: var = 1/3 + 2/2 = 4/3, dof = (4/3)^2 / ((1/3)^2 / 2 + 1)
    # = 32/19 = 1.68, rounded down to 1: t = 12.706.
    estimate, half = welch_interval([(1.0, [1, 2, 3]), (-1.0, [5, 7])])
    assert estimate == pytest.approx(-4.0)
    assert half == pytest.approx(12.706 * math.sqrt(4 / 3))
    # Equal sizes and variances: Welch's dof is the pooled test's 2n - 2 = 4 (t = 2.776).
    estimate, half = welch_interval([(1.0, [4, 5, 6]), (-1.0, [1, 2, 3])])
    assert (estimate, half) == pytest.approx((3.0, 2.776 * math.sqrt(2 / 3)))
    # A coefficient scales the mean and its variance: 0.5 * 5 - 2 = 0.5, var 0.25 / 3 + 1 / 3.
    estimate, half = welch_interval([(0.5, [4, 5, 6]), (-1.0, [1, 2, 3])])
    dof = (5 / 12) ** 2 / ((1 / 12) ** 2 / 2 + (1 / 3) ** 2 / 2)  # 2.94 -> 2: t = 4.303
    assert math.floor(dof) == 2
    assert (estimate, half) == pytest.approx((0.5, 4.303 * math.sqrt(5 / 12)))
    assert math.isnan(welch_interval([(1.0, [4.0]), (-1.0, [1, 2])])[1])
    assert welch_interval([(1.0, [2, 2]), (-1.0, [1, 1])]) == (1.0, 0.0)


def _runs(tmp_path, spec, seeds):
    """Fake runs, one label per (optimizer, batch, mixup) of ``spec``; each value is a function
    of the seed giving (test accuracies per epoch, 1-D loss rise or None)."""
    results = []
    for (optimizer, batch, mixup), make in spec.items():
        label = f"{optimizer}-b{batch}" + ("-mixup" if mixup else "")
        for seed in seeds:
            accs, rise = make(seed)
            path = fake_run(tmp_path, f"{label}-s{seed}", optimizer, batch, mixup, accs, seed, rise)
            results.append(load_run(path, label))
    return results


def _claims(results):
    claims, _ = evaluate_claims([summarize(r, TARGET) for r in results], TARGET)
    return {c.number: c for c in claims}


def _final(*values):
    """A run that reaches ``TARGET`` in its second epoch and ends at the seed's value."""
    return lambda seed: ([0.3, TARGET, values[seed % len(values)]], None)


def _reaching(epoch, final, rises):
    """Reaches ``TARGET`` at ``epoch`` of 3, ends at ``final`` + 0.01 x seed; ``rises`` per seed."""
    return lambda seed: (
        [0.3] * (epoch - 1) + [TARGET] * (3 - epoch) + [final + 0.01 * seed],
        rises[seed],
    )


def test_paper_grid_with_every_claim_held(tmp_path):
    spec = {
        # SGD reaches 50% at epoch 3, K-FAC at epoch 1; 10 points of degradation without Mixup,
        # 2 with it; Mixup lowers every loss rise.
        ("sgd", 128, 0.0): _reaching(3, 0.60, [0.30, 0.32, 0.31]),
        ("sgd", 2048, 0.0): _reaching(3, 0.50, [0.20, 0.22, 0.21]),
        ("sgd", 128, 0.9): _reaching(3, 0.62, [0.10, 0.12, 0.11]),
        ("sgd", 2048, 0.7): _reaching(3, 0.60, [0.10, 0.11, 0.12]),
        ("kfac", 128, 0.0): _reaching(1, 0.60, [9.0, 9.5, 9.2]),
        ("kfac", 2048, 0.0): _reaching(1, 0.50, [5.0, 5.2, 5.1]),
        ("kfac", 128, 0.9): _reaching(1, 0.62, [1.0, 1.1, 1.2]),
        ("kfac", 2048, 0.7): _reaching(1, 0.60, [0.5, 0.6, 0.7]),
    }
    results = _runs(tmp_path / "runs", spec, seeds=[0, 1, 2])
    claims = _claims(results)
    assert all(c.verdict == HELD for c in claims.values()), {
        n: [(x.setting, x.verdict) for x in c.comparisons] for n, c in claims.items()
    }
    # Updates: 3 epochs of 390 against 1 at batch 128, 3 x 24 against 1 x 24 at 2048; every
    # seed alike, so the interval has no width.
    first = {c.setting: c for c in claims[1].comparisons}
    assert set(first) == {
        "batch 128, none",
        "batch 2048, none",
        "batch 128, Mixup",
        "batch 2048, Mixup",
    }
    assert (first["batch 128, none"].estimate, first["batch 128, none"].half_width) == (780, 0)
    assert first["batch 2048, Mixup"].estimate == 48
    # Degradation 10 points without Mixup and 2 with it; D = 0.5 * 10 - 2 = 3 points.
    (sgd,) = [c for c in claims[3].comparisons if c.setting.startswith("SGD")]
    assert sgd.estimate == pytest.approx(0.03)
    seeds = [0.0, 0.01, 0.02]
    expected = welch_interval(
        [(0.5, [0.60 + s for s in seeds]), (-0.5, [0.50 + s for s in seeds]),
         (-1.0, [0.62 + s for s in seeds]), (1.0, [0.60 + s for s in seeds])]
    )  # fmt: skip
    assert sgd.half_width == pytest.approx(expected[1])
    rises = {c.setting: c.estimate for c in claims[4].comparisons}
    assert rises["SGD, batch 128"] == pytest.approx(0.2)
    assert rises["K-FAC, batch 2048"] == pytest.approx(4.5)
    assert "at |a| = 0.1" in claims[4].rule

    text = write_report(results, tmp_path / "report", title="T", target=TARGET).read_text()
    assert (
        "### 2. A large batch loses accuracy against a small one (no smoothing): **held**" in text
    )
    # Means 61 and 51, half-widths t(2) x 1 point / sqrt(3) = 2.48.
    assert "| SGD, batch 128 vs 2048 | 61.00 ± 2.48 (n=3) | 51.00 ± 2.48 (n=3) |" in text
    rows = list(csv.DictReader((tmp_path / "report" / "claims.csv").open()))
    assert len(rows) == 4 + 2 + 2 + 4 and {r["verdict"] for r in rows} == {HELD}


def test_not_held_undecided_and_one_seed(tmp_path):
    spec = {
        ("sgd", 128, 0.0): _final(0.50, 0.51, 0.52),
        ("sgd", 2048, 0.0): _final(0.60, 0.61, 0.62),  # LB better: not held
        ("kfac", 128, 0.0): _final(0.50, 0.60, 0.55),
        ("kfac", 2048, 0.0): _final(0.54, 0.55, 0.56),  # equal means: the interval spans 0
    }
    claims = _claims(_runs(tmp_path / "a", spec, seeds=[0, 1, 2]))
    verdicts = {c.setting: c.verdict for c in claims[2].comparisons}
    assert verdicts == {"K-FAC, batch 128 vs 2048": UNDECIDED, "SGD, batch 128 vs 2048": NOT_HELD}
    assert claims[2].verdict == NOT_HELD
    low, high = next(c for c in claims[2].comparisons if c.verdict == UNDECIDED).interval
    assert low < 0 < high
    one_seed = _claims(_runs(tmp_path / "b", spec, seeds=[0]))
    assert {c.verdict for c in one_seed[2].comparisons} == {NEEDS_SEEDS}
    assert one_seed[2].verdict == NEEDS_SEEDS
    assert one_seed[2].comparisons[0].estimate == pytest.approx(0.5 - 0.54)  # still shown
    # No Mixup runs and no flatness: the section says what it could not test, and why.
    assert claims[3].verdict == "not testable" and "no runs" in claims[3].missing
    assert not claims[4].comparisons


def test_runs_that_never_reach_the_target_are_bounds(tmp_path):
    never = lambda seed: ([0.3, 0.4, 0.45], None)  # noqa: E731
    spec = {
        ("sgd", 2048, 0.0): never,  # >= 72 updates
        ("kfac", 2048, 0.0): lambda seed: ([0.5, 0.5, 0.5], None),  # 24 updates
        ("sgd", 512, 0.0): lambda seed: ([0.5, 0.5], None),  # 97 updates
        ("kfac", 512, 0.0): never,  # >= 291, above SGD: not held whatever the truth
        ("sgd", 128, 0.0): lambda seed: ([0.3] * 9 + [0.5], None),  # 3900 updates
        # K-FAC reaches in 390 updates on two seeds, and the third has 780 updates so far.
        ("kfac", 128, 0.0): lambda seed: ([0.3, 0.4] if seed == 2 else [0.5], None),
    }
    claims = _claims(_runs(tmp_path, spec, seeds=[0, 1, 2]))
    found = {c.setting: c for c in claims[1].comparisons}
    held = found["batch 2048, none"]
    assert (held.verdict, held.estimate) == (HELD, 48) and "bound" in held.note
    assert found["batch 512, none"].verdict == NOT_HELD
    # Observed D > 0 with a clear interval, but K-FAC's bound could hide any number of updates.
    bounded = found["batch 128, none"]
    assert bounded.estimate - bounded.half_width > 0 and bounded.verdict == UNDECIDED
    assert claims[1].verdict == NOT_HELD


def test_configs_sharing_optimizer_batch_and_smoothing_are_left_out(tmp_path):
    results = _runs(tmp_path / "a", {("sgd", 128, 0.0): _final(0.6, 0.61)}, seeds=[0, 1])
    results += _runs(tmp_path / "b", {("sgd", 2048, 0.0): _final(0.5, 0.51)}, seeds=[0, 1])
    twin = fake_run(tmp_path / "c", "sgd-b128-warmup-s0", "sgd", 128, 0.0, [0.3, 0.5, 0.6])
    claims, index = evaluate_claims(
        [summarize(r, TARGET) for r in [*results, load_run(twin, "sgd-b128-warmup")]], TARGET
    )
    assert index.ambiguous == ["sgd-b128, sgd-b128-warmup"]
    assert not claims[2].comparisons  # batch 128 is ambiguous: SGD has only batch 2048 left
    text = write_report(
        [*results, load_run(twin, "sgd-b128-warmup")], tmp_path / "r", title="T", target=TARGET
    ).read_text()
    assert "Left out (runs of one optimizer, batch size and smoothing under several labels)" in text
