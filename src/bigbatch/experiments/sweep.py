"""Sweeps: batch sizes x optimizers (x smoothing), each cell's learning rate tuned on a small grid,
then the best one rerun on more seeds; every run stops at its target test accuracy or its budget.

A sweep file is TOML:

    [sweep]
    name = "sweep-lenet5"
    output_dir = "runs/sweep-lenet5"
    target_accuracy = 0.6            # every run stops after the first epoch reaching it
    batch_sizes = [128, 512, 2048, 8192]
    max_epochs = 30                  # the budget: one number, or per batch size {"128" = 20, ...}
    base_batch_size = 128            # the batch size each optimizer's lr is given at
    lr_scaling = "sqrt"              # lr(B) = lr * (B / base_batch_size)^p: linear 1, sqrt 0.5,
                                     # none 0; or per optimizer: { sgd = "sqrt", lars = "none" }
    lr_factors = [0.5, 1, 2, 4]      # the tuning grid: lr(B) times each factor
    tuning_seeds = [0]
    final_seeds = [0, 1, 2]          # the chosen lr on these (a tuning run of a seed is reused)
    rerun_unreached = false          # rerun cells whose best lr never reached the target too
    flatness = false                 # Hessian, sharpness and 1-D loss rise of each cell's
                                     # chosen run (settings: experiments/flatness.py)
    [base]                           # config shared by every run, as a study's [base]
    [optimizers.sgd]                 # one table per optimizer: config sections, with its lr
    optimizer = { name = "sgd", lr = 0.02 }
    [smoothing.mixup]                # optional variants crossed with the rest (default: none)
    augment = { mixup_alpha = 0.5 }

Each run's config is base <- optimizer <- smoothing <- command-line overrides <- the cell's batch
size, learning rate, budget, target, seed and name (``{cell}-lr{lr}-s{seed}``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigbatch.config import deep_merge, read_toml
from bigbatch.config.checks import suggest
from bigbatch.errors import ConfigError
from bigbatch.experiments.flatness import (
    FLATNESS_KEYS,
    FlatnessSettings,
    analyse_runs,
    parse_flatness,
)
from bigbatch.experiments.grid import StudyRun, run_config, train_runs
from bigbatch.experiments.tuning import DIVERGED_FILE, Choice, choose_lr
from bigbatch.io import atomic_write_text
from bigbatch.train.checkpoint import CHECKPOINT_NAME

LR_SCALING = {"linear": 1.0, "sqrt": 0.5, "none": 0.0}
SWEEP_KEYS = {
    "name": "the sweep's name",
    "output_dir": "where runs/ and report/ go",
    "target_accuracy": "test accuracy every run stops at, e.g. 0.6",
    "batch_sizes": "e.g. [128, 512, 2048, 8192]",
    "max_epochs": 'the budget of a run, e.g. 30 or {"128" = 20, "8192" = 60}',
    "base_batch_size": "the batch size the optimizers' lr are given at, e.g. 128",
    "lr_scaling": 'linear, sqrt or none, or one per optimizer: { sgd = "sqrt", lars = "none" }',
    "lr_factors": "the tuning grid around the scaled lr, e.g. [0.5, 1, 2, 4]",
    "tuning_seeds": "seeds of the tuning runs, e.g. [0]",
    "final_seeds": "seeds the chosen lr runs on, e.g. [0, 1, 2]",
    "rerun_unreached": "true: rerun cells that never reached the target too",
    **FLATNESS_KEYS,
    "description": "a paragraph for the report",
}
TABLES = ("sweep", "base", "optimizers", "smoothing")


@dataclass(frozen=True)
class Cell:
    optimizer: str  # the label of its [optimizers.X] table
    smoothing: str  # the label of its [smoothing.X] table, "none" without one
    batch_size: int

    @property
    def name(self) -> str:
        tail = "" if self.smoothing == "none" else f"-{self.smoothing}"
        return f"{self.optimizer}{tail}-b{self.batch_size}"


@dataclass
class SweepRun(StudyRun):
    cell: Cell
    factor: float  # the lr factor of the tuning grid


@dataclass
class Sweep:
    path: Path
    name: str
    output_dir: Path
    target: float
    batch_sizes: list[int]
    epochs: dict[int, int]  # the budget per batch size
    base_batch_size: int
    lr_scaling: dict[str, str]  # the rule per optimizer label
    lr_factors: list[float]
    tuning_seeds: list[int]
    final_seeds: list[int]
    base: dict[str, Any]
    optimizers: dict[str, dict[str, Any]]
    smoothing: dict[str, dict[str, Any]]
    overrides: list[str] = field(default_factory=list)
    rerun_unreached: bool = False
    flatness: FlatnessSettings | None = None  # the analysis settings, or None when off
    description: str = ""

    def cells(self) -> list[Cell]:
        return [
            Cell(opt, smooth, b)
            for opt in self.optimizers
            for smooth in self.smoothing
            for b in self.batch_sizes
        ]

    def base_lr(self, optimizer: str) -> float:
        return float(self.optimizers[optimizer]["optimizer"]["lr"])

    def scaled_lr(self, cell: Cell) -> float:
        """The optimizer's lr at the cell's batch size by the scaling rule (the grid's centre)."""
        power = LR_SCALING[self.lr_scaling[cell.optimizer]]
        return self.base_lr(cell.optimizer) * (cell.batch_size / self.base_batch_size) ** power

    def run(self, cell: Cell, factor: float, seed: int) -> SweepRun:
        lr = float(f"{self.scaled_lr(cell) * factor:.4g}")  # a readable name and the same value
        name = f"{cell.name}-lr{lr:g}-s{seed}"
        merged = deep_merge(
            deep_merge(self.base, self.optimizers[cell.optimizer]), self.smoothing[cell.smoothing]
        )
        fixed = {
            "run": {
                "name": name,
                "seed": seed,
                "epochs": self.epochs[cell.batch_size],
                "stop_at_test_acc": self.target,
            },
            "train": {"batch_size": cell.batch_size},
            "optimizer": {"lr": lr},
        }
        context = f"run '{name}' of sweep '{self.path}'"
        cfg = run_config(merged, self.overrides, fixed, self.output_dir, context)
        return SweepRun(cell.name, seed, cfg, cell, factor)

    def tuning_runs(self) -> list[SweepRun]:
        return [
            self.run(cell, factor, seed)
            for cell in self.cells()
            for factor in self.lr_factors
            for seed in self.tuning_seeds
        ]

    def final_runs(self, choices: list[Choice]) -> list[SweepRun]:
        """The chosen lr of each cell on every final seed (those also tuned on are the same
        runs); cells that never reached the target only with ``rerun_unreached``."""
        return [
            self.run(c.cell, c.factor, seed)
            for c in choices
            if c.has_data and (c.reached or self.rerun_unreached)
            for seed in self.final_seeds
        ]

    def choices(self) -> list[Choice]:
        """Each cell's chosen lr from its tuning runs' metrics (see tuning.choose_lr)."""
        runs = self.tuning_runs()
        return [
            choose_lr(cell, [r for r in runs if r.cell == cell], self.target, self.lr_factors)
            for cell in self.cells()
        ]


def run_sweep(sweep: Sweep, jobs: int = 1) -> list[Choice]:
    """Phase 1 (every cell's lr grid), the choice per cell, phase 2 (the chosen lr on the final
    seeds), then the flatness analysis when asked; finished runs are skipped, partial ones
    resumed, so an interrupted sweep continues where it stopped."""
    tuning = sweep.tuning_runs()
    print(f"phase 1: {len(tuning)} tuning runs", flush=True)
    _train_phase(tuning, jobs)
    choices = sweep.choices()
    for c in choices:
        print(f"  {c.cell.name}: {c.summary()}", flush=True)
    finals = sweep.final_runs(choices)
    print(f"phase 2: {len(finals)} runs of the chosen learning rates", flush=True)
    _train_phase(finals, jobs)
    if sweep.flatness is not None:
        chosen = [chosen_run(sweep, c) for c in choices]
        analyse_runs([r for r in chosen if r is not None], sweep.flatness)
    return choices


def _train_phase(runs: list[SweepRun], jobs: int) -> None:
    """Train the runs; one that diverges is marked (DIVERGED_FILE) and not retried."""
    todo = [r for r in runs if not (r.run_dir / DIVERGED_FILE).exists()]
    if len(todo) < len(runs):
        print(
            f"{len(runs) - len(todo)} runs diverged earlier and are not retried (delete the "
            f"{DIVERGED_FILE} in a run directory to retry it)",
            flush=True,
        )
    by_name = {r.config.run.name: r for r in todo}
    for name, message in train_runs(todo, jobs, divergence_is_result=True).items():
        run_dir = by_name[name].run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / DIVERGED_FILE, message + "\n")


