"""What BatchNorm curvature (kfac.batchnorm = "unit") costs in ResNet-20 K-FAC training steps.

Two ResNet-20s (the same initialization), each trained by SGD + K-FAC at its default intervals,
one with the 2x2 BatchNorm blocks and one without ("none": BatchNorm keeps its raw gradient), on
the same CIFAR-10 batches in channels_last (as the Trainer runs on the CPU). They alternate in
blocks of factor_interval steps (one statistics step and the plain steps after it, the mix of an
epoch), the order swapped every block, after a warm-up block each that holds the first
eigendecomposition (later ones, every 100 steps, are not in the measured blocks: that makes
BatchNorm's share look larger, not smaller). Reported: mean seconds per step and the ratio.

    .venv/bin/python benchmarks/bench_kfac_batchnorm.py [--data PATH] [--blocks 6] [--batch 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bigbatch.config import KFACConfig
from bigbatch.data import load_dataset
from bigbatch.models import build_model
from bigbatch.optim.kfac import KFACPreconditioner
from common import DEFAULT_DATA, bar, header, ratio, table

VARIANTS = {"unit": "2x2 blocks (unit)", "none": "raw gradient (none)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--blocks", type=int, default=6, help="measured blocks per variant")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    interval = KFACConfig().factor_interval
    n = args.batch * interval * (args.blocks + 1)
    ds = load_dataset("auto", args.data, train_limit=n, test_limit=100)
    images = (ds.train_images.float() / 255).contiguous(memory_format=torch.channels_last)
    labels = ds.train_labels
    runs = {}
    for variant in VARIANTS:
        torch.manual_seed(0)
        model = build_model("resnet20", ds.channels, ds.image_size, ds.num_classes)
        model = model.to(memory_format=torch.channels_last)
        kfac = KFACPreconditioner(model, batchnorm=variant)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        runs[variant] = (model, kfac, optimizer)
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    progress = bar(2 * (args.blocks + 1), "blocks")
    for block in range(args.blocks + 1):
        order = list(VARIANTS) if block % 2 == 0 else list(reversed(VARIANTS))
        for variant in order:
            model, kfac, optimizer = runs[variant]
            start = time.perf_counter()
            for step in range(interval):
                rows = slice((block * interval + step) * args.batch, None)
                x, y = images[rows][: args.batch], labels[rows][: args.batch]
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                kfac.step(lr=0.05)
                optimizer.step()
            if block:  # the first block is a warm-up
                seconds[variant].append((time.perf_counter() - start) / interval)
            progress.update()
    progress.close()
    base = statistics.mean(seconds["none"])
    rows = []
    for variant, label in VARIANTS.items():
        mean = statistics.mean(seconds[variant])
        spread = f"{min(seconds[variant]):.3f}-{max(seconds[variant]):.3f}"
        rows.append([label, f"{mean:.3f}", spread, ratio(mean, base)])
    print(header("## K-FAC BatchNorm curvature (`benchmarks/bench_kfac_batchnorm.py`)"))
    print(
        f"ResNet-20, batch {args.batch}, K-FAC defaults (statistics every {interval} steps): "
        f"{args.blocks} interleaved blocks of {interval} steps per variant after a warm-up block\n"
    )
    print(table(["BatchNorm", "s per step", "block range", "vs none"], rows))


if __name__ == "__main__":
    main()
