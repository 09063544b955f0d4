"""Analysis cost as a ratio to one training epoch, measured in one run.

Trains LeNet-5 on CIFAR-10 for four epochs (batch 128, the seed's small batch) and takes the median
of the last three epoch times,
then times on the resulting checkpoint: a 41-point 1-D landscape on the full training and test sets,
and the top Hessian eigenvalue (20 Lanczos steps) on 10,000 training examples.

    .venv/bin/python benchmarks/bench_analysis.py [--data PATH]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from bigbatch.analysis.commands import landscape
from bigbatch.analysis.hessian import lanczos_top_eigenvalues
from bigbatch.analysis.loading import load_trained_run
from bigbatch.config import load_config
from bigbatch.train.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.zip")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            None,
            [
                f"data.path={args.data}",
                f"runtime.output_dir={out}",
                "run.name=b",
                "run.epochs=4",
                "runtime.progress=off",
                "train.train_eval_examples=0",
            ],
        )
        rows = Trainer(cfg).fit()
        epoch = statistics.median(r["epoch_time"] for r in rows[1:])  # warm epochs 2-4
        start = time.perf_counter()
        landscape([f"{out}/b"], points=41)
        land = time.perf_counter() - start
        run = load_trained_run(f"{out}/b")
        start = time.perf_counter()
        top = lanczos_top_eigenvalues(run.model, run.batches("train", 10000, 1000), k=1, steps=20)
        eig = time.perf_counter() - start
    print(f"LeNet-5, CIFAR-10, {torch.get_num_threads()} threads")
    print("| task | seconds | training epochs (batch 128) |")
    print("|---|---|---|")
    print(f"| one training epoch | {epoch:.2f} | 1 |")
    print(
        f"| 1-D landscape, 41 points, 50,000 train + 10,000 test | {land:.1f} | {land / epoch:.1f} |"
    )
    print(
        f"| top Hessian eigenvalue, 20 Lanczos steps, 10,000 examples ({top[0]:.3g}) | {eig:.1f} | {eig / epoch:.1f} |"
    )


if __name__ == "__main__":
    main()
