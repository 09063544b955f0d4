"""A sweep's flatness numbers: the existing sharpness analysis (top Hessian eigenvalue, Hessian
trace, epsilon-sharpness) on each cell's chosen run, with the sweep's (cheap) settings."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from bigbatch.io import atomic_write_json

if TYPE_CHECKING:
    from bigbatch.experiments.sweep import Sweep
    from bigbatch.experiments.tuning import Choice


def analyse_chosen_runs(sweep: Sweep, choices: list[Choice]) -> None:
    """Write sharpness.json into each cell's chosen run; one already written with the same
    settings is kept, so a resumed sweep does not repeat the analysis."""
    from bigbatch.analysis.commands import sharpness
    from bigbatch.experiments.sweep import chosen_run

    settings = sweep.flatness or {}
    for choice in choices:
        run = chosen_run(sweep, choice)
        if run is None:
            continue
        path = run.run_dir / "sharpness.json"
        if path.exists() and json.loads(path.read_text()).get("requested") == settings:
            continue
        print(f"flatness: {run.config.run.name}", flush=True)
        written = sharpness(
            str(run.run_dir),
            examples=settings["examples"],
            top_k=1,
            lanczos_steps=settings["lanczos_steps"],
            trace_samples=settings["trace_samples"],
            device=run.config.runtime.device,
        )
        # What was asked, beside what was used (examples are capped by the training set).
        result = json.loads(written.read_text())
        atomic_write_json(written, {**result, "requested": settings})