# -- loading and validation ----------------------------------------------------------------------
def _fail(path: Path, key: str, message: str) -> ConfigError:
    return ConfigError(f"[sweep] {key} in '{path}' {message}")


def _int_list(meta: dict[str, Any], key: str, path: Path, minimum: int) -> list[int]:
    value = meta.get(key)
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value)
        or len(set(value)) != len(value)
    ):
        raise _fail(
            path,
            key,
            f"is {value!r}; give a list of distinct integers >= {minimum}, {SWEEP_KEYS[key]}",
        )
    return list(value)


def _epochs(value: Any, batch_sizes: list[int], path: Path) -> dict[int, int]:
    def ok(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if ok(value):
        return {b: value for b in batch_sizes}
    if isinstance(value, dict):
        table = {str(k): v for k, v in value.items()}
        missing = [b for b in batch_sizes if str(b) not in table]
        extra = sorted(set(table) - {str(b) for b in batch_sizes})
        if not missing and not extra and all(ok(v) for v in table.values()):
            return {b: table[str(b)] for b in batch_sizes}
        raise _fail(
            path,
            "max_epochs",
            f"needs one integer >= 1 for each batch size and no "
            f"other (missing {missing}, unknown {extra}), e.g. max_epochs = {{ '128' = 20 }}",
        )
    raise _fail(
        path, "max_epochs", f"is {value!r}; give epochs >= 1, e.g. 30 or a table per batch size"
    )


def _variants(raw: Any, table: str, path: Path) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise ConfigError(f"[{table}] in '{path}' must hold tables, e.g. [{table}.sgd]")
    for label in raw:
        if not label or not all(ch.isalnum() or ch in "_." for ch in label):
            raise ConfigError(
                f"[{table}.{label}] in '{path}': labels become run names; use letters, digits, "
                "'_' or '.'"
            )
    return {label: dict(v) for label, v in raw.items()}


def load_sweep(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), output_dir: str | None = None
) -> Sweep:
    """Read and check a sweep file; every tuning run's config is built (and validated) here, so a
    bad value is named before anything trains."""
    path = Path(path)
    raw = read_toml(path)
    unknown = set(raw) - set(TABLES)
    if unknown:
        raise ConfigError(
            f"sweep file '{path}' has unknown tables {sorted(unknown)}; use {', '.join(TABLES)}"
        )
    meta = raw.get("sweep", {})
    for key in meta:
        if key not in SWEEP_KEYS:
            raise ConfigError(
                f"unknown key '{key}' in [sweep] of '{path}'"
                f"{suggest(key, SWEEP_KEYS)}; valid: {', '.join(SWEEP_KEYS)}"
            )
    for key in ("target_accuracy", "batch_sizes", "max_epochs", "lr_factors"):
        if key not in meta:
            raise _fail(path, key, f"is missing: {SWEEP_KEYS[key]}")
    target = meta["target_accuracy"]
    if isinstance(target, bool) or not isinstance(target, int | float) or not 0 < target <= 1:
        raise _fail(path, "target_accuracy", f"is {target!r}; give a test accuracy in (0, 1]")
    batch_sizes = sorted(_int_list(meta, "batch_sizes", path, 1))
    factors = meta["lr_factors"]
    if (
        not isinstance(factors, list)
        or not factors
        or not all(
            isinstance(f, int | float) and not isinstance(f, bool) and f > 0 for f in factors
        )
        or len(set(factors)) != len(factors)
    ):
        raise _fail(
            path,
            "lr_factors",
            f"is {factors!r}; give distinct positive numbers, e.g. [0.5, 1, 2, 4]",
        )
    base_batch = meta.get("base_batch_size", batch_sizes[0])
    if isinstance(base_batch, bool) or not isinstance(base_batch, int) or base_batch < 1:
        raise _fail(path, "base_batch_size", f"is {base_batch!r}; give a batch size, e.g. 128")
    if not isinstance(meta.get("rerun_unreached", False), bool):
        raise _fail(
            path, "rerun_unreached", f"must be true or false, got {meta['rerun_unreached']!r}"
        )
    optimizers = _variants(raw.get("optimizers", {}), "optimizers", path)
    if not optimizers:
        raise ConfigError(
            f"sweep file '{path}' has no [optimizers.NAME] tables, e.g. "
            '[optimizers.sgd] optimizer = { name = "sgd", lr = 0.02 }'
        )
    for label, table in optimizers.items():
        lr = (
            table.get("optimizer", {}).get("lr")
            if isinstance(table.get("optimizer"), dict)
            else None
        )
        if isinstance(lr, bool) or not isinstance(lr, int | float) or lr <= 0:
            raise ConfigError(
                f"[optimizers.{label}] in '{path}' needs its learning rate at "
                f'base_batch_size: optimizer = {{ name = "...", lr = 0.02 }}'
            )
    scaling = _lr_scaling(meta.get("lr_scaling", "sqrt"), list(optimizers), path)
    smoothing = _variants(raw.get("smoothing", {"none": {}}), "smoothing", path) or {"none": {}}
    name = meta.get("name", path.stem)
    sweep = Sweep(
        path=path,
        name=name,
        output_dir=Path(output_dir or meta.get("output_dir", f"runs/{name}")),
        target=float(target),
        batch_sizes=batch_sizes,
        epochs=_epochs(meta["max_epochs"], batch_sizes, path),
        base_batch_size=base_batch,
        lr_scaling=scaling,
        lr_factors=[float(f) for f in factors],
        tuning_seeds=_int_list(meta, "tuning_seeds", path, 0) if "tuning_seeds" in meta else [0],
        final_seeds=_int_list(meta, "final_seeds", path, 0) if "final_seeds" in meta else [0],
        base=raw.get("base", {}),
        optimizers=optimizers,
        smoothing=smoothing,
        overrides=list(overrides),
        rerun_unreached=meta.get("rerun_unreached", False),
        flatness=parse_flatness(meta, "sweep", path),
        description=str(meta.get("description", "")),
    )
    runs = sweep.tuning_runs()  # builds and validates every config
    names = [r.config.run.name for r in runs]
    if len(set(names)) != len(names):
        raise _fail(
            path,
            "lr_factors",
            "give two runs of one cell the same lr after rounding to "
            "4 digits; space the factors further apart",
        )
    return sweep


