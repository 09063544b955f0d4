"""Sweep report: report.md, PNG plots and CSVs of a batch-size x optimizer sweep, from its run
directories alone (so ``bigbatch sweep --report-only`` rebuilds it at any time)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigbatch.report.results import hardware_of
from bigbatch.report.sweep_figures import plot_panels, plot_to_target, plot_tuned_lr
from bigbatch.report.sweep_numbers import (
    NOISE_SCALE_EPOCHS,
    CellRuns,
    cell_summary,
    group_summaries,
    tuning_rows,
)
from bigbatch.report.tables import (
    FLATNESS,
    finish_report,
    flatness_table,
    fmt,
    hardware_note,
    markdown_table,
)


@dataclass
class Budget:
    """What the sweep set out to spend, as AlgoPerf and Shallue et al. state theirs."""

    lr_rule: str  # e.g. "lr(B) = lr0 (B / 128)^0.5 x factor"
    lr_factors: list[float]
    base_lrs: dict[str, float]
    tuning_seeds: list[int]
    final_seeds: list[int]
    epochs: dict[int, int]  # the epoch budget per batch size
    planned_tuning_runs: int
    planned_final_runs: int  # distinct runs beyond the tuning runs, as far as known
    notes: list[str] = field(default_factory=list)


def _pm(row: dict[str, Any], key: str, pct: bool = False) -> str:
    return fmt(row.get(key, math.nan), pct, row.get(f"{key}_ci95"))


def _budget_lines(cells: list[CellRuns], budget: Budget, target: float) -> list[str]:
    runs = {r.name: r for c in cells for r in [*(run for _, run in c.tuning), *c.finals]}
    wall = sum(r.rows[-1]["wall_time"] for r in runs.values())
    steps = sum(r.rows[-1]["step"] for r in runs.values())
    epochs = ", ".join(f"{b}: {e}" for b, e in budget.epochs.items())
    lrs = ", ".join(f"{k} {v:g}" for k, v in budget.base_lrs.items())
    return [
        "## Budget",
        "",
        f"- Target: {100 * target:g}% test accuracy; every run stops after the first epoch "
        "reaching it (steps to target have an epoch's resolution), or at its epoch budget "
        f"(batch size: epochs) {epochs}.",
        f"- Learning-rate search: {budget.lr_rule}, factors "
        f"{', '.join(f'{f:g}' for f in budget.lr_factors)} ({len(budget.lr_factors)} values per "
        f"cell); base lr {lrs}; on tuning seeds {budget.tuning_seeds}.",
        f"- The chosen lr of each cell reruns on seeds {budget.final_seeds}.",
        f"- Runs: {budget.planned_tuning_runs} tuning + {budget.planned_final_runs} reruns "
        f"planned; {len(runs)} with results, {steps:,} optimizer steps and {wall / 3600:.2f} h "
        "of run wall time in all (training and evaluation, summed over runs; runs that train at "
        "once overlap).",
        *[f"- {n}" for n in budget.notes],
        "",
        *hardware_note([hardware_of(r.rows) for r in runs.values()]),
    ]


def write_sweep_report(
    cells: list[CellRuns],
    out_dir: Path,
    *,
    title: str,
    target: float,
    budget: Budget,
    command: str = "",
    notes: str = "",
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [cell_summary(c, target) for c in cells]
    groups = group_summaries(cells, target)
    tuning = tuning_rows(cells, target)
    md = [f"# {title}", ""]
    md += [f"Made by `{command}`.", ""] if command else []
    md += [notes, ""] if notes else []
    md += _budget_lines(cells, budget, target)

    noise = any(not math.isnan(r["grad_noise_scale"]) for r in rows)
    md += [
        "## Cells",
        "",
        "Mean ± 95% t-interval over the final seeds of each cell's tuned lr.",
        "",
    ]
    headers = ["cell", "tuned lr", "seeds at target", "steps to target", "time to target s"]
    headers += ["best test acc %", "final test acc %", "epochs"]
    headers += ["B_simple"] if noise else []
    headers += ["note"]
    table = []
    for r, c in zip(rows, cells):
        note = []
        if math.isnan(c.lr):
            note.append("no tuning results yet")
        elif not c.reached:
            note.append("no lr reached the target")
        if c.at_edge:
            note.append("lr at the edge of the grid")
        line = [
            r["cell"],
            "-" if math.isnan(c.lr) else f"{c.lr:g} (x{c.factor:g})",
            f"{r['seeds_reaching_target']}/{r['seeds']}",
            _pm(r, "steps_to_target"),
            _pm(r, "time_to_target_s"),
            _pm(r, "best_test_acc", True),
            _pm(r, "final_test_acc", True),
            _pm(r, "epochs"),
        ]
        line += [_pm(r, "grad_noise_scale")] if noise else []
        table.append([*line, "; ".join(note)])
    md += [markdown_table(headers, table), ""]
    if noise:
        md += [
            f"B_simple: the gradient noise scale logged by the runs, the mean of each run's last "
            f"{NOISE_SCALE_EPOCHS} epochs (those nearest the target, where McCandlish et al. "
            "compare it with B_crit), then over seeds.",
            "",
        ]

    md += [
        "## Critical batch size",
        "",
        "S(B) = S_min (1 + B_crit / B) (McCandlish et al. 2018) fitted to the steps to target of "
        "every final run that reached it (one point per seed), by least squares on relative "
        "residuals; ± is one standard error from the fit's covariance (B_crit by the delta "
        "method). Tuned-lr slope: d log lr / d log B by least squares (1: linear scaling, 0.5: "
        "square-root).",
        "",
    ]
    g_headers = ["optimizer", "points (batch sizes)", "S_min", "B_crit", "tuned-lr slope"]
    g_headers += ["B_simple range"] if noise else []
    g_table = []
    for g in groups:
        crit = fmt(g["b_crit"], std=g["b_crit_se"])
        if not math.isnan(g["b_crit"]) and not g["fit_valid"]:
            crit += " (no fit: a parameter <= 0)"
        line = [
            g["group"],
            f"{g['points']} ({g['batch_sizes']})",
            fmt(g["s_min"], std=g["s_min_se"]),
            crit,
            fmt(g["lr_slope"], std=g["lr_slope_se"]),
        ]
        if noise:
            line.append(f"{fmt(g['grad_noise_scale_min'])} - {fmt(g['grad_noise_scale_max'])}")
        g_table.append(line)
    md += [markdown_table(g_headers, g_table), ""]

    if any("hessian_trace" in r or "loss_rise_1d" in r for r in rows):
        md += ["## Flatness of each cell's solution", ""]
        md += [
            "The chosen lr's run on the first seed (`sharpness.json` and `flatness_1d.json` in "
            "its run directory; the 1-D loss rise is the train loss's mean rise at |a| = the "
            "sweep's `flatness_distance` along a filter-normalized random direction).",
            "",
        ]
        md += [flatness_table(rows, "cell"), ""]

    md += ["## Learning-rate search", ""]
    md.append(
        markdown_table(
            ["cell", "lr", "seed", "steps to target", "epochs", "final test acc %", "chosen"],
            [
                [
                    t["cell"],
                    f"{t['lr']:g}",
                    str(t["seed"]),
                    fmt(t["steps_to_target"]),
                    str(t["epochs"]),
                    fmt(t["final_test_acc"], True),
                    "yes" if t["chosen"] else "",
                ]
                for t in tuning
            ],
        )
    )
    md += ["", "`-`: not reached within the budget.", ""]

    plots = []
    if plot_to_target(rows, groups, "steps_to_target", "steps to target", out_dir / "steps.png"):
        plots.append(("Steps to target against batch size", "steps.png"))
    if plot_to_target(rows, groups, "time_to_target_s", "seconds to target", out_dir / "time.png"):
        plots.append(("Wall time to target against batch size", "time.png"))
    if plot_tuned_lr(rows, out_dir / "tuned_lr.png"):
        plots.append(("Tuned learning rate against batch size", "tuned_lr.png"))
    accuracy = [("best_test_acc", "best test accuracy"), ("final_test_acc", "final test accuracy")]
    if plot_panels(rows, accuracy, out_dir / "accuracy.png", log_y=False):
        plots.append(("Test accuracy against batch size", "accuracy.png"))
    if plot_panels(rows, list(FLATNESS), out_dir / "flatness.png", log_y=True):
        plots.append(("Flatness against batch size", "flatness.png"))
    md += ["## Plots", ""]
    for caption, name in plots:
        md += [f"### {caption}", "", f"![{name}]({name})", ""]
    return finish_report(
        out_dir,
        md,
        [
            ("cells.csv", "one row per cell (means and 95% half-widths over seeds)", rows),
            ("critical_batch.csv", "the fit per optimizer and smoothing", groups),
            ("tuning.csv", "every tuning run", tuning),
        ],
    )
