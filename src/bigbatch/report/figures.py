"""Comparison plots of a study: test accuracy and loss against epochs, updates or time."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigbatch.report.plots import plt, save_figure
from bigbatch.report.results import RunResult

X_AXES = {
    "epoch": ("epoch", "epoch"),
    "step": ("step", "updates (optimizer steps)"),
    "time": ("train_time", "training wall time (s)"),
}


@dataclass
class Figure:
    """One comparison plot of a report: the runs with these labels (all runs if none are named)."""

    name: str
    title: str
    labels: list[str] = field(default_factory=list)


def _is_large(run: RunResult, large_batch_from: int | None) -> bool:
    return large_batch_from is not None and run.batch_size >= large_batch_from


def _style(run: RunResult, large_batch_from: int | None) -> dict[str, Any]:
    color = {"SGD": "tab:blue", "K-FAC": "tab:red"}.get(run.optimizer, "tab:gray")
    if run.smoothed:
        color = {"SGD": "tab:cyan", "K-FAC": "tab:orange"}.get(run.optimizer, "tab:olive")
    return {"color": color, "linestyle": "--" if _is_large(run, large_batch_from) else "-"}


def _run_label(run: RunResult, large_batch_from: int | None) -> str:
    size = (
        "" if large_batch_from is None else ("LB " if _is_large(run, large_batch_from) else "SB ")
    )
    return f"{size}{run.optimizer} ({run.batch_size}{', ' + run.smoothing if run.smoothed else ''})"


def legend_labels(runs: list[RunResult], large_batch_from: int | None = None) -> list[str]:
    """One legend entry per config (``RunResult.label``, whose seeds the report aggregates): its
    first seed carries the label with the seed count; the others, drawn in the same style, are
    hidden from the legend by matplotlib's '_' prefix."""
    seeds = Counter(run.label for run in runs)
    out, seen = [], set()
    for run in runs:
        label = _run_label(run, large_batch_from)
        if run.label in seen:
            out.append("_" + label)
        else:
            seen.add(run.label)
            out.append(label if seeds[run.label] == 1 else f"{label}, {seeds[run.label]} seeds")
    return out


def figure_runs(
    runs: list[RunResult], figures: list[Figure]
) -> list[tuple[Figure, list[RunResult]]]:
    """The runs of each figure (a study's own list, else one figure of all runs); empty ones go."""
    chosen = figures or [Figure("all", "All runs")]
    out = []
    for figure in chosen:
        members = [r for r in runs if not figure.labels or r.label in figure.labels]
        if members:
            out.append((figure, members))
    return out


def plot_comparison(
    runs: list[RunResult],
    x_axis: str,
    title: str,
    path: Path,
    target: float | None = None,
    large_batch_from: int | None = None,
) -> None:
    key, xlabel = X_AXES[x_axis]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.2))
    for run, label in zip(runs, legend_labels(runs, large_batch_from), strict=True):
        xs = [r[key] for r in run.rows]
        style = _style(run, large_batch_from)
        ax_acc.plot(xs, [100 * r["test_acc"] for r in run.rows], label=label, **style)
        ax_loss.plot(xs, [r["test_loss"] for r in run.rows], label=label, **style)
    if target:
        ax_acc.axhline(100 * target, color="gray", linewidth=0.8, linestyle=":")
    ax_acc.set_ylabel("test top-1 accuracy (%)")
    ax_loss.set_ylabel("test loss")
    for ax in (ax_acc, ax_loss):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if x_axis == "step":
            ax.set_xscale("log")
    ax_acc.legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)