def _lr_scaling(value: Any, labels: list[str], path: Path) -> dict[str, str]:
    """One rule for every optimizer, or a table naming each optimizer's rule."""
    rules = value if isinstance(value, dict) else dict.fromkeys(labels, value)
    if set(rules) != set(labels):
        raise _fail(
            path, "lr_scaling", f"names {sorted(rules)}; give a rule for each of {sorted(labels)}"
        )
    for label, rule in rules.items():
        if rule not in LR_SCALING:
            where = "" if not isinstance(value, dict) else f" for '{label}'"
            raise _fail(
                path, "lr_scaling", f"is {rule!r}{where}; choose one of {', '.join(LR_SCALING)}"
            )
    return {label: rules[label] for label in labels}


def chosen_run(sweep: Sweep, choice: Choice) -> SweepRun | None:
    """The run that stands for a cell's solution: its chosen lr on the first seed that has a
    checkpoint (final seeds first), else on the first kept without one (its analysis stands as
    it is); None while there is none."""
    if not choice.has_data:
        return None
    seeds = [*sweep.final_seeds, *sweep.tuning_seeds]
    runs = [sweep.run(choice.cell, choice.factor, seed) for seed in seeds]
    for name in (CHECKPOINT_NAME, "metrics.jsonl"):
        for run in runs:
            if (run.run_dir / name).exists():
                return run
    return None
