"""The numbers of a study report, from run directories alone: per run, per label (over seeds), and
the small-batch minus large-batch degradation."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigbatch.io import read_jsonl


@dataclass
class RunResult:
    name: str
    label: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    extra: dict[str, Any]  # e.g. sharpness numbers found in the run directory

    @property
    def optimizer(self) -> str:
        names = {"sgd": "SGD", "kfac": "K-FAC", "lars": "LARS", "lamb": "LAMB", "muon": "Muon"}
        return names.get(self.config["optimizer"]["name"], self.config["optimizer"]["name"])

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
        rho = self.config["optimizer"].get("sam_rho", 0.0)  # absent from older runs' configs
        if rho > 0:
            parts.append(f"SAM rho={rho:g}")
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
