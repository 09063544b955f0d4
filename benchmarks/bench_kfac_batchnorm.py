"""What BatchNorm curvature (kfac.batchnorm = "unit") costs in a ResNet-20 K-FAC epoch.

Trainer epochs of ResNet-20 with K-FAC at its default intervals on a CIFAR-10 subset, with the
2x2 BatchNorm blocks and without ("none": BatchNorm keeps its raw gradient), interleaved after a
warm-up epoch each; the ratio of mean epoch times and K-FAC's per-part seconds. The warm-up epoch
holds the first eigendecomposition, so the measured epochs carry none unless they reach step 100:
that makes BatchNorm's share look larger, not smaller.

    .venv/bin/python benchmarks/bench_kfac_batchnorm.py [--data PATH] [--train-limit 2560]
        [--epochs 3] [--batch 128]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from bigbatch.data import load_dataset
from common import DEFAULT_DATA, bar, header, make_trainer, ratio, table

PARTS = ("statistics", "eigendecomposition", "preconditioning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--train-limit", type=int, default=2560)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    ds = load_dataset("auto", args.data, train_limit=args.train_limit, test_limit=256)
    variants = {"unit": "2x2 blocks (unit)", "none": "raw gradient (none)"}
    times: dict[str, list[float]] = {v: [] for v in variants}
    parts: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as out:
        trainers = {
            v: make_trainer(
                args.data,
                ds,
                args.batch,
                out,
                v,
                ["model.name=resnet20", "optimizer.name=kfac", f"kfac.batchnorm={v}"],
            )
            for v in variants
        }
        progress = bar(2 * (args.epochs + 1), "epochs")
        for epoch in range(args.epochs + 1):
            for v, trainer in trainers.items():
                trainer.kfac.reset_metrics()
                seconds = trainer.train_epoch(epoch)["epoch_time"]
                progress.update()
                if epoch:  # the first is a warm-up
                    times[v].append(seconds)
                    parts[v].append(trainer.kfac.metrics())
        progress.close()
    base = statistics.mean(times["none"])
    rows = []
    for v, label in variants.items():
        mean = statistics.mean(times[v])
        per_part = [statistics.mean(p[f"kfac_{k}_time"] for p in parts[v]) for k in PARTS]
        rows.append([label, f"{mean:.2f}", ratio(mean, base), *(f"{s:.2f}" for s in per_part)])
    print(header("## K-FAC BatchNorm curvature (`benchmarks/bench_kfac_batchnorm.py`)"))
    print(
        f"ResNet-20, batch {args.batch}, {ds.num_train} training images, K-FAC defaults (10/100): "
        f"mean of {args.epochs} interleaved epochs after a warm-up epoch each\n"
    )
    print(table(["BatchNorm", "epoch s", "vs none", *(f"{p} s" for p in PARTS)], rows))


if __name__ == "__main__":
    main()
