"""The report's best large batch against best small batch (report/configs.best_small_and_large)."""

import math

import pytest

from bigbatch.report.configs import best_small_and_large
from bigbatch.report.report import best_against_best


def _runs(label, batch, accs, train_time):
    return [
        {
            "label": label,
            "batch_size": batch,
            "final_test_acc": acc,
            "best_test_acc": acc + 0.01,
            "train_time_s": train_time,
            "time_to_target_s": math.nan,
            "hardware": "CPU A",
        }
        for acc in accs
    ]


def test_the_best_of_each_side_and_their_welch_gap():
    summaries = [
        *_runs("sb-a", 128, [0.70, 0.72, 0.74], 100.0),
        *_runs("sb-b", 256, [0.60, 0.62, 0.64], 50.0),  # the worse small batch
        *_runs("lb-a", 2048, [0.68, 0.70, 0.72], 150.0),
        *_runs("lb-b", 1024, [0.50, 0.55, 0.60], 40.0),  # 1024 counts as large
    ]
    pair, n_small, n_large = best_small_and_large(summaries, large_batch_from=1024)
    assert (pair.small.label, pair.large.label, n_small, n_large) == ("sb-a", "lb-a", 2, 2)
    # Equal variances (0.02^2) and sizes (3): Welch's df is 4, t_0.975(4) = 2.776.
    gap, half = pair.difference("final_test_acc")
    assert gap == pytest.approx(0.02)
    assert half == pytest.approx(2.776 * math.sqrt(2 * 0.02**2 / 3), rel=1e-3)
    text = "\n".join(best_against_best(summaries, 1024))
    assert "| small | sb-a | 128 | 3 | 72.00 ± 2.00 | 73.00 ± 2.00 | 100 | - |" in text
    assert "| large | lb-a | 2048 | 3 | 70.00 ± 2.00 |" in text
    assert f"final test accuracy: 2.00 ± {100 * half:.2f} points" in text
    assert "in 1.5x the small batch's wall time" in text


def test_no_section_without_both_sides():
    assert best_small_and_large(_runs("sb", 128, [0.7], 1.0), large_batch_from=1024) is None
    assert best_against_best(_runs("lb", 2048, [0.7], 1.0), 1024) == []
