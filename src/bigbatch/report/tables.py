"""Markdown tables, CSV text and number formatting shared by the reports, and their last step:
the CSV files and report.md written."""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from pathlib import Path
from typing import Any

from bigbatch.io import atomic_write_text
from bigbatch.report.results import UNRECORDED, one_known_machine


def fmt(value: Any, pct: bool = False, std: float | None = None) -> str:
    """A number for a table: percent points with ``pct``, ``± std`` beside it when given."""
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        text = f"{100 * value:.2f}" if pct else _plain(value, 3)
        if std is not None and not math.isnan(std):
            text += f" ± {100 * std:.2f}" if pct else f" ± {_plain(std, 2)}"
        return text
    return str(value)


def _plain(value: float, digits: int) -> str:
    # Whole numbers from 100 up: "2.3e+02" is harder to read than "230".
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.{digits}g}"


def hardware_note(hardware: list[str]) -> list[str]:
    """A paragraph saying which hardware the runs (``hardware``: one name per run, as
    results.hardware_of gives it) trained on, and warning when their times mix machines."""
    counts = Counter(hardware)  # in first-seen order
    if not counts:
        return []
    if set(counts) == {UNRECORDED}:
        return [
            "Hardware: not recorded by these runs (made before bigbatch recorded it); "
            "compare their times only if they trained on one machine.",
            "",
        ]
    (first, n), *others = counts.items()
    if not others and one_known_machine(first):
        runs = "the run" if n == 1 else f"all {n} runs"
        return [f"Hardware: {runs} trained on {first}.", ""]
    listed = "; ".join(f"{name} ({n} run{'s' * (n > 1)})" for name, n in counts.items())
    return [
        f"Hardware: **the runs' times come from different machines**: {listed} (A + B: a run "
        "with epochs on each, or recorded only in part). Compare train times only between runs "
        "of one machine (the `hardware` field of each run's metrics.jsonl rows).",
        "",
    ]


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


FLATNESS = (
    ("hessian_top_eigenvalue", "top Hessian eigenvalue"),
    ("hessian_trace", "Hessian trace"),
    ("epsilon_sharpness", "epsilon-sharpness"),
    ("loss_rise_1d", "1-D loss rise"),
)


def flatness_table(rows: list[dict[str, Any]], name_key: str) -> str:
    """Top Hessian eigenvalue, trace, epsilon-sharpness and 1-D loss rise, one line per row
    (``-`` if absent; ``± KEY_std`` where a row has it)."""
    return markdown_table(
        [name_key, *(title for _, title in FLATNESS)],
        [
            [
                str(r[name_key]),
                *(fmt(r.get(k, math.nan), std=r.get(f"{k}_std")) for k, _ in FLATNESS),
            ]
            for r in rows
        ],
    )


def finish_report(
    out_dir: Path, md: list[str], tables: list[tuple[str, str, list[dict[str, Any]]]]
) -> Path:
    """Write each (file name, what it holds, rows) as CSV, list them under "Files", write
    report.md; returns its path."""
    md = [*md, "## Files", "", *(f"- `{name}`: {what}" for name, what, _ in tables), ""]
    for name, _, rows in tables:
        atomic_write_text(out_dir / name, csv_text(rows))
    report = out_dir / "report.md"
    atomic_write_text(report, "\n".join(md))
    return report
