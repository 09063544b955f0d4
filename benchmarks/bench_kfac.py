"""K-FAC's overhead against SGD, and against ASDL's KfacGradientMaker step for step, in one run.

For LeNet-5 on CIFAR-10 at batch 128 and 2048:
  * epochs: bigbatch Trainer epochs with SGD and with K-FAC at its default intervals (statistics
    every 10 steps, eigendecompositions every 100; also with inverse_method = inverse),
    interleaved after a warm-up epoch each; mean
    epoch time, so that the periodic eigendecompositions count at their amortized rate, and
    K-FAC's per-part seconds per epoch from kfac.metrics();
  * steps: per-step times of plain SGD (the floor), bigbatch K-FAC with its default damping
    (eigenbases, exact Tikhonov) and with ASDL's algorithm (pi-split damping through Cholesky
    inverses), and ASDL's K-FAC (empirical Fisher, the same damping and intervals), all on
    bigbatch's LeNet5 in plain NCHW without micro-batching, in interleaved rounds (median).

    .venv/bin/pip install -e '.[bench]'   # ASDL (asdfghjkl); without it the steps table is skipped
    .venv/bin/python benchmarks/bench_kfac.py [--data PATH] [--epochs 4] [--steps 30]
        [--rounds 3] [--intervals 1 10] [--part all|epochs|steps] [--train-limit N]

ASDL calls torch.cuda.nvtx, which a CPU-only torch lacks: the ranges are replaced by no-ops here.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bigbatch.config import default_cache_dir
from bigbatch.data import ImageDataset, load_dataset
from bigbatch.data.batches import BatchLoader, channel_stats
from bigbatch.models import LeNet5
from bigbatch.optim.kfac import KFACPreconditioner
from common import DEFAULT_DATA, bar, header, make_trainer, page_faults, ratio, table

BATCHES = (128, 2048)
PARTS = ("statistics", "eigendecomposition", "preconditioning")
# The epochs table: SGD, K-FAC's default exact (eigenbasis) solve, and its factored-Tikhonov
# inverses, which take two products per layer and step instead of four.
EPOCH_VARIANTS = {
    "sgd": ["optimizer.name=sgd"],
    "kfac": ["optimizer.name=kfac"],
    "kfac-inverse": ["optimizer.name=kfac", "kfac.inverse_method=inverse"],
}
EPOCH_LABELS = {
    "sgd": "SGD",
    "kfac": "K-FAC defaults (10/100)",
    "kfac-inverse": "K-FAC, inverse_method = inverse",
}
STEP_IMPLEMENTATIONS = ("sgd", "bigbatch-inverse", "bigbatch", "asdl")


def compare_epochs(args: argparse.Namespace, ds: ImageDataset) -> None:
    batches = [b for b in BATCHES if b <= ds.num_train]
    rows = []
    progress = bar(len(batches) * len(EPOCH_VARIANTS) * (args.epochs + 1), "epochs")
    with tempfile.TemporaryDirectory() as out:
        for batch in batches:
            trainers = {
                name: make_trainer(args.data, ds, batch, out, f"{name}{batch}", overrides)
                for name, overrides in EPOCH_VARIANTS.items()
            }
            times: dict[str, list[float]] = {name: [] for name in trainers}
            parts: dict[str, list[dict[str, float]]] = {name: [] for name in trainers}
            for e in range(args.epochs + 1):
                for name, trainer in trainers.items():
                    if trainer.kfac is not None:
                        trainer.kfac.reset_metrics()
                    seconds = trainer.train_epoch(e)["epoch_time"]
                    progress.update()
                    if e == 0:
                        continue  # warm-up (oneDNN primitives, the first decomposition)
                    times[name].append(seconds)
                    if trainer.kfac is not None:
                        parts[name].append(trainer.kfac.metrics())
            sgd = statistics.mean(times["sgd"])
            rows.append([batch, EPOCH_LABELS["sgd"], f"{sgd:.2f}", "1.00x", "", "", ""])
            for name in ("kfac", "kfac-inverse"):
                seconds = statistics.mean(times[name])
                per_part = [
                    statistics.mean(p[f"kfac_{k}_time"] for p in parts[name]) for k in PARTS
                ]
                rows.append(
                    [batch, EPOCH_LABELS[name], f"{seconds:.2f}", ratio(seconds, sgd)]
                    + [f"{s:.2f}" for s in per_part]
                )
    progress.close()
    print(
        f"Trainer epochs, {ds.num_train} training images: mean of {args.epochs} interleaved epochs "
        "after a warm-up epoch each\n"
    )
    print(table(["batch", "optimizer", "epoch s", "vs SGD", *(f"{p} s" for p in PARTS)], rows))


def _patch_nvtx() -> None:
    import torch.cuda.nvtx as nvtx

    nvtx.range_push = lambda *a, **k: None
    nvtx.range_pop = lambda *a, **k: None


def step_timer(
    name: str, batches: list[tuple[torch.Tensor, torch.Tensor]], interval: int
) -> Callable[[], tuple[float, float]]:
    """(seconds, page faults) per step of one implementation at equal settings, averaged over
    max(len(batches), inverse interval) steps.

    name: "sgd" (the floor), "bigbatch" (its default: eigenbases, exact Tikhonov damping),
    "bigbatch-inverse" (ASDL's algorithm: pi-split damping through Cholesky inverses) or "asdl".
    """
    torch.manual_seed(0)
    # Plain Conv2d/Linear modules in NCHW, which ASDL's hooks read: K-FAC against K-FAC.
    model = LeNet5(3, (32, 32), 10)
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
            ema_decay=0.05,  # ASDL weighs the new value: bigbatch's factor_decay 0.95
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
        # A whole inverse interval (cycling through the batches), so that statistics and
        # decomposition steps count at their amortized rate, not just the plain steps between.
        steps = max(len(batches), inverse_interval)
        step(*batches[0])  # warm-up
        faults = page_faults()
        start = time.perf_counter()
        for k in range(steps):
            step(*batches[k % len(batches)])
        seconds = (time.perf_counter() - start) / steps
        return seconds, (page_faults() - faults) / steps

    return run


def compare_steps(args: argparse.Namespace, ds: ImageDataset) -> None:
    mean, std = channel_stats(ds.train_images)
    batches_of = {}
    for batch in (b for b in BATCHES if b <= ds.num_train):
        loader = BatchLoader(
            ds.train_images, ds.train_labels, batch, mean=mean, std=std, shuffle=True
        )
        batches_of[batch] = [b for _, b in zip(range(args.steps), loader)]
    settings = [(batch, interval) for batch in batches_of for interval in args.intervals]
    progress = bar(len(settings) * args.rounds * len(STEP_IMPLEMENTATIONS), "step timings")
    rows = []
    for batch, interval in settings:
        timers = {
            name: step_timer(name, batches_of[batch], interval) for name in STEP_IMPLEMENTATIONS
        }
        # Rounds interleave the four, so that a slow spell of the machine hits all of them.
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in timers}
        for _ in range(args.rounds):
            for name, run in timers.items():
                runs[name].append(run())
                progress.update()
        t = {name: statistics.median(s for s, _ in values) for name, values in runs.items()}
        faults = [f"{statistics.median(f for _, f in runs[name]):.0f}" for name in timers]
        rows.append(
            [
                batch,
                "1/1" if interval == 1 else "10/100",
                *(f"{1e3 * t[name]:.1f}" for name in STEP_IMPLEMENTATIONS),
                ratio(t["asdl"], t["bigbatch-inverse"]),
                ratio(t["asdl"], t["bigbatch"]),
                ratio(t["bigbatch"], t["sgd"]),
                ratio(t["asdl"], t["sgd"]),
                " / ".join(faults),
            ]
        )
    progress.close()
    print(
        f"\nPer step (ms), plain NCHW loop, no micro-batching, empirical Fisher, damping 1e-2; "
        f"median of {args.rounds} interleaved rounds. 'bigbatch inverse' is bigbatch with ASDL's "
        "algorithm (pi-split damping, Cholesky inverses), 'bigbatch eigen' its default.\n"
    )
    columns = ["batch", "intervals (stats/inverse)", "SGD", "bigbatch inverse", "bigbatch eigen"]
    columns += ["ASDL", "ASDL / bigbatch inverse", "ASDL / bigbatch eigen"]
    columns += ["bigbatch eigen / SGD", "ASDL / SGD", "page faults/step (SGD/inv/eigen/ASDL)"]
    print(table(columns, rows))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs per optimizer")
    parser.add_argument("--steps", type=int, default=30, help="distinct batches per step timing")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved step-timing rounds")
    parser.add_argument(
        "--intervals",
        type=int,
        nargs="+",
        choices=(1, 10),
        default=[1, 10],
        help="statistics intervals of the steps table (10: decompositions every 100 steps)",
    )
    parser.add_argument("--part", choices=("all", "epochs", "steps"), default="all")
    parser.add_argument("--train-limit", type=int, default=0, help="0: the whole training set")
    args = parser.parse_args()
    try:
        import asdl  # noqa: F401

        have_asdl = True
    except ImportError:
        have_asdl = False

    ds = load_dataset(
        "auto", args.data, train_limit=args.train_limit or None, cache_dir=default_cache_dir()
    )
    print(header(f"K-FAC overhead: LeNet-5 on {ds.name}"))
    if args.part in ("all", "epochs"):
        compare_epochs(args, ds)
    if args.part in ("all", "steps"):
        if have_asdl:
            compare_steps(args, ds)
        else:
            print("\nASDL (pip install -e '.[bench]') is not installed: per-step table skipped")


if __name__ == "__main__":
    main()
