"""Analysis cost as a ratio to one training epoch measured in the same run.

Trains LeNet-5 on CIFAR-10 at batch 128 (the paper's small batch) for --epochs epochs and takes the
median epoch time after the first, then times on the resulting run: `bigbatch landscape` (a 1-D
landscape of --points points on the whole training and test sets, CSV and plot included) and the
top Hessian eigenvalue (--lanczos-steps Lanczos steps on --hessian-examples training examples).

    .venv/bin/python benchmarks/bench_analysis.py [--data PATH] [--epochs 4] [--points 41]
        [--hessian-examples 10000] [--lanczos-steps 20] [--train-limit N]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time

from bigbatch.analysis.commands import landscape
from bigbatch.analysis.hessian import lanczos_top_eigenvalues
from bigbatch.analysis.loading import load_trained_run
from bigbatch.config import load_config
from bigbatch.train.trainer import Trainer
from common import DEFAULT_DATA, bar, header, ratio, table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=4, help="at least 2: the first is warm-up")
    parser.add_argument("--points", type=int, default=41)
    parser.add_argument("--hessian-examples", type=int, default=10000)
    parser.add_argument("--lanczos-steps", type=int, default=20)
    parser.add_argument("--train-limit", type=int, default=0, help="0: the whole training set")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is not timed)")
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            None,
            [
                f"data.path={args.data}",
                f"data.train_limit={args.train_limit}",
                f"runtime.output_dir={out}",
                "run.name=b",
                f"run.epochs={args.epochs}",
                "runtime.progress=auto",
                "train.train_eval_examples=0",
            ],
        )
        # The trainer's epoch summaries go to stdout; they belong with its progress bar on stderr.
        with contextlib.redirect_stdout(sys.stderr):
            rows = Trainer(cfg).fit()
        epoch = statistics.median(r["epoch_time"] for r in rows[1:])
        run = load_trained_run(f"{out}/b")  # loads the dataset once, outside the timings
        n_train, n_test = run.dataset.num_train, run.dataset.num_test
        n_hessian = min(args.hessian_examples, n_train)
        progress = bar(args.lanczos_steps, "Lanczos steps")
        start = time.perf_counter()
        top = lanczos_top_eigenvalues(
            run.model,
            run.batches("train", n_hessian, 1000),
            k=1,
            steps=args.lanczos_steps,
            progress=lambda _: progress.update(),
        )
        eig = time.perf_counter() - start
        progress.close()
        start = time.perf_counter()
        landscape([f"{out}/b"], points=args.points)  # shows its own progress bar on a terminal
        land = time.perf_counter() - start

    print(header("Analysis cost against a training epoch: LeNet-5, batch 128"))
    print(f"{run.dataset.name}: one epoch is the median of epochs 2-{args.epochs} of one run\n")
    print(
        table(
            ["task", "seconds", "training epochs"],
            [
                ["one training epoch", f"{epoch:.2f}", "1.00x"],
                [
                    f"1-D landscape, {args.points} points, {n_train} train + {n_test} test",
                    f"{land:.1f}",
                    ratio(land, epoch),
                ],
                [
                    f"top Hessian eigenvalue ({top[0]:.3g}), {args.lanczos_steps} Lanczos steps, "
                    f"{n_hessian} examples",
                    f"{eig:.1f}",
                    ratio(eig, epoch),
                ],
            ],
        )
    )


if __name__ == "__main__":
    main()
