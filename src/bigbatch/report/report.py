"""Study report: a Markdown file, a CSV of every number in it, and PNG comparison plots.

The report reads only run directories (config.json + metrics.jsonl), so it can be rebuilt at any
time from finished or partial runs: ``bigbatch report --study CONFIG``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bigbatch.io import atomic_write_text
from bigbatch.report.figures import X_AXES, Figure, figure_runs, plot_comparison
from bigbatch.report.plots import plot_noise_scale
from bigbatch.report.results import RunResult, aggregate, degradation, load_run, summarize

__all__ = [
    "Figure",
    "RunResult",
    "aggregate",
    "degradation",
    "load_run",
    "summarize",
    "write_report",
]


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
    noise_plot = plot_noise_scale({r.name: r.rows for r in runs}, out_dir / "noise_scale.png")
    if noise_plot:
        progress("noise_scale.png")

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
    if noise_plot:
        md += [
            "### Gradient noise scale (B_simple), per epoch",
            "",
            "![noise](noise_scale.png)",
            "",
        ]
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
