"""When a run is finished: its epoch budget spent, or (``run.stop_at_test_acc``) its target test
accuracy reached; the trainer, skip/resume and sweeps all ask here."""

from __future__ import annotations

from typing import Any


def reached_target(rows: list[dict[str, Any]], target: float) -> bool:
    """The last epoch's test accuracy is at least ``target`` (0 disables early stopping)."""
    return target > 0 and bool(rows) and rows[-1]["test_acc"] >= target


def training_finished(rows: list[dict[str, Any]], epochs: int, target: float) -> bool:
    """Nothing is left to train: ``epochs`` epochs done, or the target reached before them."""
    return bool(rows) and (rows[-1]["epoch"] >= epochs or reached_target(rows, target))
