"""What the user sees of a run's health: progress bars, losses that diverged, and the advice that
gets a stopped run going again."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from bigbatch.config import RuntimeConfig
from bigbatch.train.checkpoint import CHECKPOINT_NAME
from bigbatch.train.rundir import RunDirectory


def diverged(row: dict[str, Any], max_loss_factor: float, num_classes: int) -> str | None:
    """What is wrong with an epoch's losses, or None: non-finite, or above ``max_loss_factor``
    times log(classes), the loss of a uniform guess (0 checks finiteness only)."""
    limit = max_loss_factor * math.log(num_classes) if max_loss_factor > 0 else math.inf
    for key in ("train_loss", "test_loss"):
        value, epoch = row[key], row["epoch"]
        if not math.isfinite(value):
            return f"{key} is {value} after epoch {epoch}"
        if value > limit:
            return (
                f"{key} {value:.4g} after epoch {epoch} is above {limit:.3g}, "
                f"runtime.max_loss_factor={max_loss_factor:g} times log({num_classes}) "
                "(the loss of a uniform guess): the run diverged"
            )
    return None


LEARNED_LOSS, CHANCE_LOSS = 0.8, 0.95  # fractions of log(classes), a uniform guess's loss
CHANCE_ACCURACY = 2.0  # times 1 / classes, a uniform guess's accuracy


def collapsed(rows: list[dict[str, Any]], num_classes: int, epochs: int) -> str | None:
    """Why the run collapsed, or None: it had learned (a clean train loss of at most 0.8
    log(classes)) and then spent the last ``epochs`` epochs (0: never) with train and test loss
    of at least 0.95 log(classes), the loss of a uniform guess, which a finite-loss check misses,
    and train and test accuracy of at most twice a uniform guess's: a confident model that is
    often wrong has such losses too while it still predicts far better than chance."""
    if not epochs or len(rows) <= epochs:
        return None
    uniform, chance = math.log(num_classes), CHANCE_ACCURACY / num_classes
    recent, before = rows[-epochs:], rows[:-epochs]
    if not any(_clean(r, "loss") <= LEARNED_LOSS * uniform for r in before):
        return None
    if any(min(_clean(r, "loss"), r["test_loss"]) < CHANCE_LOSS * uniform for r in recent):
        return None
    if any(max(_clean(r, "acc"), r["test_acc"]) > chance for r in recent):
        return None
    return (
        f"train and test loss have been at least {CHANCE_LOSS:g} x log({num_classes}) = "
        f"{CHANCE_LOSS * uniform:.3g} (a uniform guess) and their accuracy at most "
        f"{chance:.0%} for the last {epochs} epochs, to epoch "
        f"{rows[-1]['epoch']}, after the run had learned: it collapsed "
        f"(runtime.collapse_epochs={epochs}). Its checkpoint holds the collapsed model: run "
        "again with --overwrite and a lower optimizer.lr or a warm-up (schedule.warmup_epochs)"
    )


def _clean(row: dict[str, Any], metric: str) -> float:
    """The train loss or accuracy without augmentation or Mixup where measured: a model that
    has learned keeps them good under any smoothing."""
    return float(row.get(f"train_eval_{metric}", row[f"train_{metric}"]))


def unhealthy(
    rows: list[dict[str, Any]],
    runtime: RuntimeConfig,
    num_classes: int,
    files: RunDirectory | None,
    run_dir: Path,
) -> str | None:
    """Why the run must stop after its last epoch (``rows``: every epoch so far) and what to do
    about it, or None: its losses diverged, or it collapsed."""
    divergence = diverged(rows[-1], runtime.max_loss_factor, num_classes)
    if divergence:
        return f"{divergence}; {stop_advice(files, run_dir)}"
    return collapsed(rows, num_classes, runtime.collapse_epochs)


def progress_enabled(mode: str, is_main: bool) -> bool:
    """Progress bars: "on", "off", or "auto" (on a terminal); only the main rank draws them."""
    if not is_main or mode == "off":
        return False
    return mode == "on" or sys.stderr.isatty()


def stop_advice(files: RunDirectory | None, run_dir: Path) -> str:
    """What is kept of a stopped run and the command that continues it."""
    path = (files.path if files is not None else run_dir) / CHECKPOINT_NAME
    if files is not None and files.replacing:
        return (
            f"the run it was to replace is unchanged in '{files.final}'. Lower optimizer.lr "
            "(or raise kfac.damping / add warm-up) and run again with --overwrite"
        )
    if path.exists():
        return (
            f"the last good checkpoint is kept at '{path}'. Continue from it with a lower "
            "learning rate: add --resume --allow-change optimizer.lr --set optimizer.lr=... "
            "(or raise kfac.damping, or add a warm-up, the same way)"
        )
    return (
        "no checkpoint was written yet. Lower optimizer.lr (or raise kfac.damping / add "
        "warm-up) and run again"
    )


def epoch_summary(row: dict[str, Any]) -> str:
    """The line printed after each epoch when progress is shown."""
    noise = row.get("grad_noise_scale")
    return (
        f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
        f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.4f} | {row['epoch_time']:.1f}s "
        f"({row['images_per_sec']:.0f} img/s)" + (f" | B_simple {noise:.0f}" if noise else "")
    )
