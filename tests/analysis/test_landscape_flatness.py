"""The 1-D flatness number (analysis/flatness.py, landscape.mean_rise): by hand on a curve, and on a
trained run against the loss evaluated at theta* - d delta, theta*, theta* + d delta directly."""

import copy
import json

import pytest
import torch

from bigbatch.analysis.flatness import FLATNESS_FILE, landscape_flatness
from bigbatch.analysis.landscape import evaluate_loss, mean_rise, random_direction
from bigbatch.analysis.loading import load_trained_run


def test_mean_rise_of_a_curve():
    rows = [
        {"c0": -0.2, "train_loss": 9.0},
        {"c0": -0.1, "train_loss": 1.5},
        {"c0": 0.0, "train_loss": 1.0},
        {"c0": 0.1, "train_loss": 2.0},
    ]
    assert mean_rise(rows, 0.1) == pytest.approx(0.75)  # (1.5 + 2.0) / 2 - 1.0
    with pytest.raises(ValueError, match="no point at a"):
        mean_rise(rows, 0.2)


def test_landscape_flatness_equals_the_loss_at_three_points(synthetic_run):
    distance, examples = 0.1, 100
    path = landscape_flatness(synthetic_run, distance=distance, examples=examples, device="cpu")
    assert path == synthetic_run / FLATNESS_FILE
    result = json.loads(path.read_text())
    assert result["settings"]["train_examples"] == examples
    assert result["settings"]["checkpoint_epoch"] == 1
    assert [p["c0"] for p in result["points"]] == pytest.approx(
        [-0.2, -0.15, -0.1, -0.05, 0.0, 0.05, 0.1, 0.15, 0.2]
    )
    assert path.with_suffix(".png").exists()

    run = load_trained_run(synthetic_run, device="cpu")
    batches = run.batches("train", examples, 1000)
    direction = random_direction(run.model, 0, "filter")
    losses = {}
    for a in (-distance, 0.0, distance):
        model = copy.deepcopy(run.model)
        with torch.no_grad():
            for p, d in zip(model.parameters(), direction):
                p.add_(d, alpha=a)
        losses[a] = evaluate_loss(model, batches)[0]
    at = {p["c0"]: p["train_loss"] for p in result["points"]}
    for a, loss in losses.items():  # each point, to float32 rounding of another summation order
        assert at[a] == pytest.approx(loss, rel=1e-5), a
    expected = (losses[-distance] + losses[distance]) / 2 - losses[0.0]
    assert expected > 0  # a trained minimum: the loss rises on both sides
    # The rise is a small difference of float32 means: a few units of their last place apart
    # (summation order differs by CPU), a small fraction of the rise itself.
    resolution = 16 * torch.finfo(torch.float32).eps * max(losses.values())
    assert resolution < 0.05 * expected
    assert result["train_loss_rise"] == pytest.approx(expected, rel=0, abs=resolution)
    assert result["train_loss"] == pytest.approx(losses[0.0], rel=1e-5)
