"""Markdown tables, CSV text and number formatting shared by the reports."""

from __future__ import annotations

import csv
import io
import math
from typing import Any


def fmt(value: Any, pct: bool = False, std: float | None = None) -> str:
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
