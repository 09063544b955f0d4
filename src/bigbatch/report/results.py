"""The numbers of a study report, from run directories alone: per run, per label (over seeds), and
the small-batch minus large-batch degradation."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigbatch.analysis.flatness import FLATNESS_FILE
from bigbatch.io import read_jsonl
from bigbatch.report.configs import Index, by_label
from bigbatch.report.scaling import welch_interval


@dataclass
class RunResult:
    name: str
    label: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    extra: dict[str, Any]  # analysis results found in the run directory (sharpness, landscape)

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
    for key, name in (("sharpness", "sharpness.json"), ("landscape", FLATNESS_FILE)):
        if (run_dir / name).exists():
            extra[key] = json.loads((run_dir / name).read_text())
    return RunResult(
        run_dir.name, label or run_dir.name, json.loads(config_path.read_text()), rows, extra
    )


def first_reaching(rows: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    return next((r for r in rows if r["test_acc"] >= target), None)


UNRECORDED = "not recorded"


def hardware_of(rows: list[dict[str, Any]]) -> str:
    """The hardware a run's epochs trained on, in order, ``" + "`` between machines; epochs of
    runs older than the ``hardware`` field count as ``not recorded``."""
    return joined_hardware(str(r.get("hardware", UNRECORDED)) for r in rows)


def one_known_machine(name: str) -> bool:
    """Whether a run's (or config's) hardware is one machine, recorded for all its epochs."""
    return name != UNRECORDED and " + " not in name


def joined_hardware(names: Iterable[str]) -> str:
    """Hardware names (each maybe already ``A + B``) as one, each machine once, in order."""
    return " + ".join(dict.fromkeys(m for name in names for m in name.split(" + ")))


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
        "hardware": hardware_of(run.rows),
    }
    if "sharpness" in run.extra:
        s = run.extra["sharpness"]
        summary["hessian_top_eigenvalue"] = s.get("top_eigenvalues", [math.nan])[0]
        summary["hessian_trace"] = s.get("trace", math.nan)
        summary["epsilon_sharpness"] = s.get("epsilon_sharpness", math.nan)
    if "landscape" in run.extra:
        landscape = run.extra["landscape"]
        summary["loss_rise_1d"] = landscape.get("train_loss_rise", math.nan)
        summary["loss_rise_distance"] = landscape.get("settings", {}).get("distance", math.nan)
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
    "loss_rise_1d",
)


def aggregate(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per label: the mean over seeds, with the sample std and seed count beside it."""
    out = []
    for group in by_label(summaries).values():
        row = {
            k: group[0][k]
            for k in ("label", "optimizer", "batch_size", "smoothing", "lr", "epochs", "updates")
        }
        row["seeds"] = len(group)
        row["hardware"] = joined_hardware(g["hardware"] for g in group)
        row["seeds_reaching_target"] = sum(not math.isnan(g["updates_to_target"]) for g in group)
        for key in NUMERIC:
            values = [g[key] for g in group if key in g and not math.isnan(g[key])]
            row[key] = statistics.fmean(values) if values else math.nan
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else math.nan
        out.append(row)
    return out


def degradation(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Small-batch minus large-batch test accuracy per optimizer and smoothing kind, and the
    smoothing's reduction of it (against the same optimizer's unsmoothed pair of batch sizes),
    from the per-seed ``summaries``; each with the half-width of its 95% Welch interval
    (``*_ci95``, see scaling.welch_interval)."""
    index = Index(list(summaries))
    out = []
    for optimizer in index.optimizers():
        plain = index.small_large(optimizer, "none")
        for smoothing in index.smoothings(optimizer):
            pair = index.small_large(optimizer, smoothing)
            if pair is None:
                continue
            sb, lb = pair.small, pair.large
            label = (
                sb.smoothing
                if sb.smoothing == lb.smoothing
                else (f"{sb.smoothing} (SB) / {lb.smoothing} (LB)")
            )
            row: dict[str, Any] = {
                "optimizer": optimizer,
                "smoothing": label,
                "smoothed": smoothing != "none",
                "small_batch": sb.batch_size,
                "large_batch": lb.batch_size,
                "small_batch_label": sb.label,
                "large_batch_label": lb.label,
            }
            for side, group in (("small", sb), ("large", lb)):
                mean, std = group.mean_std("final_test_acc")
                row[f"{side}_batch_test_acc"], row[f"{side}_batch_test_acc_std"] = mean, std
            row["degradation"], row["degradation_ci95"] = pair.difference("final_test_acc")
            row["best_degradation"], row["best_degradation_ci95"] = pair.difference("best_test_acc")
            row["reduction_by_smoothing"] = row["reduction_by_smoothing_ci95"] = math.nan
            same_batches = plain and (plain.small.batch_size, plain.large.batch_size) == (
                sb.batch_size,
                lb.batch_size,
            )
            if smoothing != "none" and plain and same_batches:
                # (SB - LB) without smoothing minus (SB - LB) with it: four independent groups.
                reduction = welch_interval(
                    plain.terms("final_test_acc") + pair.terms("final_test_acc", -1.0)
                )
                row["reduction_by_smoothing"], row["reduction_by_smoothing_ci95"] = reduction
            out.append(row)
    return out
