"""A run's 1-D flatness number: its loss along one filter-normalized random direction (Li et al.
2018; see landscape.py), and how far the train loss rises at a fixed distance on both sides:

    rise(d) = (L(theta* - d delta) + L(theta* + d delta)) / 2 - L(theta*)

Each filter of delta has the norm of the same filter of theta*, so d is a fraction of every
filter's norm and means the same for every run of a model, whatever the scale of its weights.
The curve is evaluated at 2 * CURVE_STEPS + 1 points, d / 2 apart over [-2d, 2d], for its plot;
the rise needs only -d, 0 and d. The direction's seed is the same for every run, so runs of one
model are compared along the same Gaussian draw.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from bigbatch.analysis.commands import plot_1d, random_landscape
from bigbatch.analysis.landscape import mean_rise
from bigbatch.analysis.loading import load_trained_run
from bigbatch.errors import BigbatchError
from bigbatch.io import atomic_write_json

FLATNESS_FILE = "flatness_1d.json"
CURVE_STEPS = 4  # points on each side of a = 0, d / 2 apart


def landscape_flatness(
    run_dir: str | Path,
    *,
    distance: float = 0.1,
    examples: int = 2000,
    seed: int = 0,
    batch_size: int = 1000,
    device: str = "auto",
) -> Path:
    """Write FLATNESS_FILE (settings, the rise of train and test loss at ``distance``, the curve)
    and its plot into the run directory; ``examples`` of each split (0: all of it)."""
    if not (math.isfinite(distance) and distance > 0):
        raise BigbatchError(f"the flatness distance must be a positive number, got {distance}")
    run = load_trained_run(run_dir, device=device)
    n_train = min(examples, run.dataset.num_train) if examples else run.dataset.num_train
    n_test = min(examples, run.dataset.num_test) if examples else run.dataset.num_test
    # Multiples of d / 2 (halving is exact in binary), so -d, 0 and d are points of the curve.
    alphas = [distance * k / 2 for k in range(-CURVE_STEPS, CURVE_STEPS + 1)]
    t0 = time.perf_counter()
    rows = random_landscape(run, alphas, 1, "filter", seed, n_train, n_test, batch_size)
    seconds = time.perf_counter() - t0
    origin = next(r for r in rows if r["c0"] == 0.0)
    result = {
        "settings": {
            "distance": distance,
            "normalization": "filter",
            "seed": seed,
            "train_examples": n_train,
            "test_examples": n_test,
            "split": "first examples of each split, no augmentation",
            "points": len(alphas),
            "checkpoint_epoch": run.epoch,
        },
        "train_loss_rise": mean_rise(rows, distance, "train_loss"),
        "test_loss_rise": mean_rise(rows, distance, "test_loss"),
        "train_loss": origin["train_loss"],
        "test_loss": origin["test_loss"],
        "seconds": seconds,
        "points": rows,
    }
    path = run.run_dir / FLATNESS_FILE
    atomic_write_json(path, result)
    plot_1d(
        [(run.run_dir.name, rows)],
        path.with_suffix(".png"),
        "a (filter-normalized direction)",
        f"{run.run_dir.name}: train loss rises {result['train_loss_rise']:.3g} at |a| = "
        f"{distance:g}",
    )
    return path
