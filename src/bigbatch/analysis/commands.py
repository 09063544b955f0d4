"""`bigbatch landscape` and `bigbatch sharpness`: run an analysis on trained runs, write
CSV/JSON/PNG."""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bigbatch.analysis.hessian import hutchinson_trace, lanczos_top_eigenvalues
from bigbatch.analysis.landscape import (
    difference_direction,
    evaluate_along,
    linspace,
    random_direction,
)
from bigbatch.analysis.loading import TrainedRun, data_key, load_trained_run
from bigbatch.analysis.sharpness import epsilon_sharpness
from bigbatch.config import read_run_config
from bigbatch.errors import BigbatchError
from bigbatch.io import atomic_write_json, atomic_write_text
from bigbatch.report.plots import plt, save_figure


def _bar(total: int, desc: str) -> tqdm:
    return tqdm(
        total=total, desc=desc, disable=not sys.stderr.isatty(), leave=False, dynamic_ncols=True
    )


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _datasets(
    run: TrainedRun, train_examples: int, test_examples: int, batch_size: int
) -> dict[str, Any]:
    # NHWC batches, as the trainer uses on the CPU: its convolutions run faster on them.
    return {
        split: run.batches(split, examples, batch_size)
        for split, examples in (("train", train_examples), ("test", test_examples))
    }


