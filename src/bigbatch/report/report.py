"""Study report: a Markdown file, a CSV of every number in it, and PNG comparison plots.

The report reads only run directories (config.json + metrics.jsonl), so it can be rebuilt at any
time: ``bigbatch reproduce CONFIG --report-only``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bigbatch.report.claims import claims_section, evaluate_claims
from bigbatch.report.configs import best_small_and_large
from bigbatch.report.figures import X_AXES, Figure, figure_runs, plot_comparison
from bigbatch.report.plots import plot_noise_scale
from bigbatch.report.results import (
    RunResult,
    aggregate,
    degradation,
    joined_hardware,
    load_run,
    one_known_machine,
    summarize,
)
from bigbatch.report.tables import (
    finish_report,
    flatness_table,
    fmt,
    hardware_note,
    markdown_table,
)

__all__ = [
    "Figure",
    "RunResult",
    "aggregate",
    "degradation",
    "load_run",
    "summarize",
    "write_report",
]


TO_TARGET = ("epochs_to_target", "updates_to_target", "time_to_target_s")
FLATNESS_NOTE = (
    "Hessian numbers and epsilon-sharpness: `sharpness.json` (`bigbatch sharpness`, or the study's "
    "`flatness = true`); 1-D loss rise: the train loss's mean rise at |a| = d on both sides along "
    "a filter-normalized random direction, (L(-d) + L(d)) / 2 - L(0), d = the study's "
    "`flatness_distance` (`flatness_1d.json` and its plot in each run directory)."
)


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
    deg = degradation(summaries)
    multi_seed = any(a["seeds"] > 1 for a in agg)
    claims_md, claims_rows = claims_section(*evaluate_claims(summaries, target))

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
    md += hardware_note([s["hardware"] for s in summaries])
    md += claims_md
    md += ["## Runs", ""]
    if multi_seed:
        md += [
            "Numbers of a run label are the mean ± sample std over its seeds; differences "
            "are ± the half-width of a 95% Welch interval.",
            "",
        ]
    seeds_note = " (mean ± std over seeds)" if multi_seed else ""
    md.append(
        markdown_table(
            [
                "run",
                "seeds",
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
                    str(a["seeds"]),
                    a["optimizer"],
                    str(a["batch_size"]),
                    a["smoothing"],
                    f"{a['lr']:g}",
                    str(a["epochs"]),
                    str(a["updates"]),
                    fmt(a["final_test_acc"], True, a["final_test_acc_std"]),
                    fmt(a["best_test_acc"], True, a["best_test_acc_std"]),
                    fmt(a["final_train_acc"], True, a["final_train_acc_std"]),
                    fmt(a["generalization_gap"], True, a["generalization_gap_std"]),
                    fmt(a["train_time_s"], std=a["train_time_s_std"]),
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
        markdown_table(
            ["run", "seeds reaching it", "epochs", "updates", "train time s"],
            [
                [
                    a["label"],
                    f"{a['seeds_reaching_target']} of {a['seeds']}",
                    *(fmt(a[k], std=a[f"{k}_std"]) for k in TO_TARGET),
                ]
                for a in agg
            ],
        )
    )
    md += [
        "",
        "`-`: no seed reached the target; otherwise means and spreads are over the seeds that did.",
        "",
    ]
    if deg:
        md += [
            "## Large-batch degradation",
            "",
            "Small-batch minus large-batch final test accuracy, per optimizer and smoothing; the "
            "last column is how many points smoothing removes from the unsmoothed degradation. "
            "With several seeds, accuracies are ± std and differences ± the half-width of a 95% "
            "Welch interval.",
            "",
        ]
        md.append(
            markdown_table(
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
                        fmt(d["small_batch_test_acc"], True, d["small_batch_test_acc_std"]),
                        fmt(d["large_batch_test_acc"], True, d["large_batch_test_acc_std"]),
                        fmt(d["degradation"], True, d["degradation_ci95"]),
                        fmt(d["best_degradation"], True, d["best_degradation_ci95"]),
                        fmt(d["reduction_by_smoothing"], True, d["reduction_by_smoothing_ci95"]),
                    ]
                    for d in deg
                ],
            )
        )
        md.append("")
    if large_batch_from is not None:
        md += best_against_best(summaries, large_batch_from)
    if any("hessian_top_eigenvalue" in s or "loss_rise_1d" in s for s in summaries):
        md += ["## Flatness", ""]
        md += [flatness_table(agg, "label"), ""]
        md += [FLATNESS_NOTE, ""]
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
    return finish_report(
        out_dir,
        md,
        [
            ("summary.csv", "every number above, one row per run and seed", summaries),
            ("aggregate.csv", "one row per run label (means and std over seeds)", agg),
            ("degradation.csv", "the large-batch degradation table", deg),
            ("claims.csv", "each claim's settings: difference, interval, verdict", claims_rows),
        ],
    )


def best_against_best(summaries: list[dict[str, Any]], large_batch_from: int) -> list[str]:
    """The section comparing the best large-batch config with the best small-batch one."""
    found = best_small_and_large(summaries, large_batch_from)
    if found is None:
        return []
    pair, n_small, n_large = found
    rows = []
    for side, group in (("small", pair.small), ("large", pair.large)):
        cells = [
            fmt(mean, True, std)
            for mean, std in (group.mean_std(k) for k in ("final_test_acc", "best_test_acc"))
        ]
        cells += [fmt(group.mean_std(key)[0]) for key in ("train_time_s", "time_to_target_s")]
        rows.append([side, group.label, str(group.batch_size), str(len(group.runs)), *cells])
    gap, half = pair.difference("final_test_acc")
    best_gap, best_half = pair.difference("best_test_acc")
    small_time, large_time = (g.mean_std("train_time_s")[0] for g in (pair.small, pair.large))
    time_ratio = large_time / small_time if small_time > 0 else math.nan
    small_hw, large_hw = (
        joined_hardware(r["hardware"] for r in g.runs) for g in (pair.small, pair.large)
    )
    machines = (
        ""
        if small_hw == large_hw and one_known_machine(small_hw)
        else f" (hardware of the small batch: {small_hw}; of the large: {large_hw}; not one "
        "machine, or not known to be)"
    )
    return [
        "## Best large batch against best small batch",
        "",
        f"The config of highest mean final test accuracy below batch {large_batch_from} (of "
        f"{n_small}) and at or above it (of {n_large}). They are chosen on the test set, so "
        "each winner's accuracy is read with that selection in mind.",
        "",
        markdown_table(
            [
                "side",
                "run",
                "batch",
                "seeds",
                "final test acc %",
                "best test acc %",
                "train time s",
                "time to target s",
            ],
            rows,
        ),
        "",
        f"Gap (small minus large batch), final test accuracy: {fmt(gap, True, half)} points; "
        f"best epoch: {fmt(best_gap, True, best_half)} (± the half-width of a 95% Welch "
        f"interval where both have two or more seeds). The large batch trains in "
        f"{fmt(time_ratio)}x the small batch's wall time{machines}.",
        "",
    ]
