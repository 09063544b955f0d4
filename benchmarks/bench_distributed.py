"""Data-parallel step time, communication share and bytes, on 1 and 2 gloo ranks (1 thread each).

For LeNet-5 and ResNet-20 at global batch 2048 on CIFAR-10-shaped synthetic data: SGD and K-FAC
(statistics and eigendecompositions every step, so that every step communicates factors), with
and without the upper-triangle factor all-reduce. Each configuration is a real `bigbatch train`
job of two epochs, the second measured: one process, or two processes joined through
torch.distributed (the environment torchrun would set). Speed-ups are against the same model and
optimizer on one rank in the same run.

    .venv/bin/python benchmarks/bench_distributed.py [--steps 6] [--models lenet5 resnet20]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile

from bigbatch.io import read_jsonl
from common import bar, header, ratio, table

BATCH = 2048
VARIANTS = {
    "SGD": ["optimizer.name=sgd"],
    "K-FAC, full factors": [
        "optimizer.name=kfac",
        "kfac.factor_interval=1",
        "kfac.inverse_interval=1",
        "kfac.upper_triangle=false",
    ],
    "K-FAC, upper triangle": [
        "optimizer.name=kfac",
        "kfac.factor_interval=1",
        "kfac.inverse_interval=1",
    ],
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6, help="steps per measured epoch")
    parser.add_argument("--models", nargs="+", choices=list(MODEL_NAMES), default=list(MODEL_NAMES))
    args = parser.parse_args()
    # One process communicates nothing, so the upper triangle is measured on two ranks only.
    jobs = [
        (model, label, world)
        for model in args.models
        for label in VARIANTS
        for world in (1, 2)
        if world == 2 or "upper" not in label
    ]
    rows = []
    one_rank: dict[tuple[str, str], float] = {}  # step seconds of (model, optimizer) on one rank
    progress = bar(len(jobs), "bigbatch train jobs")
    with tempfile.TemporaryDirectory() as out:
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
            row = run_job(out, f"{model}-{world}", world, base + VARIANTS[label])
            progress.update()
            step = row["epoch_time"] / args.steps
            optimizer = "SGD" if label == "SGD" else "K-FAC"
            if world == 1:
                one_rank[(model, optimizer)] = step
            comm = row.get("communication_time", 0.0) + row.get("kfac_communication_time", 0.0)
            grad_mb = row.get("bytes_communicated", 0) / args.steps / 1e6
            factor_mb = row.get("kfac_factor_bytes", 0) / args.steps / 1e6
            shared = [
                ratio(one_rank[(model, optimizer)], step),
                f"{100 * comm / row['epoch_time']:.1f}%",
                f"{grad_mb:.2f} MB",
                f"{factor_mb:.2f} MB",
            ]
            rows.append(
                [MODEL_NAMES[model], label, world, f"{step:.3f}"]
                + (["", "", "", ""] if world == 1 else shared)
            )
    progress.close()
    print(header(f"Data-parallel training at global batch {BATCH}, gloo, 1 thread per rank"))
    print(f"Synthetic CIFAR-10-shaped data, {args.steps} steps per epoch, second epoch measured\n")
    columns = ["model", "optimizer", "ranks", "step s", "speed-up vs 1 rank"]
    columns += ["communication share", "gradient+metric bytes/step", "K-FAC factor bytes/step"]
    print(table(columns, rows))


if __name__ == "__main__":
    main()