def _batch_count(run: TrainedRun, train_examples: int, test_examples: int, batch_size: int) -> int:
    n_train = min(train_examples or run.dataset.num_train, run.dataset.num_train)
    n_test = min(test_examples or run.dataset.num_test, run.dataset.num_test)
    return -(-n_train // min(batch_size, n_train)) + -(-n_test // min(batch_size, n_test))


def plot_1d(
    curves: list[tuple[str, list[dict[str, float]]]], path: Path, xlabel: str, title: str
) -> None:
    """Loss (train solid, test dashed) on the left axis, top-1 accuracy on the right, as in the
    paper's Figs 24-25."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    acc_ax = ax.twinx()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, rows) in enumerate(curves):
        c = colors[i % len(colors)]
        xs = [r["c0"] for r in rows]
        ax.plot(xs, [r["train_loss"] for r in rows], color=c, label=f"{label} train loss")
        ax.plot(
            xs, [r["test_loss"] for r in rows], color=c, linestyle="--", label=f"{label} test loss"
        )
        acc_ax.plot(
            xs,
            [100 * r["test_acc"] for r in rows],
            color=c,
            linestyle=":",
            alpha=0.8,
            label=f"{label} test acc",
        )
    losses = [r[k] for _, rows in curves for r in rows for k in ("train_loss", "test_loss")]
    # An unnormalized Gaussian direction can raise the loss a million-fold at the ends; on a linear
    # axis that hides the basin around a = 0, so such curves get a log axis.
    log_axis = min(losses) > 0 and max(losses) / min(losses) > 100
    if log_axis:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"cross-entropy loss{' (log scale)' if log_axis else ''}")
    acc_ax.set_ylabel("top-1 accuracy (%)  (dotted)")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + acc_ax.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + acc_ax.get_legend_handles_labels()[1]
    ax.legend(handles, labels, fontsize=7, loc="best")
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)


def plot_2d(rows: list[dict[str, float]], points: int, path: Path, title: str) -> None:
    xs = sorted({r["c0"] for r in rows})
    ys = sorted({r["c1"] for r in rows})
    grid = [
        [next(r["train_loss"] for r in rows if r["c0"] == x and r["c1"] == y) for x in xs]
        for y in ys
    ]
    fig, ax = plt.subplots(figsize=(6, 5))
    contour = ax.contour(xs, ys, grid, levels=20, cmap="viridis")
    ax.clabel(contour, fontsize=7)
    ax.plot([0], [0], "r*", markersize=10)
    ax.set_xlabel("direction 1")
    ax.set_ylabel("direction 2")
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)


def landscape(
    run_dirs: list[str],
    *,
    start: float = -0.5,
    stop: float = 1.5,
    points: int = 41,
    normalization: str = "none",
    seed: int = 0,
    train_examples: int = 0,
    test_examples: int = 0,
    batch_size: int = 128,
    interpolate: bool = False,
    two_d: bool = False,
    out: str | None = None,
    device: str = "auto",
) -> list[Path]:
    if interpolate and len(run_dirs) != 2:
        raise BigbatchError(
            "--interpolate needs exactly two run directories: the start (a=0) and the end (a=1)"
        )
    _require(
        math.isfinite(start) and math.isfinite(stop) and start < stop,
        "--range",
        f"is {start} {stop}; give two finite numbers, START < STOP, e.g. --range -0.5 1.5",
    )
    _require(points >= 2, "--points", "must be at least 2")
    _require(batch_size >= 1, "--batch-size", "must be at least 1")
    _require(train_examples >= 0, "--train-examples", "must be >= 0 (0: the whole training set)")
    _require(test_examples >= 0, "--test-examples", "must be >= 0 (0: the whole test set)")
    runs = [load_trained_run(run_dirs[0], device=device)]
    runs += [
        load_trained_run(d, runs[0].dataset if _same_data(runs[0], d) else None, device)
        for d in run_dirs[1:]
    ]
    if interpolate:
        _require_same_shapes(*runs)
    # Non-default settings go into the result's name, so a rerun with others adds, not replaces.
    suffix = "".join(
        f"_{label}{value}"
        for label, value, default in (
            ("range", f"{start:g}to{stop:g}", "-0.5to1.5"),
            ("points", points, 41),
            ("train", train_examples, 0),
            ("test", test_examples, 0),
        )
        if value != default
    )
    settings = {
        "start": start,
        "stop": stop,
        "points": points,
        "normalization": normalization,
        "seed": seed,
        "train_examples": train_examples or runs[0].dataset.num_train,
        "test_examples": test_examples or runs[0].dataset.num_test,
    }
    written: list[Path] = []
    alphas = linspace(start, stop, points)
    if interpolate:
        first, second = runs
        bar = _bar(_batch_count(first, train_examples, test_examples, batch_size), "interpolating")
        t0 = time.perf_counter()
        rows = evaluate_along(
            first.model,
            [difference_direction(first.model, second.model)],
            [(a,) for a in alphas],
            _datasets(first, train_examples, test_examples, batch_size),
            bar.update,
        )
        bar.close()
        base = (
            Path(out)
            if out
            else first.run_dir / "landscape" / f"interpolation_to_{second.run_dir.name}{suffix}"
        )
        meta = {
            **settings,
            "kind": "interpolation",
            "start_run": str(first.run_dir),
            "end_run": str(second.run_dir),
            "seconds": time.perf_counter() - t0,
        }
        written += _write_curve(base, rows, meta)
        plot_1d(
            [(f"{first.run_dir.name} -> {second.run_dir.name}", rows)],
            base.with_suffix(".png"),
            "a  (theta = (1 - a) theta_start + a theta_end)",
            "Linear interpolation between two solutions",
        )
        return written + [base.with_suffix(".png")]

    name = f"{'2d' if two_d else '1d'}_{normalization}_seed{seed}{suffix}"
    curves = []
    for run in runs:
        t0 = time.perf_counter()
        rows = random_landscape(
            run,
            alphas,
            2 if two_d else 1,
            normalization,
            seed,
            train_examples,
            test_examples,
            batch_size,
        )
        base = run.run_dir / "landscape" / name
        meta = {
            **settings,
            "kind": "2d" if two_d else "1d",
            "run": str(run.run_dir),
            "seconds": time.perf_counter() - t0,
        }
        written += _write_curve(base, rows, meta)
        title = (
            f"{run.run_dir.name}: f(a) = L(theta* + a delta), {normalization} normalization, "
            f"seed {seed}"
        )
        if two_d:
            plot_2d(rows, points, base.with_suffix(".png"), title)
        else:
            plot_1d([(run.run_dir.name, rows)], base.with_suffix(".png"), "a", title)
        written.append(base.with_suffix(".png"))
        curves.append((run.run_dir.name, rows))
    if len(runs) > 1 and not two_d:
        overlay = (
            Path(out)
            if out
            else runs[0].run_dir.parent
            / f"landscape_{name}_{'_vs_'.join(r.run_dir.name for r in runs)}.png"
        )
        plot_1d(
            curves,
            overlay,
            "a",
            f"f(a) = L(theta* + a delta), {normalization} normalization, seed {seed}",
        )
        written.append(overlay)
    return written


def random_landscape(
    run: TrainedRun,
    alphas: list[float],
    dims: int,
    normalization: str,
    seed: int,
    train_examples: int,
    test_examples: int,
    batch_size: int,
) -> list[dict[str, float]]:
    """Loss and accuracy on both splits along ``dims`` (1 or 2) seeded random directions
    (seeds ``seed``, ``seed + 1``) at every coefficient in ``alphas`` (a grid in 2-D)."""
    directions = [random_direction(run.model, seed + k, normalization) for k in range(dims)]
    grid: list[tuple[float, ...]] = (
        [(a,) for a in alphas] if dims == 1 else [(a, b) for b in alphas for a in alphas]
    )
    bar = _bar(
        _batch_count(run, train_examples, test_examples, batch_size),
        f"landscape {run.run_dir.name}",
    )
    rows = evaluate_along(
        run.model,
        directions,
        grid,
        _datasets(run, train_examples, test_examples, batch_size),
        bar.update,
    )
    bar.close()
    return rows


def _require(ok: bool, option: str, message: str) -> None:
    if not ok:
        raise BigbatchError(f"{option} {message}")


def _require_same_shapes(first: TrainedRun, second: TrainedRun) -> None:
    shapes = [[tuple(p.shape) for p in r.model.parameters()] for r in (first, second)]
    if shapes[0] != shapes[1] or first.dataset.image_size != second.dataset.image_size:
        raise BigbatchError(
            f"cannot interpolate between '{first.run_dir}' (model {first.config.model.name}) and "
            f"'{second.run_dir}' (model {second.config.model.name}): their parameters or inputs "
            "differ in shape; interpolate between two runs of the same model on the same data"
        )


def _same_data(run: TrainedRun, other_dir: str) -> bool:
    return data_key(read_run_config(other_dir).data) == data_key(run.config.data)


def _write_curve(base: Path, rows: list[dict[str, float]], meta: dict[str, Any]) -> list[Path]:
    base.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(base.with_suffix(".csv"), _csv_text(rows))
    atomic_write_json(base.with_suffix(".json"), {"settings": meta, "points": rows})
    return [base.with_suffix(".csv"), base.with_suffix(".json")]


def sharpness(
    run_dir: str,
    *,
    examples: int = 10000,
    top_k: int = 3,
    lanczos_steps: int = 20,
    trace_samples: int = 20,
    epsilon: float = 1e-3,
    ascent_steps: int = 10,
    seed: int = 0,
    batch_size: int = 1000,
    device: str = "auto",
) -> Path:
    for option, value in (
        ("--top-k", top_k),
        ("--lanczos-steps", lanczos_steps),
        ("--trace-samples", trace_samples),
        ("--ascent-steps", ascent_steps),
        ("--batch-size", batch_size),
    ):
        _require(value >= 1, option, f"must be at least 1, got {value}")
    _require(lanczos_steps >= top_k, "--lanczos-steps", f"must be >= --top-k ({top_k})")
    _require(examples >= 0, "--examples", "must be >= 0 (0: the whole training set)")
    _require(math.isfinite(epsilon) and epsilon > 0, "--epsilon", f"must be > 0, got {epsilon}")
    run = load_trained_run(run_dir, device=device)
    n = min(examples, run.dataset.num_train) if examples else run.dataset.num_train
    batches = run.batches("train", n, batch_size)
    result: dict[str, Any] = {
        "settings": {
            "examples": n,
            "split": "train (first n, no augmentation)",
            "top_k": top_k,
            "lanczos_steps": lanczos_steps,
            "trace_samples": trace_samples,
            "epsilon": epsilon,
            "ascent_steps": ascent_steps,
            "seed": seed,
            "checkpoint_epoch": run.epoch,
        },
        "seconds": {},
    }
    t0 = time.perf_counter()
    bar = _bar(lanczos_steps, "Lanczos")
    result["top_eigenvalues"] = lanczos_top_eigenvalues(
        run.model, batches, top_k, lanczos_steps, seed, lambda _: bar.update()
    )
    bar.close()
    result["seconds"]["top_eigenvalues"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bar = _bar(trace_samples, "Hutchinson")
    trace, stderr = hutchinson_trace(
        run.model, batches, trace_samples, seed, lambda _: bar.update()
    )
    bar.close()
    result["trace"], result["trace_stderr"] = trace, stderr
    result["seconds"]["trace"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result.update(epsilon_sharpness(run.model, batches, epsilon, ascent_steps))
    result["seconds"]["epsilon_sharpness"] = time.perf_counter() - t0
    path = run.run_dir / "sharpness.json"
    atomic_write_json(path, result)
    return path
