"""Data-parallel step time, communication share and bytes, on 1 and 2 gloo ranks (1 thread each).

For LeNet-5 and ResNet-20 at global batch 2048 on CIFAR-10-shaped data, SGD and K-FAC (statistics
and eigendecompositions every step, so every step communicates factors), with and without the
upper-triangle factor all-reduce. Each configuration is a real `bigbatch train` job: one process,
or two processes joined through torch.distributed (the environment torchrun would set).

    .venv/bin/python benchmarks/bench_distributed.py [--steps 6]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile

from bigbatch.io import read_jsonl


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(out: str, name: str, world: int, sets: list[str]) -> dict:
    args = [sys.executable, "-m", "bigbatch", "train", "--overwrite"]
    for s in [
        *sets,
        f"runtime.output_dir={out}",
        f"run.name={name}",
        "runtime.threads=1",
        "runtime.progress=off",
    ]:
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
    args = parser.parse_args()
    batch = 2048
    print(
        "| model | optimizer | ranks | step s | communication share | gradient+metric bytes/step | K-FAC factor bytes/step |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as out:
        for model in ("lenet5", "resnet20"):
            base = [
                "data.format=synthetic",
                f"data.train_limit={batch * args.steps}",
                "data.test_limit=512",
                f"train.batch_size={batch}",
                f"model.name={model}",
                "run.epochs=2",
                "train.train_eval_examples=0",
            ]
            variants = {
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
            for label, extra in variants.items():
                for world in (1, 2):
                    if world == 1 and "upper" in label:
                        continue  # one process communicates nothing
                    row = run_job(out, f"{model}-{world}", world, base + extra)
                    step = row["epoch_time"] / args.steps
                    comm = row.get("communication_time", 0.0) + row.get(
                        "kfac_communication_time", 0.0
                    )
                    share = comm / row["epoch_time"] if world > 1 else 0.0
                    grad_bytes = row.get("bytes_communicated", 0) / args.steps
                    factor_bytes = row.get("kfac_factor_bytes", 0) / args.steps
                    print(
                        f"| {model} | {label} | {world} | {step:.3f} | {100 * share:.1f}% | {grad_bytes / 1e6:.2f} MB | "
                        f"{factor_bytes / 1e6:.2f} MB |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
