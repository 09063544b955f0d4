"""A sweep's run directories as its report's inputs, and the report written from them."""

from __future__ import annotations

from pathlib import Path

from bigbatch.errors import BigbatchError
from bigbatch.experiments.sweep import LR_SCALING, Sweep, SweepRun, chosen_run
from bigbatch.experiments.tuning import DIVERGED_FILE, Choice
from bigbatch.report.results import RunResult, load_run
from bigbatch.report.sweep_numbers import CellRuns
from bigbatch.report.sweep_report import Budget, write_sweep_report


def _results(runs: list[SweepRun]) -> list[RunResult]:
    found = (load_run(r.run_dir, r.label) for r in runs)
    return [r for r in found if r is not None]


def collect_cells(sweep: Sweep, choices: list[Choice]) -> list[CellRuns]:
    """Each cell's tuning runs and its chosen lr's runs on the final seeds, those with metrics;
    a cell not rerun (it never reached the target) shows its chosen tuning runs instead."""
    tuning = sweep.tuning_runs()
    cells = []
    for choice in choices:
        cell = choice.cell
        own = [r for r in tuning if r.cell == cell]
        tuned = [(r.factor, load_run(r.run_dir, r.label)) for r in own]
        finals: list[RunResult] = []
        if choice.has_data:
            finals = _results([sweep.run(cell, choice.factor, s) for s in sweep.final_seeds])
            if not finals:
                finals = _results([r for r in own if r.factor == choice.factor])
        chosen = chosen_run(sweep, choice)
        cells.append(
            CellRuns(
                cell.optimizer,
                cell.smoothing,
                cell.batch_size,
                choice.lr,
                choice.factor,
                choice.reached,
                choice.at_edge,
                [(f, r) for f, r in tuned if r is not None],
                finals,
                load_run(chosen.run_dir, chosen.label) if chosen is not None else None,
            )
        )
    return cells


def sweep_budget(sweep: Sweep, choices: list[Choice]) -> Budget:
    tuning = {r.config.run.name for r in sweep.tuning_runs()}
    finals = {r.config.run.name for r in sweep.final_runs(choices)}
    notes = []
    waiting = sum(not c.has_data for c in choices)
    if waiting:
        notes.append(f"{waiting} cells have no tuning results yet: their reruns are not counted.")
    every = {r.config.run.name: r for r in [*sweep.tuning_runs(), *sweep.final_runs(choices)]}
    diverged = sorted(n for n, r in every.items() if (r.run_dir / DIVERGED_FILE).exists())
    if diverged:
        notes.append(
            f"{len(diverged)} runs diverged (counted as not reaching the target): "
            f"{', '.join(diverged)}."
        )
    if not sweep.rerun_unreached:
        notes.append("Cells whose every lr missed the target are not rerun (rerun_unreached).")
    return Budget(
        lr_rule=f"lr(B) = lr0 (B / {sweep.base_batch_size})^p x factor, p = "
        + ", ".join(
            f"{LR_SCALING[rule]:g} ({rule}) for {label}" for label, rule in sweep.lr_scaling.items()
        ),
        lr_factors=sweep.lr_factors,
        base_lrs={k: sweep.base_lr(k) for k in sweep.optimizers},
        tuning_seeds=sweep.tuning_seeds,
        final_seeds=sweep.final_seeds,
        epochs=sweep.epochs,
        planned_tuning_runs=len(tuning),
        planned_final_runs=len(finals - tuning),
        notes=notes,
    )


def write_report(sweep: Sweep, command: str = "") -> Path:
    """The sweep's report under output_dir/report from whatever its runs hold now."""
    choices = sweep.choices()
    if not any(c.has_data for c in choices):
        raise BigbatchError(
            f"no run of sweep '{sweep.name}' has metrics yet under {sweep.output_dir}/runs; run "
            "`bigbatch sweep` first"
        )
    return write_sweep_report(
        collect_cells(sweep, choices),
        sweep.output_dir / "report",
        title=f"Sweep: {sweep.name}",
        target=sweep.target,
        budget=sweep_budget(sweep, choices),
        command=command,
        notes=sweep.description.strip(),
    )
