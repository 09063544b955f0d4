"""Data-parallel step time, communication share and bytes, on 1, 2 (and 4) gloo ranks.

For LeNet-5 and ResNet-20 at global batch 2048 on CIFAR-10-shaped synthetic data: SGD and K-FAC
(statistics and eigendecompositions every step, so that every step communicates factors and
decompositions) in KAISA's three preconditioning modes (``kfac.grad_worker_fraction``): COMM-OPT
(fraction 1, every rank holds every decomposition), MEM-OPT (1/ranks, a layer's owner alone holds
and solves it and broadcasts the preconditioned gradient) and, from 4 ranks, HYBRID (2/ranks,
groups of two); plus COMM-OPT with full (not upper-triangle) factors. Each configuration is a real
`bigbatch train` job of two epochs, the second measured: one process, or several joined through
torch.distributed (the environment torchrun would set), one thread each. With ``--rounds`` the
jobs repeat in interleaved rounds and each row takes the round of median step time. Speed-ups are
against the same model and optimizer on one rank, mode ratios against COMM-OPT on as many ranks,
both in the same run. Bytes and held memory are rank 0's (the rank that writes metrics).

    .venv/bin/python benchmarks/bench_distributed.py [--steps 6] [--models lenet5 resnet20]
        [--ranks 1 2] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable

from bigbatch.io import read_jsonl
from common import bar, header, ratio, table

BATCH = 2048
KFAC_EVERY_STEP = [
    "optimizer.name=kfac",
    "kfac.factor_interval=1",
    "kfac.inverse_interval=1",
]
COMM_OPT = "K-FAC COMM-OPT"
HYBRID = "K-FAC HYBRID (groups of 2)"
# Each variant: the sets for a job on ``world`` ranks, and the fewest ranks it applies to.
VARIANTS: dict[str, tuple[Callable[[int], list[str]], int]] = {
    "SGD": (lambda world: ["optimizer.name=sgd"], 1),
    COMM_OPT: (lambda world: [*KFAC_EVERY_STEP, "kfac.grad_worker_fraction=1"], 1),
    "K-FAC MEM-OPT": (
        lambda world: [*KFAC_EVERY_STEP, f"kfac.grad_worker_fraction={1 / world}"],
        2,
    ),
    HYBRID: (
        lambda world: [*KFAC_EVERY_STEP, f"kfac.grad_worker_fraction={2 / world}"],
        4,
    ),
    "K-FAC COMM-OPT, full factors": (
        lambda world: [*KFAC_EVERY_STEP, "kfac.upper_triangle=false"],
        2,
    ),
}
MODEL_NAMES = {"lenet5": "LeNet-5", "resnet20": "ResNet-20"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(out: str, name: str, world: int, sets: list[str]) -> dict:
    """The last metrics row of a `bigbatch train` job on ``world`` local ranks."""
    args = [sys.executable, "-m", "bigbatch", "train", "--overwrite"]
    placement = [
        f"runtime.output_dir={out}",
        f"run.name={name}",
        "runtime.threads=1",
        "runtime.progress=off",
    ]
    for s in [*sets, *placement]:
        args += ["--set", s]
    port = _port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if world > 1:
            env.update(
                RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        procs.append(
            subprocess.Popen(
                args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
        )
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"{name} failed: {err}")
    return read_jsonl(f"{out}/{name}/metrics.jsonl")[-1]


def _mb(nbytes: float, steps: int) -> str:
    return f"{nbytes / steps / 1e6:.3f} MB" if nbytes else "0"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6, help="steps per measured epoch")
    parser.add_argument("--models", nargs="+", choices=list(MODEL_NAMES), default=list(MODEL_NAMES))
    parser.add_argument(
        "--ranks", type=int, nargs="+", default=[1, 2], help="world sizes (HYBRID needs >= 4)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repeats of every job")
    args = parser.parse_args()
    worlds = sorted(set([1, *args.ranks]))  # one rank: the baseline of the speed-ups
    # One process communicates nothing and has one mode, so the variants start at their ranks.
    jobs = [
        (model, label, world)
        for model in args.models
        for label, (_, fewest) in VARIANTS.items()
        for world in worlds
        if world >= fewest
        and (world > 1 or label in ("SGD", COMM_OPT))
        and (label != HYBRID or world % 2 == 0)  # groups of two must divide the ranks
    ]
    results: dict[tuple[str, str, int], list[dict]] = {job: [] for job in jobs}
    progress = bar(len(jobs) * args.rounds, "bigbatch train jobs")
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.rounds):
            for model, label, world in jobs:
                progress.set_postfix_str(f"{model} {label} {world} rank(s)")
                base = [
                    "data.format=synthetic",
                    f"data.train_limit={BATCH * args.steps}",
                    "data.test_limit=512",
                    f"train.batch_size={BATCH}",
                    f"model.name={model}",
                    "run.epochs=2",
                    "train.train_eval_examples=0",
                ]
                sets = base + VARIANTS[label][0](world)
                results[(model, label, world)].append(run_job(out, f"{model}-{world}", world, sets))
                progress.update()
    progress.close()

    def median_row(job: tuple[str, str, int]) -> dict:
        runs = sorted(results[job], key=lambda r: r["epoch_time"])
        return runs[(len(runs) - 1) // 2]

    def step_s(model: str, label: str, world: int) -> float:
        return median_row((model, label, world))["epoch_time"] / args.steps

    rows = []
    for model, label, world in jobs:
        row = median_row((model, label, world))
        step = row["epoch_time"] / args.steps
        kfac = label != "SGD"
        held = row.get("kfac_held_decomposition_bytes", 0) / 2**20
        cells: list[object] = [MODEL_NAMES[model], label, world, f"{step:.3f}"]
        if world == 1:
            cells += ["", "", "", "", "", "", "", ""]
        else:
            one = step_s(model, COMM_OPT if kfac else "SGD", 1)
            comm = row.get("communication_time", 0.0) + row.get("kfac_communication_time", 0.0)
            cells += [
                ratio(one, step),
                ratio(step, step_s(model, COMM_OPT, world)) if kfac else "",
                f"{100 * comm / row['epoch_time']:.1f}%",
                _mb(row.get("bytes_communicated", 0), args.steps),
            ]
            cells += [
                _mb(row.get(f"kfac_{part}_bytes", 0), args.steps) if kfac else ""
                for part in ("factor", "decomposition", "gradient")
            ]
            cells.append(f"{held:.2f}" if kfac else "")
        cells += [
            f"{row[f'kfac_{part}_time'] / args.steps:.3f}" if kfac else ""
            for part in ("eigendecomposition", "preconditioning")
        ]
        rows.append(cells)
    print(header(f"Data-parallel training at global batch {BATCH}, gloo, 1 thread per rank"))
    print(
        f"Synthetic CIFAR-10-shaped data, {args.steps} steps per epoch, second epoch measured, "
        f"median of {args.rounds} interleaved round(s); bytes sent and memory held by rank 0\n"
    )
    columns = ["model", "optimizer", "ranks", "step s", "speed-up vs 1 rank", "step vs COMM-OPT"]
    columns += ["communication share", "gradient+metric bytes/step", "K-FAC factor bytes/step"]
    columns += ["decomposition bytes/step", "preconditioned-gradient bytes/step"]
    columns += ["held decompositions MiB", "eigendecomposition s/step"]
    columns += ["preconditioning s/step (with its broadcast)"]
    print(table(columns, rows))


if __name__ == "__main__":
    main()
