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


def plot_run_curves(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Loss and top-1 accuracy against epochs, train and test, one figure with two panels."""
    if not rows:
        return
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
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
    if title:
        fig.suptitle(title)
    save_figure(fig, path)
