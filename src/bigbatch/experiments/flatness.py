"""The flatness analysis of studies and sweeps, with settings from their file's [study] or [sweep]
table: for each run, the sharpness analysis (top Hessian eigenvalue, Hessian trace,
epsilon-sharpness: sharpness.json) and the 1-D filter-normalized loss rise (flatness_1d.json, see
analysis/flatness.py). A result written with the same settings for the run's last epoch is kept,
so a resumed study or sweep does not repeat it."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bigbatch.errors import BigbatchError, ConfigError
from bigbatch.io import atomic_write_json, read_jsonl
from bigbatch.train.checkpoint import CHECKPOINT_NAME

if TYPE_CHECKING:
    from bigbatch.experiments.grid import StudyRun

FLATNESS_KEYS = {
    "flatness": "true: Hessian, epsilon-sharpness and 1-D loss rise of the runs",
    "flatness_examples": "training (and test) examples the analysis uses, e.g. 2000",
    "flatness_lanczos_steps": "Lanczos iterations for the top Hessian eigenvalue, e.g. 10",
    "flatness_trace_samples": "Hutchinson samples for the Hessian trace, e.g. 10",
    "flatness_distance": "|a| at which the 1-D loss rise is read, e.g. 0.1",
}


@dataclass(frozen=True)
class FlatnessSettings:
    examples: int = 2000
    lanczos_steps: int = 10
    trace_samples: int = 10
    distance: float = 0.1

    def sharpness_request(self) -> dict[str, Any]:
        # The keys sweeps have always recorded, so their earlier results still count as current.
        return {
            "examples": self.examples,
            "lanczos_steps": self.lanczos_steps,
            "trace_samples": self.trace_samples,
        }

    def landscape_request(self) -> dict[str, Any]:
        return {"examples": self.examples, "distance": self.distance}


def parse_flatness(meta: dict[str, Any], table: str, path: str | Path) -> FlatnessSettings | None:
    """The settings from a [study] or [sweep] table (``table``), None when flatness is off."""

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(f"[{table}] {key} in '{path}' {message} ({FLATNESS_KEYS[key]})")

    on = meta.get("flatness", False)
    if not isinstance(on, bool):
        raise fail("flatness", f"must be true or false, got {on!r}")
    if not on:
        return None
    defaults = FlatnessSettings()
    values: dict[str, Any] = {}
    for name in ("examples", "lanczos_steps", "trace_samples"):
        value = meta.get(f"flatness_{name}", getattr(defaults, name))
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise fail(f"flatness_{name}", f"is {value!r}; give an integer >= 1")
        values[name] = value
    distance = meta.get("flatness_distance", defaults.distance)
    if (
        isinstance(distance, bool)
        or not isinstance(distance, int | float)
        or not (math.isfinite(distance) and distance > 0)
    ):
        raise fail("flatness_distance", f"is {distance!r}; give a positive number")
    return FlatnessSettings(**values, distance=float(distance))


def is_current(path: Path, requested: dict[str, Any], epoch: int) -> bool:
    """Whether the analysis result at ``path`` was asked with ``requested`` on epoch ``epoch``."""
    if not path.exists():
        return False
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return False  # a damaged result is redone
    return (
        result.get("requested") == requested
        and result.get("settings", {}).get("checkpoint_epoch") == epoch
    )


def _record_request(path: Path, requested: dict[str, Any]) -> None:
    """What was asked, beside what was used (examples are capped by the dataset)."""
    atomic_write_json(path, {**json.loads(path.read_text()), "requested": requested})


def analyse_runs(runs: Sequence[StudyRun], settings: FlatnessSettings) -> None:
    """Both analyses of every run that has a checkpoint and metrics, those not yet current."""
    from bigbatch.analysis.commands import sharpness
    from bigbatch.analysis.flatness import FLATNESS_FILE, landscape_flatness

    for run in runs:
        try:
            rows = read_jsonl(run.run_dir / "metrics.jsonl")
        except BigbatchError:
            rows = []
        if not rows:
            continue
        epoch = rows[-1]["epoch"]
        device = run.config.runtime.device
        name = run.config.run.name
        path = run.run_dir / "sharpness.json"
        if not (run.run_dir / CHECKPOINT_NAME).exists():
            current = is_current(path, settings.sharpness_request(), epoch) and is_current(
                run.run_dir / FLATNESS_FILE, settings.landscape_request(), epoch
            )
            if not current:
                print(
                    f"flatness: {name} has no checkpoint to analyse; its missing or stale "
                    "results cannot be made",
                    flush=True,
                )
            continue
        if not is_current(path, settings.sharpness_request(), epoch):
            t0 = time.perf_counter()
            written = sharpness(
                str(run.run_dir),
                examples=settings.examples,
                top_k=1,
                lanczos_steps=settings.lanczos_steps,
                trace_samples=settings.trace_samples,
                device=device,
            )
            _record_request(written, settings.sharpness_request())
            print(f"flatness: {name} sharpness ({time.perf_counter() - t0:.0f}s)", flush=True)
        path = run.run_dir / FLATNESS_FILE
        if not is_current(path, settings.landscape_request(), epoch):
            t0 = time.perf_counter()
            written = landscape_flatness(
                run.run_dir,
                distance=settings.distance,
                examples=settings.examples,
                device=device,
            )
            _record_request(written, settings.landscape_request())
            print(f"flatness: {name} 1-D loss rise ({time.perf_counter() - t0:.0f}s)", flush=True)
