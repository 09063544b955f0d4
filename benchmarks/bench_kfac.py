"""K-FAC overhead, per part, against SGD and against ASDL's KfacGradientMaker, measured in one run.

For LeNet-5 on CIFAR-10 at batch 128 and 2048:
  * bigbatch epochs (Trainer.train_epoch): SGD, K-FAC at its defaults, K-FAC with statistics and
    eigendecompositions every step; K-FAC's per-part times (statistics, eigendecomposition,
    preconditioning) from its own timers;
  * per-step times of plain SGD (the floor), bigbatch K-FAC with its default eigen/exact damping and
    with ASDL's own algorithm (pi-split damping through Cholesky inverses), and ASDL K-FAC (empirical
    Fisher, the same damping, matching intervals), all in plain NCHW without micro-batching.

    .venv/bin/pip install asdfghjkl   # optional: without it the ASDL rows are skipped
    .venv/bin/python benchmarks/bench_kfac.py [--data PATH] [--steps 30] [--rounds 3] [--part all|epochs|steps]

ASDL calls torch.cuda.nvtx, which a CPU-only torch lacks: the ranges are replaced by no-ops here.

The per-step comparison runs twice, each in a fresh process: with glibc's default allocator, which hands
buffers over its (adaptive, at most 32 MB) mmap threshold back to the kernel on free so that the next
step page-faults them in afresh, and with freed memory retained (MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ set high), which leaves only the computation. The first is what a user gets by
default; the second compares the implementations' arithmetic. Page faults per step are printed for both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench_trainer import (
    RETAINED_MEMORY,
    page_faults,
)  # a sibling script: benchmarks/ is on the path
from bigbatch.config import load_config
from bigbatch.data import load_dataset
from bigbatch.data.batches import BatchLoader, channel_stats
from bigbatch.models import LeNet5
from bigbatch.optim.kfac import KFACPreconditioner
from bigbatch.train.trainer import Trainer


def trainer_epoch(
    data: str, batch: int, out: str, extra: list[str], epochs: int
) -> tuple[float, dict[str, float]]:
    cfg = load_config(
        None,
        [
            f"data.path={data}",
            f"train.batch_size={batch}",
            "train.train_eval_examples=0",
            "runtime.progress=off",
            f"runtime.output_dir={out}",
            "run.name=bench",
            "data.test_limit=1000",
            *extra,
        ],
    )
    trainer = Trainer(cfg)
    trainer.train_epoch(0)  # warm-up
    times, parts = [], []
    for e in range(epochs):
        if trainer.kfac is not None:
            trainer.kfac.reset_metrics()
        times.append(trainer.train_epoch(e + 1)["epoch_time"])
        parts.append(dict(trainer.kfac.timings) if trainer.kfac is not None else {})
    median = statistics.median(times)
    closest = min(range(len(times)), key=lambda i: abs(times[i] - median))
    return median, parts[closest]


def _patch_nvtx() -> None:
    import torch.cuda.nvtx as nvtx

    nvtx.range_push = lambda *a, **k: None
    nvtx.range_pop = lambda *a, **k: None


def step_timer(
    name: str, batches: list[tuple[torch.Tensor, torch.Tensor]], interval: int
) -> Callable[[], tuple[float, float]]:
    """(seconds, page faults) per step, means over max(batches, inverse_interval) steps, of one
    implementation at equal settings.

    name: "sgd" (the floor), "bigbatch" (its default: eigenbases, exact Tikhonov damping), "bigbatch-inverse"
    (ASDL's algorithm: pi-split damping through Cholesky inverses), or "asdl".
    """
    torch.manual_seed(0)
    # An ordinary conv1 for all four (ASDL reads conv outputs as [N, C, H, W]): K-FAC against K-FAC.
    model = LeNet5(3, (32, 32), 10, phases=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    inverse_interval = interval * 10 if interval > 1 else 1
    if name == "sgd":

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    elif name.startswith("bigbatch"):
        method = (
            dict(inverse_method="inverse", pi_damping=True) if name == "bigbatch-inverse" else {}
        )
        kfac = KFACPreconditioner(
            model,
            damping=1e-2,
            factor_decay=0.95,
            factor_interval=interval,
            inverse_interval=inverse_interval,
            kl_clip=0.0,
            **method,
        )

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            kfac.step(lr=0.001)
            opt.step()
    else:
        _patch_nvtx()
        from asdl.precondition import KfacGradientMaker, PreconditioningConfig

        config = PreconditioningConfig(
            data_size=batches[0][0].shape[0],
            damping=1e-2,
            ema_decay=0.05,
            curvature_upd_interval=interval,
            preconditioner_upd_interval=inverse_interval,
        )
        gm = KfacGradientMaker(model, config, fisher_type="fisher_emp")

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            opt.zero_grad()
            dummy = gm.setup_model_call(model, x)
            gm.setup_loss_call(F.cross_entropy, dummy, y)
            gm.forward_and_backward()
            opt.step()

    def run() -> tuple[float, float]:
        # Mean over a whole inverse interval (cycling through the batches), so the amortized cost of
        # statistics and decomposition steps counts, not just that of the plain steps in between.
        steps = max(len(batches), inverse_interval)
        step(*batches[0])  # warm-up
        faults = page_faults()
        start = time.perf_counter()
        for k in range(steps):
            step(*batches[k % len(batches)])
        seconds = (time.perf_counter() - start) / steps
        return seconds, (page_faults() - faults) / steps

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.zip")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds of the per-step comparison (median)",
    )
    parser.add_argument(
        "--part",
        choices=("all", "epochs", "steps"),
        default="all",
        help="epochs: the Trainer table only; steps: the per-step comparison with ASDL only",
    )
    parser.add_argument(
        "--allocator", choices=("default", "retained"), default=None, help=argparse.SUPPRESS
    )  # set by this script for its per-step child processes
    args = parser.parse_args()
    try:
        import asdl  # noqa: F401

        have_asdl = True
    except ImportError:
        have_asdl = False

    ds = load_dataset("auto", args.data, cache_dir=".cache/bigbatch")
    mean, std = channel_stats(ds.train_images)
    if args.allocator is None:
        print(f"LeNet-5 on {ds.name}, {torch.get_num_threads()} threads; times are medians\n")
    if args.part != "steps":
        print(
            "| batch | variant | epoch s | vs SGD | statistics s | eigendecomposition s | preconditioning s |"
        )
        print("|---|---|---|---|---|---|---|")
        with tempfile.TemporaryDirectory() as out:
            for batch in (128, 2048):
                variants = {
                    "SGD": ["optimizer.name=sgd"],
                    "K-FAC defaults (10/100)": ["optimizer.name=kfac"],
                    "K-FAC every step (1/1)": [
                        "optimizer.name=kfac",
                        "kfac.factor_interval=1",
                        "kfac.inverse_interval=1",
                    ],
                }
                if batch == 2048:
                    variants["K-FAC paper LB (1/10, 1/4 of batch)"] = [
                        "optimizer.name=kfac",
                        "kfac.factor_interval=1",
                        "kfac.inverse_interval=10",
                        "kfac.stats_fraction=0.25",
                    ]
                sgd = None
                for name, extra in variants.items():
                    t, parts = trainer_epoch(args.data, batch, out, extra, args.epochs)
                    sgd = sgd or t
                    print(
                        f"| {batch} | {name} | {t:.2f} | {t / sgd:.2f}x | {parts.get('statistics', 0):.2f} | "
                        f"{parts.get('eigendecomposition', 0):.2f} | {parts.get('preconditioning', 0):.2f} |",
                        flush=True,
                    )

    if args.part == "epochs":
        return
    if not have_asdl:
        print("\nASDL (pip install asdfghjkl) not installed: per-step comparison skipped")
        return
    if args.allocator is not None:
        compare_steps(ds, mean, std, args.steps, args.rounds, args.allocator)
        return
    print(
        f"\nPer step, plain NCHW loop, no micro-batching, empirical Fisher, damping 1e-2; ms/step, median of "
        f"{args.rounds} interleaved rounds. 'inverse' is bigbatch with ASDL's algorithm (pi-split damping, "
        "Cholesky inverses); 'eigen' its default. Each allocator in a fresh process:\n"
    )
    print(
        "| allocator | batch | intervals (stats/inverse) | SGD | bigbatch inverse | bigbatch eigen | ASDL | "
        "ASDL / bigbatch inverse | ASDL / bigbatch eigen | ASDL / SGD (the ceiling) | page faults per step "
        "(SGD / inverse / eigen / ASDL) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for allocator in ("default", "retained"):
        env = dict(os.environ, **(RETAINED_MEMORY if allocator == "retained" else {}))
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--data",
                args.data,
                "--steps",
                str(args.steps),
                "--rounds",
                str(args.rounds),
                "--part",
                "steps",
                "--allocator",
                allocator,
            ],
            env=env,
            check=True,
        )


def compare_steps(
    ds, mean: list[float], std: list[float], steps: int, rounds: int, allocator: str
) -> None:
    """Table rows of the per-step comparison, in this process (its allocator set by the caller)."""
    for batch in (128, 2048):
        loader = BatchLoader(
            ds.train_images, ds.train_labels, batch, mean=mean, std=std, shuffle=True
        )
        batches = [b for _, b in zip(range(steps), loader)]
        for interval in (1, 10):
            timers = {
                name: step_timer(name, batches, interval)
                for name in ("sgd", "bigbatch-inverse", "bigbatch", "asdl")
            }
            # Rounds interleave the four, so that a slow spell of the machine hits all of them; medians.
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name in timers}
            for _ in range(rounds):
                for name, run in timers.items():
                    runs[name].append(run())
            t = {name: statistics.median(s for s, _ in values) for name, values in runs.items()}
            faults = " / ".join(
                f"{statistics.median(f for _, f in runs[name]):.0f}" for name in timers
            )
            label = "1/1" if interval == 1 else "10/100"
            print(
                f"| {allocator} | {batch} | {label} | {1e3 * t['sgd']:.1f} | {1e3 * t['bigbatch-inverse']:.1f} | "
                f"{1e3 * t['bigbatch']:.1f} | {1e3 * t['asdl']:.1f} | {t['asdl'] / t['bigbatch-inverse']:.2f}x | "
                f"{t['asdl'] / t['bigbatch']:.2f}x | {t['asdl'] / t['sgd']:.2f}x | {faults} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
