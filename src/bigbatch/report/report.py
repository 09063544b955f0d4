"""Study report: a Markdown file, a CSV of every number in it, and PNG comparison plots.

The report reads only run directories (config.json + metrics.jsonl), so it can be rebuilt at any
time from finished or partial runs: ``bigbatch report --study CONFIG``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigbatch.io import atomic_write_text, read_jsonl
from bigbatch.report.plots import plt, save_figure

X_AXES = {
    "epoch": ("epoch", "epoch"),
    "step": ("step", "updates (optimizer steps)"),
    "time": ("train_time", "training wall time (s)"),
}


@dataclass
class RunResult:
    name: str
    label: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    extra: dict[str, Any]  # e.g. sharpness numbers found in the run directory

    @property
    def optimizer(self) -> str:
        return {"sgd": "SGD", "kfac": "K-FAC"}.get(
            self.config["optimizer"]["name"], self.config["optimizer"]["name"]
        )

    @property
    def batch_size(self) -> int:
        return self.config["train"]["batch_size"]

    @property
    def smoothing(self) -> str:
        a = self.config["augment"]
        parts = []
        if a["mixup_alpha"] > 0:
            parts.append(f"Mixup a={a['mixup_alpha']:g}")
        if a["cutmix_alpha"] > 0:
            parts.append(f"CutMix a={a['cutmix_alpha']:g}")
        if a["label_smoothing"] > 0:
            parts.append(f"LS {a['label_smoothing']:g}")
        return ", ".join(parts) or "none"

    @property
    def smoothed(self) -> bool:
        return self.smoothing != "none"


def load_run(run_dir: Path, label: str | None = None) -> RunResult | None:
    config_path = run_dir / "config.json"
    rows = read_jsonl(run_dir / "metrics.jsonl")
    if not config_path.exists() or not rows:
        return None
    extra = {}
    sharpness = run_dir / "sharpness.json"
    if sharpness.exists():
        extra["sharpness"] = json.loads(sharpness.read_text())
    return RunResult(
        run_dir.name, label or run_dir.name, json.loads(config_path.read_text()), rows, extra
    )


def first_reaching(rows: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    return next((r for r in rows if r["test_acc"] >= target), None)


def summarize(run: RunResult, target: float) -> dict[str, Any]:
    last = run.rows[-1]
    best = max(run.rows, key=lambda r: r["test_acc"])
    hit = first_reaching(run.rows, target)
    train_acc = last.get("train_eval_acc", last["train_acc"])
    summary = {
        "run": run.name,
        "label": run.label,
        "optimizer": run.optimizer,
        "batch_size": run.batch_size,
        "smoothing": run.smoothing,
        "lr": run.config["optimizer"]["lr"],
        "epochs": last["epoch"],
        "updates": last["step"],
        "final_test_acc": last["test_acc"],
        "best_test_acc": best["test_acc"],
        "best_epoch": best["epoch"],
        "final_test_loss": last["test_loss"],
        "final_train_acc": train_acc,
        "generalization_gap": train_acc - last["test_acc"],
        "train_time_s": last["train_time"],
        "epochs_to_target": hit["epoch"] if hit else math.nan,
        "updates_to_target": hit["step"] if hit else math.nan,
        "time_to_target_s": hit["train_time"] if hit else math.nan,
    }
    if "sharpness" in run.extra:
        s = run.extra["sharpness"]
        summary["hessian_top_eigenvalue"] = s.get("top_eigenvalues", [math.nan])[0]
        summary["hessian_trace"] = s.get("trace", math.nan)
        summary["epsilon_sharpness"] = s.get("epsilon_sharpness", math.nan)
    return summary


NUMERIC = (
    "final_test_acc",
    "best_test_acc",
    "final_train_acc",
    "generalization_gap",
    "final_test_loss",
    "train_time_s",
    "epochs_to_target",
    "updates_to_target",
    "time_to_target_s",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "epsilon_sharpness",
)


def aggregate(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per label: the mean over seeds, with the sample std and seed count beside it."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for s in summaries:
        by_label.setdefault(s["label"], []).append(s)
    out = []
    for group in by_label.values():
        row = {
            k: group[0][k]
            for k in ("label", "optimizer", "batch_size", "smoothing", "lr", "epochs", "updates")
        }
        row["seeds"] = len(group)
        for key in NUMERIC:
            values = [g[key] for g in group if key in g and not math.isnan(g[key])]
            row[key] = statistics.fmean(values) if values else math.nan
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else math.nan
        out.append(row)
    return out


def degradation(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Small-batch minus large-batch test accuracy per optimizer and smoothing, and Mixup's
    reduction of it."""
    groups: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["optimizer"], r["smoothing"] != "none"), []).append(r)
    out = []
    for (opt, smoothed), group in sorted(groups.items()):
        if len({g["batch_size"] for g in group}) < 2:
            continue
        sb = min(group, key=lambda g: g["batch_size"])
        lb = max(group, key=lambda g: g["batch_size"])
        label = (
            sb["smoothing"]
            if sb["smoothing"] == lb["smoothing"]
            else f"{sb['smoothing']} (SB) / {lb['smoothing']} (LB)"
        )
        out.append(
            {
                "optimizer": opt,
                "smoothing": label,
                "smoothed": smoothed,
                "small_batch": sb["batch_size"],
                "large_batch": lb["batch_size"],
                "small_batch_test_acc": sb["final_test_acc"],
                "large_batch_test_acc": lb["final_test_acc"],
                "degradation": sb["final_test_acc"] - lb["final_test_acc"],
                "best_degradation": sb["best_test_acc"] - lb["best_test_acc"],
            }
        )
    for row in out:
        twin = next(
            (o for o in out if o["optimizer"] == row["optimizer"] and not o["smoothed"]), None
        )
        row["reduction_by_smoothing"] = (
            (twin["degradation"] - row["degradation"]) if row["smoothed"] and twin else math.nan
        )
    return out


