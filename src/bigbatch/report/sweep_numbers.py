"""The numbers of a sweep report: per cell (over its final seeds) and per optimizer and smoothing
(the critical-batch fit, the tuned lr's scaling)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from bigbatch.report.results import RunResult
from bigbatch.report.scaling import (
    fit_critical_batch,
    loglog_slope,
    mean_interval,
    steps_to_target,
    time_to_target,
)

NOISE_SCALE_EPOCHS = 3  # B_simple: the mean over a run's last evaluations, those nearest the target


@dataclass
class CellRuns:
    """What a sweep cell's run directories hold: its tuning runs and its chosen lr's final runs."""

    optimizer: str
    smoothing: str
    batch_size: int
    lr: float  # the chosen lr (nan without tuning results)
    factor: float
    reached: bool  # the chosen lr reached the target on a tuning seed
    at_edge: bool  # the chosen lr is the smallest or largest of the grid
    tuning: list[tuple[float, RunResult]] = field(default_factory=list)  # (lr factor, run)
    finals: list[RunResult] = field(default_factory=list)  # the chosen lr on the final seeds
    chosen: RunResult | None = None  # the run the flatness analysis was made on

    @property
    def name(self) -> str:
        tail = "" if self.smoothing == "none" else f"-{self.smoothing}"
        return f"{self.optimizer}{tail}-b{self.batch_size}"

    @property
    def group(self) -> str:
        return self.optimizer if self.smoothing == "none" else f"{self.optimizer}+{self.smoothing}"


def noise_scale(rows: list[dict[str, Any]]) -> float:
    """Mean gradient noise scale (B_simple) of a run's last epochs; nan where none is logged."""
    values = [
        r["grad_noise_scale"]
        for r in rows[-NOISE_SCALE_EPOCHS:]
        if isinstance(r.get("grad_noise_scale"), int | float)
        and math.isfinite(r["grad_noise_scale"])
    ]
    return statistics.fmean(values) if values else math.nan


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def cell_summary(cell: CellRuns, target: float) -> dict[str, Any]:
    """One row per cell: means and 95% half-widths over its final runs."""
    runs = cell.finals
    steps = [steps_to_target(r.rows, target) for r in runs]
    times = [time_to_target(r.rows, target) for r in runs]
    row: dict[str, Any] = {
        "cell": cell.name,
        "group": cell.group,
        "optimizer": cell.optimizer,
        "smoothing": cell.smoothing,
        "batch_size": cell.batch_size,
        "lr": cell.lr,
        "lr_factor": cell.factor,
        "lr_at_edge": cell.at_edge,
        "seeds": len(runs),
        "seeds_reaching_target": sum(s is not None for s in steps),
    }
    for key, values in (
        ("steps_to_target", [_nan(s) for s in steps]),
        ("time_to_target_s", [_nan(t) for t in times]),
        ("best_test_acc", [max(x["test_acc"] for x in r.rows) for r in runs]),
        ("final_test_acc", [r.rows[-1]["test_acc"] for r in runs]),
        ("epochs", [float(r.rows[-1]["epoch"]) for r in runs]),
        ("grad_noise_scale", [noise_scale(r.rows) for r in runs]),
    ):
        row[key], row[f"{key}_ci95"] = mean_interval(values)
    sharp = cell.chosen.extra.get("sharpness") if cell.chosen is not None else None
    if sharp:
        row["hessian_top_eigenvalue"] = sharp.get("top_eigenvalues", [math.nan])[0]
        row["hessian_trace"] = sharp.get("trace", math.nan)
        row["epsilon_sharpness"] = sharp.get("epsilon_sharpness", math.nan)
    landscape = cell.chosen.extra.get("landscape") if cell.chosen is not None else None
    if landscape:
        row["loss_rise_1d"] = landscape.get("train_loss_rise", math.nan)
    return row


def group_summaries(cells: list[CellRuns], target: float) -> list[dict[str, Any]]:
    """Per optimizer and smoothing: the critical-batch fit on every final run that reached the
    target (one point per seed), the tuned lr's log-log slope, and the cells' B_simple range."""
    out = []
    for group in dict.fromkeys(c.group for c in cells):
        members = [c for c in cells if c.group == group]
        batches, steps = [], []
        for c in members:
            for r in c.finals:
                s = steps_to_target(r.rows, target)
                if s is not None and s > 0:
                    batches.append(c.batch_size)
                    steps.append(s)
        fit = fit_critical_batch(batches, steps) if batches else None
        tuned = [c for c in members if not math.isnan(c.lr)]
        slope, slope_se = loglog_slope([c.batch_size for c in tuned], [c.lr for c in tuned])
        noise = [noise_scale(r.rows) for c in members for r in c.finals]
        noise = [n for n in noise if not math.isnan(n)]
        out.append(
            {
                "group": group,
                "points": len(steps),
                "batch_sizes": len(set(batches)),
                "s_min": fit.s_min if fit else math.nan,
                "s_min_se": fit.s_min_se if fit else math.nan,
                "b_crit": fit.b_crit if fit else math.nan,
                "b_crit_se": fit.b_crit_se if fit else math.nan,
                "fit_valid": bool(fit and fit.valid),
                "lr_slope": slope,
                "lr_slope_se": slope_se,
                "grad_noise_scale_min": min(noise) if noise else math.nan,
                "grad_noise_scale_max": max(noise) if noise else math.nan,
            }
        )
    return out


def tuning_rows(cells: list[CellRuns], target: float) -> list[dict[str, Any]]:
    """Every tuning run: the lr search in full."""
    return [
        {
            "cell": c.name,
            "lr_factor": factor,
            "lr": run.config["optimizer"]["lr"],
            "seed": run.config["run"]["seed"],
            "chosen": factor == c.factor,
            "steps_to_target": _nan(steps_to_target(run.rows, target)),
            "epochs": run.rows[-1]["epoch"],
            "final_test_acc": run.rows[-1]["test_acc"],
            "best_test_acc": max(r["test_acc"] for r in run.rows),
            "wall_time_s": run.rows[-1]["wall_time"],
        }
        for c in cells
        for factor, run in c.tuning
    ]
