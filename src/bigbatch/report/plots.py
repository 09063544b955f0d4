"""PNG plots of training runs (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bigbatch.io import atomic_file  # noqa: E402


def save_figure(fig: Any, path: str | Path) -> None:
    """Write the PNG atomically so a reader never sees half a file."""
    try:
        with atomic_file(path, "wb") as f:
            fig.savefig(f, dpi=120, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)


NOISE_SCALE_LABEL = "gradient noise scale B_simple = tr(Sigma) / |G|^2"


def _noise_points(rows: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """(epochs, B_simple) of the epochs that have a positive noise scale."""
    points = [(r["epoch"], r["grad_noise_scale"]) for r in rows if r.get("grad_noise_scale")]
    return [e for e, _ in points], [b for _, b in points]


def _noise_axes(ax: Any) -> None:
    ax.set_xlabel("epoch")
    ax.set_ylabel(NOISE_SCALE_LABEL)
    ax.set_yscale("log")  # it grows by orders of magnitude as the loss falls
    ax.grid(alpha=0.3, which="both")


def plot_noise_scale(rows_by_run: dict[str, list[dict[str, Any]]], path: str | Path) -> bool:
    """B_simple against epochs, one line per run (named by the keys); False, and no file, when
    no run measured one."""
    curves = {name: _noise_points(rows) for name, rows in rows_by_run.items()}
    curves = {name: points for name, points in curves.items() if points[0]}
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, (epochs, values) in curves.items():
        ax.plot(epochs, values, marker=".", label=name)
    _noise_axes(ax)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def plot_run_curves(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Loss and top-1 accuracy against epochs, train and test, one figure with two panels; a third
    panel with the gradient noise scale when the run measured one."""
    if not rows:
        return
    epochs = [r["epoch"] for r in rows]
    noise_epochs, noise = _noise_points(rows)
    fig, axes = plt.subplots(1, 3 if noise else 2, figsize=(16.5 if noise else 11, 4))
    ax_loss, ax_acc = axes[0], axes[1]
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="train (as optimized)")
    if "train_eval_loss" in rows[0]:
        ax_loss.plot(epochs, [r["train_eval_loss"] for r in rows], label="train (clean subset)")
    ax_loss.plot(epochs, [r["test_loss"] for r in rows], label="test")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_acc.plot(epochs, [100 * r["train_acc"] for r in rows], label="train (as optimized)")
    if "train_eval_acc" in rows[0]:
        ax_acc.plot(epochs, [100 * r["train_eval_acc"] for r in rows], label="train (clean subset)")
    ax_acc.plot(epochs, [100 * r["test_acc"] for r in rows], label="test")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("top-1 accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if noise:
        axes[2].plot(noise_epochs, noise, marker=".")
        _noise_axes(axes[2])
    if title:
        fig.suptitle(title)
    save_figure(fig, path)
