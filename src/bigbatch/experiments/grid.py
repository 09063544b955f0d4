"""Studies: expand a study config into runs, run or resume each, collect their results.

A study file is TOML with three parts:

    [study]                  name, output_dir, seeds = [0, 1], target_accuracy = 0.5,
                             flatness = true (and its settings: experiments/flatness.py)
    [base]                   config sections shared by every run,
                             e.g. [base.optimizer] momentum = 0.9
    [[runs]]                 one table per run: name = "...", then config sections as inline tables,
                             e.g. optimizer = { name = "kfac", lr = 8e-3 }
    [grid]                   optional axes crossed with every run,
                             e.g. "augment.label_smoothing" = [0.0, 0.1]

Each run's config is base <- run <- grid point <- seed <- command-line overrides, validated like a
``bigbatch train`` config before anything starts. With ``flatness = true``, each run is analysed
as it finishes training (Hessian, epsilon-sharpness, 1-D loss rise), for the report's flatness
claim.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import re
import signal
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bigbatch.config import (
    Config,
    config_from_dict,
    deep_merge,
    merge_overrides,
    read_run_config,
    read_toml,
    validate,
)
from bigbatch.errors import BigbatchError, ConfigError, DivergedError, TrainingError
from bigbatch.experiments.flatness import (
    FLATNESS_KEYS,
    FlatnessSettings,
    analyse_runs,
    parse_flatness,
)
from bigbatch.io import read_jsonl
from bigbatch.report.report import Figure
from bigbatch.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from bigbatch.train.state import config_changes
from bigbatch.train.stopping import training_finished

STUDY_KEYS = {
    "name",
    "output_dir",
    "seeds",
    "target_accuracy",
    "description",
    "figures",
    "large_batch_from",
    *FLATNESS_KEYS,
}


@dataclass
class Study:
    name: str
    output_dir: Path
    seeds: list[int]
    target_accuracy: float
    runs: list[StudyRun] = field(default_factory=list)
    description: str = ""
    # The report's comparison plots and the batch size from which a run counts as large.
    figures: list[Figure] = field(default_factory=list)
    large_batch_from: int | None = None
    flatness: FlatnessSettings | None = None  # the analysis after training, None when off


@dataclass
class StudyRun:
    label: str  # the run's name without seed suffix: seeds of one label are aggregated
    seed: int
    config: Config

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir()


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "", str(value))


def load_study(
    path: str | Path,
    overrides: Iterable[str] = (),
    seeds: list[int] | None = None,
    output_dir: str | None = None,
) -> Study:
    raw = read_toml(path)
    unknown = set(raw) - {"study", "base", "runs", "grid"}
    if unknown:
        raise ConfigError(
            f"study file '{path}' has unknown top-level tables {sorted(unknown)}; use study, base, "
            "runs, grid"
        )
    meta = raw.get("study", {})
    bad = set(meta) - STUDY_KEYS
    if bad:
        raise ConfigError(
            f"unknown key(s) {sorted(bad)} in [study] of '{path}'; valid: {sorted(STUDY_KEYS)}"
        )
    name = meta.get("name", Path(path).stem)
    study = Study(
        name=name,
        output_dir=Path(output_dir or meta.get("output_dir", f"runs/{name}")),
        seeds=list(seeds or meta.get("seeds", [0])),
        target_accuracy=_target_accuracy(meta.get("target_accuracy", 0.5), path),
        description=meta.get("description", ""),
        flatness=parse_flatness(meta, "study", path),
    )
    study.figures = _figures(meta.get("figures", []), path)
    large = meta.get("large_batch_from")
    if large is not None and (not isinstance(large, int) or isinstance(large, bool) or large < 1):
        raise ConfigError(f"[study] large_batch_from in '{path}' must be a batch size, e.g. 1024")
    study.large_batch_from = large
    if not study.seeds or not all(isinstance(s, int) for s in study.seeds):
        raise ConfigError(
            f"[study] seeds in '{path}' must be a non-empty list of integers, e.g. seeds = [0, 1, "
            "2]"
        )
    runs = raw.get("runs", [])
    if not runs:
        raise ConfigError(f"study file '{path}' defines no [[runs]]")
    grid = raw.get("grid", {})
    axes = [(key, values if isinstance(values, list) else [values]) for key, values in grid.items()]
    seen: set[str] = set()
    for run in runs:
        run = dict(run)
        label = run.pop("name", None)
        if not label:
            raise ConfigError(f"every [[runs]] entry in '{path}' needs a name")
        base = deep_merge(raw.get("base", {}), run)
        for point in itertools.product(*(values for _, values in axes)):
            point_label = label + "".join(
                f"-{key.split('.')[-1]}{_slug(v)}" for (key, _), v in zip(axes, point)
            )
            point_overrides = [f"{key}={toml_value(v)}" for (key, _), v in zip(axes, point)]
            for seed in study.seeds:
                run_name = point_label if len(study.seeds) == 1 else f"{point_label}-s{seed}"
                if run_name in seen:
                    raise ConfigError(
                        f"study '{path}' has two runs named '{run_name}'; names must be unique"
                    )
                seen.add(run_name)
                cfg = run_config(
                    base,
                    [*point_overrides, *overrides],
                    {"run": {"name": run_name, "seed": seed}},
                    study.output_dir,
                    f"run '{run_name}' of study '{path}'",
                )
                study.runs.append(StudyRun(point_label, seed, cfg))
    return study


def run_config(
    base: dict[str, Any],
    overrides: list[str],
    fixed: dict[str, Any],
    output_dir: Path,
    context: str,
) -> Config:
    """One run's validated config: ``base`` <- ``overrides`` (``section.key=value``) <- ``fixed``
    (sections of keys that make the run what it is: its name, seed...), the run directory under
    ``output_dir/runs``; errors name ``context``."""
    merged = merge_overrides(base, overrides)
    merged = deep_merge(merged, fixed)
    merged = deep_merge(merged, {"runtime": {"output_dir": str(output_dir / "runs")}})
    try:
        cfg = config_from_dict(merged)
        validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{context}: {exc}") from None
    return cfg


def _target_accuracy(value: Any, path: str | Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(
            f"[study] target_accuracy in '{path}' is {value!r}; give a test accuracy in (0, 1], "
            "e.g. target_accuracy = 0.5"
        )
    return float(value)


def _figures(raw: Any, path: str | Path) -> list[Figure]:
    example = '[[study.figures]] name = "kfac", title = "K-FAC runs", runs = ["sb-kfac", "lb-kfac"]'
    if not isinstance(raw, list) or not all(isinstance(f, dict) for f in raw):
        raise ConfigError(f"[study] figures in '{path}' must be a list of tables, e.g. {example}")
    figures = []
    for f in raw:
        if set(f) - {"name", "title", "runs"} or not isinstance(f.get("name"), str):
            raise ConfigError(f"a figure in '{path}' needs name, title and runs, e.g. {example}")
        runs = f.get("runs", [])
        if not isinstance(runs, list) or not all(isinstance(r, str) for r in runs):
            raise ConfigError(f"figure '{f['name']}' in '{path}': runs must be a list of run names")
        figures.append(Figure(f["name"], str(f.get("title", f["name"])), list(runs)))
    return figures


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def run_status(run: StudyRun) -> str:
    """'done' (every epoch, or stopped at its target), 'partial' (a checkpoint before that) or
    'new'. A finished run kept without its checkpoint (results committed to git, the checkpoint
    deleted for space) is 'done': retraining it would overwrite its numbers."""
    path = run.run_dir / CHECKPOINT_NAME
    try:
        rows = read_jsonl(run.run_dir / "metrics.jsonl")
    except BigbatchError:
        # A damaged metrics file: the resume rewrites it from the checkpoint.
        return "partial" if path.exists() else "new"
    c = run.config.run
    finished = bool(rows) and training_finished(rows, c.epochs, c.stop_at_test_acc)
    if not path.exists():
        if rows:
            _check_kept_run(run, rows[-1]["epoch"], finished)
        return "done" if finished else "new"
    if finished and load_checkpoint(path)["epoch"] >= rows[-1]["epoch"]:
        return "done"
    return "partial"


def _check_kept_run(run: StudyRun, last_epoch: int, finished: bool) -> None:
    """A run with metrics but no checkpoint stands as it was run, or the study stops: training
    it again (a changed config, or more epochs) would overwrite numbers it cannot resume."""
    where = f"run '{run.config.run.name}' ({run.run_dir}) has metrics but no checkpoint"
    fix = "restore its checkpoint, or delete the directory to train it from scratch"
    if not finished:
        raise TrainingError(
            f"{where} and ends at epoch {last_epoch} of {run.config.run.epochs}, so it cannot go "
            f"on: {fix}"
        )
    try:
        saved = read_run_config(run.run_dir)
    except ConfigError as exc:
        raise TrainingError(f"{where}, and {exc}; or {fix}") from None
    # data.path may differ between machines.
    changed = config_changes(saved.experiment(), run.config.experiment(), ignore=("data.path",))
    if changed:
        details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise TrainingError(f"{where}, and the study changed its config ({details}): {fix}")


def _estimated_cost(run: StudyRun) -> float:
    """Rough relative cost, to start the longest runs first when several run at once."""
    c = run.config
    cost = float(c.run.epochs)
    if c.optimizer.name == "kfac":
        cost *= 1.5 + (1.0 if c.kfac.factor_interval == 1 else 0.0)
    return cost


def _train_one(run: StudyRun, threads: int | None, flatness: FlatnessSettings | None) -> str:
    """Train or resume one run (in this process or a worker), then analyse its flatness when
    asked, while its checkpoint is surely there; returns a one-line summary."""
    from bigbatch.report.plots import plot_run_curves
    from bigbatch.train.trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    rows = Trainer(run.config).fit(resume=True)
    plot_run_curves(rows, run.run_dir / "curves.png", title=run.config.run.name)
    if flatness is not None:
        try:
            analyse_runs([run], flatness)
        except Exception as exc:  # the run trained; the study's last pass tries again
            print(f"flatness: {run.config.run.name} failed: {exc}", flush=True)
    last = rows[-1]
    return (
        f"test acc {last['test_acc']:.4f} after {last['epoch']} epochs, "
        f"{last['train_time']:.0f}s training"
    )


_free_gpus: Any = None  # in a worker: the queue of GPU indices no run is using


def _share_gpus(queue: Any) -> None:
    global _free_gpus
    _free_gpus = queue


Job = tuple[str, StudyRun, int, FlatnessSettings | None]  # tag, run, threads, analysis


def _worker(job: Job) -> tuple[str, str, bool, bool]:
    """(tag, summary or error message, ok, diverged) of one run in a worker process."""
    tag, run, threads, flatness = job
    gpu = None
    if _free_gpus is not None and run.config.runtime.device in ("auto", "cuda"):
        # Each run takes a GPU no other run holds (runtime keys never change results).
        gpu = _free_gpus.get()
        run.config.runtime.device = f"cuda:{gpu}"
    try:
        return tag, _train_one(run, threads, flatness), True, False
    except BigbatchError as exc:
        return tag, str(exc), False, isinstance(exc, DivergedError)
    finally:
        if gpu is not None:
            _free_gpus.put(gpu)


def _outcome(tag: str, message: str, ok: bool, done: int, total: int) -> str:
    return f"{tag}: {message if ok else 'FAILED: ' + message} ({done}/{total} runs ended)"


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the pool, which terminates its workers


def run_study(study: Study, jobs: int = 1) -> list[StudyRun]:
    """Run every run of the study (see ``train_runs``: each is analysed as it finishes), then
    the flatness analysis of runs finished earlier whose analysis is missing or stale; when runs
    failed, that pass still runs before the error is raised."""
    try:
        train_runs(study.runs, jobs, flatness=study.flatness)
    except TrainingError:
        _analyse(study)
        raise
    _analyse(study)
    return study.runs


def _analyse(study: Study) -> None:
    if study.flatness is not None:
        analyse_runs([r for r in study.runs if run_status(r) == "done"], study.flatness)


def train_runs(
    runs: Sequence[StudyRun],
    jobs: int = 1,
    divergence_is_result: bool = False,
    flatness: FlatnessSettings | None = None,
) -> dict[str, str]:
    """Train every run: finished runs are skipped, interrupted ones resumed.

    With ``jobs`` > 1, runs train in that many worker processes with the CPU threads split among
    them: small models use two cores better as two single-threaded runs than as one run on two.
    A failed run does not stop the others; the study fails at the end, naming it. With
    ``divergence_is_result``, a diverged run is no failure (in a sweep, an lr too high): its
    message is returned by run name. With ``flatness``, each run is analysed as it finishes.
    SIGTERM or SIGINT ends the workers too (each run resumes from its last checkpoint).
    """
    pending = []
    for i, run in enumerate(runs, 1):
        status = run_status(run)
        tag = f"[{i}/{len(runs)}] {run.config.run.name}"
        if status == "done":
            print(f"{tag}: finished earlier, skipped", flush=True)
        else:
            print(f"{tag}: {'resuming' if status == 'partial' else 'queued'}", flush=True)
            pending.append((tag, run))
    names = {tag: run.config.run.name for tag, run in pending}
    failed: list[str] = []
    diverged: dict[str, str] = {}
    outcomes = _results(pending, jobs, flatness)
    for done, (tag, message, ok, divergence) in enumerate(outcomes, 1):
        if divergence and divergence_is_result:
            diverged[names[tag]] = message
        elif not ok:
            failed.append(tag)
        print(_outcome(tag, message, ok, done, len(pending)), flush=True)
    if failed:
        raise TrainingError(
            f"{len(failed)} of {len(pending)} runs failed ({', '.join(failed)}; messages above); "
            "the others are done. Fix the cause and run the study again: finished runs are "
            "skipped"
        )
    return diverged


def _results(
    pending: list[tuple[str, StudyRun]], jobs: int, flatness: FlatnessSettings | None
) -> Iterator[tuple[str, str, bool, bool]]:
    """Each run's outcome as it ends: in this process, or in ``jobs`` spawned workers."""
    if jobs <= 1:
        for tag, run in pending:
            yield _worker((tag, run, 0, flatness))
        return
    threads = max(1, torch.get_num_threads() // jobs)
    pending = sorted(pending, key=lambda item: -_estimated_cost(item[1]))
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        # maxtasksperchild=1: every run starts in a fresh process, as a lone `train` would.
        context = multiprocessing.get_context("spawn")
        gpus = torch.cuda.device_count()
        queue = None
        if gpus > 1:
            queue = context.Queue()
            for k in range(gpus * math.ceil(jobs / gpus)):
                queue.put(k % gpus)  # jobs beyond the GPU count share them evenly
        with context.Pool(
            jobs, initializer=_share_gpus, initargs=(queue,), maxtasksperchild=1
        ) as pool:
            jobs_list = [(tag, run, threads, flatness) for tag, run in pending]
            yield from pool.imap_unordered(_worker, jobs_list)
            # A normal end lets the workers exit on their own; the with block's terminate()
            # is for a stop.
            pool.close()
            pool.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
