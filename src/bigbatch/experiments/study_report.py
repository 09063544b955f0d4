"""A study's report, written from its finished runs only: a run still training would enter the
means with the accuracy of an early epoch, so it is named with its progress instead."""

from __future__ import annotations

from pathlib import Path

from bigbatch.errors import BigbatchError
from bigbatch.experiments.grid import Study, StudyRun, run_status
from bigbatch.io import read_jsonl
from bigbatch.report.report import load_run, write_report


def _progress(run: StudyRun) -> str:
    """``name (epoch e of E)`` for a run with epochs, ``name (not started)`` otherwise."""
    try:
        rows = read_jsonl(run.run_dir / "metrics.jsonl")
    except BigbatchError:  # damaged: the resume rewrites it from the checkpoint
        return f"{run.config.run.name} (metrics damaged)"
    done = f"epoch {rows[-1]['epoch']} of {run.config.run.epochs}" if rows else "not started"
    return f"{run.config.run.name} ({done})"


def unfinished_note(unfinished: list[StudyRun], total: int) -> str:
    """What the report leaves out, or "" when every run finished."""
    if not unfinished:
        return ""
    names = ", ".join(_progress(r) for r in unfinished)
    return (
        f"**{len(unfinished)} of {total} runs have not finished and are not in the tables or "
        f"plots:** {names}. Run `bigbatch reproduce` again to finish them."
    )


def write_study_report(study: Study, command: str) -> Path:
    """report.md (with its CSVs and plots) under the study's output directory."""
    finished: list[StudyRun] = []
    unfinished: list[StudyRun] = []
    for run in study.runs:
        (finished if run_status(run) == "done" else unfinished).append(run)
    if not finished:
        raise BigbatchError(
            f"no run of study '{study.name}' has finished yet under {study.output_dir}; run "
            "`bigbatch reproduce` first (the report holds finished runs only)"
        )
    results = [r for r in (load_run(run.run_dir, run.label) for run in finished) if r is not None]
    left_out = unfinished_note(unfinished, len(study.runs))
    notes = "\n\n".join(n for n in (study.description.strip(), left_out) if n)
    return write_report(
        results,
        study.output_dir / "report",
        title=f"Study: {study.name}",
        target=study.target_accuracy,
        command=command,
        notes=notes,
        figures=study.figures,
        large_batch_from=study.large_batch_from,
    )
