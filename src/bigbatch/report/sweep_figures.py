"""A sweep report's plots: steps and time to target against batch size (log-log, with the
perfect-scaling line and the critical-batch fit), the tuned lr, accuracy and flatness."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bigbatch.report.plots import plt, save_figure
from bigbatch.report.scaling import perfect_scaling


def _by_group(cells: list[dict[str, Any]], key: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for c in cells:
        if not math.isnan(c.get(key, math.nan)):
            out.setdefault(c["group"], []).append(c)
    return out


def _errorbar(ax: Any, members: list[dict[str, Any]], key: str, label: str, color: Any) -> None:
    xs = [m["batch_size"] for m in members]
    ys = [m[key] for m in members]
    half_widths = [m.get(f"{key}_ci95", math.nan) for m in members]
    errs = [0.0 if math.isnan(h) else h for h in half_widths]
    ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label, color=color)


def _colors() -> list[Any]:
    return plt.rcParams["axes.prop_cycle"].by_key()["color"]


def plot_to_target(
    cells: list[dict[str, Any]],
    groups: list[dict[str, Any]],
    key: str,
    ylabel: str,
    path: Path,
) -> bool:
    """Steps (with the fit) or seconds to the target against batch size, log-log; False (and no
    file) when no cell reached it."""
    by_group = _by_group(cells, key)
    if not by_group:
        return False
    fits = {g["group"]: g for g in groups}
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for (group, members), color in zip(by_group.items(), _colors() * 4):
        members.sort(key=lambda m: m["batch_size"])
        _errorbar(ax, members, key, group, color)
        xs = [m["batch_size"] for m in members]
        ideal = perfect_scaling(xs, xs[0], members[0][key])
        ax.plot(xs, ideal, linestyle="--", color=color, alpha=0.5, linewidth=1)
        fit = fits.get(group)
        if key == "steps_to_target" and fit and fit["fit_valid"]:
            fine = [xs[0] * (xs[-1] / xs[0]) ** (i / 40) for i in range(41)]
            curve = [fit["s_min"] * (1 + fit["b_crit"] / b) for b in fine]
            ax.plot(fine, curve, linestyle=":", color=color, linewidth=1.5)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, title="mean ± 95% CI; -- perfect scaling; : fit", title_fontsize=7)
    save_figure(fig, path)
    return True


def plot_tuned_lr(cells: list[dict[str, Any]], path: Path) -> bool:
    """The chosen lr against batch size, log-log, with linear and square-root references."""
    by_group = _by_group(cells, "lr")
    if not by_group:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for (group, members), color in zip(by_group.items(), _colors() * 4):
        members.sort(key=lambda m: m["batch_size"])
        xs, ys = [m["batch_size"] for m in members], [m["lr"] for m in members]
        ax.plot(xs, ys, marker="o", label=group, color=color)
        for power, style in ((1.0, "--"), (0.5, ":")):
            ax.plot(xs, [ys[0] * (x / xs[0]) ** power for x in xs], style, color=color, alpha=0.4)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("tuned learning rate")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, title="-- linear, : square-root scaling", title_fontsize=7)
    save_figure(fig, path)
    return True


def plot_panels(
    cells: list[dict[str, Any]], keys: list[tuple[str, str]], path: Path, log_y: bool
) -> bool:
    """One panel per (key, label) against batch size (log x), a line per group."""
    if not any(not math.isnan(c.get(k, math.nan)) for c in cells for k, _ in keys):
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        for (group, members), color in zip(_by_group(cells, key).items(), _colors() * 4):
            members.sort(key=lambda m: m["batch_size"])
            _errorbar(ax, members, key, group, color)
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)
    return True