def _fmt(value: Any, pct: bool = False, std: float | None = None) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        text = (
            f"{100 * value:.2f}"
            if pct
            else (f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}")
        )
        if std is not None and not math.isnan(std):
            text += f" ± {100 * std:.2f}" if pct else f" ± {std:.2g}"
        return text
    return str(value)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


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
    for run in runs:
        xs = [r[key] for r in run.rows]
        style = _style(run, large_batch_from)
        label = _run_label(run, large_batch_from)
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


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_report(
    runs: list[RunResult],
    out_dir: Path,
    *,
    title: str,
    target: float,
    command: str = "",
    notes: str = "",
    figures: list[Figure] | None = None,
    large_batch_from: int | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> Path:
    """report.md, its PNGs and CSVs in ``out_dir``; ``figures`` and ``large_batch_from`` (the batch
    size from which a run counts as large, for labels and line styles) come from the study."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = [summarize(r, target) for r in runs]
    agg = aggregate(summaries)
    deg = degradation(agg)
    multi_seed = any(a["seeds"] > 1 for a in agg)

    plots = []
    for figure, members in figure_runs(runs, figures or []):
        for x_axis in X_AXES:
            name = f"test_vs_{x_axis}_{figure.name}.png"
            plot_comparison(members, x_axis, figure.title, out_dir / name, target, large_batch_from)
            plots.append((figure.title, x_axis, name))
            progress(name)

    md = [f"# {title}", ""]
    if command:
        md += [f"Made by `{command}`.", ""]
    if notes:
        md += [notes, ""]
    md += ["## Runs", ""]
    seeds_note = " (mean ± std over seeds)" if multi_seed else ""
    md.append(
        _table(
            [
                "run",
                "optimizer",
                "batch",
                "smoothing",
                "lr",
                "epochs",
                "updates",
                f"final test acc %{seeds_note}",
                "best test acc %",
                "train acc %",
                "gap (train - test) %",
                "train time s",
            ],
            [
                [
                    a["label"],
                    a["optimizer"],
                    str(a["batch_size"]),
                    a["smoothing"],
                    f"{a['lr']:g}",
                    str(a["epochs"]),
                    str(a["updates"]),
                    _fmt(a["final_test_acc"], True, a["final_test_acc_std"]),
                    _fmt(a["best_test_acc"], True, a["best_test_acc_std"]),
                    _fmt(a["final_train_acc"], True),
                    _fmt(a["generalization_gap"], True, a["generalization_gap_std"]),
                    _fmt(a["train_time_s"]),
                ]
                for a in agg
            ],
        )
    )
    md += [
        "",
        "Train accuracy is measured without augmentation or Mixup on a fixed subset of the "
        "training set "
        "(`train.train_eval_examples`), at the last epoch.",
        "",
    ]
    md += [f"## Time to {100 * target:g}% test accuracy", ""]
    md.append(
        _table(
            ["run", "epochs", "updates", "train time s"],
            [
                [
                    a["label"],
                    _fmt(a["epochs_to_target"]),
                    _fmt(a["updates_to_target"]),
                    _fmt(a["time_to_target_s"]),
                ]
                for a in agg
            ],
        )
    )
    md += ["", "`-`: the run never reached the target.", ""]
    if deg:
        md += [
            "## Large-batch degradation",
            "",
            "Small-batch minus large-batch final test accuracy, per optimizer and smoothing; the "
            "last "
            "column is how many points smoothing removes from the unsmoothed degradation.",
            "",
        ]
        md.append(
            _table(
                [
                    "optimizer",
                    "smoothing",
                    "SB",
                    "LB",
                    "SB test acc %",
                    "LB test acc %",
                    "degradation (points)",
                    "best-epoch degradation",
                    "reduced by smoothing",
                ],
                [
                    [
                        d["optimizer"],
                        d["smoothing"],
                        str(d["small_batch"]),
                        str(d["large_batch"]),
                        _fmt(d["small_batch_test_acc"], True),
                        _fmt(d["large_batch_test_acc"], True),
                        _fmt(d["degradation"], True),
                        _fmt(d["best_degradation"], True),
                        _fmt(d["reduction_by_smoothing"], True),
                    ]
                    for d in deg
                ],
            )
        )
        md.append("")
    if any("hessian_top_eigenvalue" in s for s in summaries):
        md += ["## Flatness", ""]
        md.append(
            _table(
                ["run", "top Hessian eigenvalue", "Hessian trace", "epsilon-sharpness"],
                [
                    [
                        s["run"],
                        _fmt(s.get("hessian_top_eigenvalue", math.nan)),
                        _fmt(s.get("hessian_trace", math.nan)),
                        _fmt(s.get("epsilon_sharpness", math.nan)),
                    ]
                    for s in summaries
                ],
            )
        )
        md.append("")
    md += ["## Plots", ""]
    for group_title, x_axis, name in plots:
        md += [f"### {group_title}, against {X_AXES[x_axis][1]}", "", f"![{name}]({name})", ""]
    md += [
        "## Files",
        "",
        "- `summary.csv`: every number above, one row per run and seed",
        "- `aggregate.csv`: one row per run label (means and std over seeds)",
        "- `degradation.csv`",
        "",
    ]

    atomic_write_text(out_dir / "summary.csv", _csv(summaries))
    atomic_write_text(out_dir / "aggregate.csv", _csv(agg))
    atomic_write_text(out_dir / "degradation.csv", _csv(deg))
    report = out_dir / "report.md"
    atomic_write_text(report, "\n".join(md))
    return report
