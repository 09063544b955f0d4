"""A sweep cell's learning-rate choice from its tuning runs.

The rule, in order: the lr that reached the target on the most tuning seeds; among those, the
fewest mean steps to the target; then the higher mean test accuracy at the end of the run (the
epoch it stopped at); then the smaller lr (the safer side). When no lr reached the target, the one
with the highest mean best test accuracy is chosen and the cell is marked as short of the target.
A run that diverged counts as not reaching it (with its accuracy before it diverged, 0 if none).
A choice at either end of the grid is flagged: the best lr may lie beyond it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bigbatch.errors import BigbatchError
from bigbatch.io import read_jsonl
from bigbatch.report.scaling import steps_to_target

if TYPE_CHECKING:
    from bigbatch.experiments.sweep import Cell, SweepRun

# Written into a run directory whose run diverged: its lr is too high, a result, not retried.
DIVERGED_FILE = "diverged.txt"


@dataclass
class Candidate:
    """One lr of a cell's grid: what its tuning runs (one per tuning seed) measured."""

    factor: float
    lr: float
    steps: list[float | None]  # steps to target per seed with metrics; None: not reached
    final_acc: list[float]  # test accuracy at the last epoch of each run
    best_acc: list[float]

    @property
    def reached(self) -> int:
        return sum(s is not None for s in self.steps)

    @property
    def mean_steps(self) -> float:
        hit = [s for s in self.steps if s is not None]
        return statistics.fmean(hit) if hit else math.inf


@dataclass
class Choice:
    cell: Cell
    factor: float  # nan while no tuning run has metrics
    lr: float
    reached: bool
    at_edge: bool
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def has_data(self) -> bool:
        return bool(self.candidates)

    def summary(self) -> str:
        if not self.has_data:
            return "no tuning run has metrics yet"
        best = next(c for c in self.candidates if c.factor == self.factor)
        text = f"lr {self.lr:g} (factor {self.factor:g})"
        if self.reached:
            text += f", target in {best.mean_steps:.0f} steps"
        else:
            text += f", target not reached (best test acc {max(best.best_acc):.4f})"
        return text + (", at the edge of the lr grid" if self.at_edge else "")


def _candidate(factor: float, runs: list[SweepRun], target: float) -> Candidate | None:
    rows_per_seed: list[list[dict[str, Any]]] = []
    for run in runs:
        try:
            rows = read_jsonl(run.run_dir / "metrics.jsonl")
        except BigbatchError:
            rows = []  # a damaged file counts as no result until its run is resumed
        if not rows and (run.run_dir / DIVERGED_FILE).exists():
            rows = [{"epoch": 0, "step": 0, "test_acc": 0.0}]  # diverged in its first epoch
        if rows:
            rows_per_seed.append(rows)
    if not rows_per_seed:
        return None
    return Candidate(
        factor,
        runs[0].config.optimizer.lr,
        [steps_to_target(rows, target) for rows in rows_per_seed],
        [rows[-1]["test_acc"] for rows in rows_per_seed],
        [max(r["test_acc"] for r in rows) for rows in rows_per_seed],
    )


def choose_lr(cell: Cell, runs: list[SweepRun], target: float, factors: list[float]) -> Choice:
    """The cell's lr by the module's rule, from the metrics of its tuning ``runs``."""
    candidates = []
    for factor in factors:
        found = _candidate(factor, [r for r in runs if r.factor == factor], target)
        if found is not None:
            candidates.append(found)
    if not candidates:
        return Choice(cell, math.nan, math.nan, False, False)
    if any(c.reached for c in candidates):
        best = min(
            candidates,
            key=lambda c: (-c.reached, c.mean_steps, -statistics.fmean(c.final_acc), c.lr),
        )
    else:
        best = min(candidates, key=lambda c: (-statistics.fmean(c.best_acc), c.lr))
    edge = len(factors) > 1 and best.factor in (min(factors), max(factors))
    return Choice(cell, best.factor, best.lr, best.reached > 0, edge, candidates)
