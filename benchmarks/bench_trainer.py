"""bigbatch's Trainer against a textbook hand-written PyTorch loop, side by side in one process.

Times training epochs (evaluation excluded) of LeNet-5 on CIFAR-10 at batch 128 and 2048, each
loop with and without micro-batching:
  plain     the shortest correct loop: pre-normalized float tensors, one forward/backward per
            batch, on an nn.Sequential LeNet-5 (Conv2d, ReLU, MaxPool2d: what a user would write)
  plain-mb  the same loop with each batch split into the micro-batches the Trainer uses (the
            gradient is the whole batch's either way)
  bigbatch     the Trainer with runtime.micro_batch_size set to the batch size (no splitting)
  bigbatch-mb  the Trainer as configured by default (uint8 dataset, per-batch normalization,
               NHWC on the CPU, automatic micro-batches, metrics; progress off)
All four run one warm-up epoch, then --epochs epochs interleaved (median), so that a slow spell of
the machine hits each alike. Ratios are against plain at the same batch size, and bigbatch against
plain with the same micro-batching. Finally a 1-epoch `bigbatch train` at batch 2048 runs in its own
process for its peak resident memory (this process holds a float copy of the images).

    .venv/bin/python benchmarks/bench_trainer.py [--data PATH] [--epochs 5] [--train-limit N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bigbatch.config import default_cache_dir
from bigbatch.data import load_dataset
from bigbatch.data.batches import channel_stats
from bigbatch.io import read_jsonl
from bigbatch.train.trainer import Trainer
from common import DEFAULT_DATA, bar, header, make_trainer, page_faults, ratio, table

BATCHES = (128, 2048)
LOOPS = ("plain", "plain-mb", "bigbatch", "bigbatch-mb")


def textbook_lenet5(in_channels: int, num_classes: int = 10) -> nn.Module:
    """LeNet-5 as the paper's Table 1 reads, for 32x32 inputs, in the modules a user reaches for."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def plain_epoch(
    images: torch.Tensor, labels: torch.Tensor, batch: int, micro: int, seed: int
) -> float:
    torch.manual_seed(seed)
    model = textbook_lenet5(images.shape[1])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    perm = torch.randperm(images.shape[0])
    start = time.perf_counter()
    for s in range(0, images.shape[0], batch):
        idx = perm[s : s + batch]
        x, y = images[idx], labels[idx]
        opt.zero_grad(set_to_none=True)
        n = x.shape[0]
        for k in range(0, n, micro):
            xs, ys = x[k : k + micro], y[k : k + micro]
            (F.cross_entropy(model(xs), ys) * (xs.shape[0] / n)).backward()
        opt.step()
    return time.perf_counter() - start


def epoch_runners(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch: int,
    micro: int,
    whole: Trainer,
    default: Trainer,
) -> dict[str, Callable[[int], float]]:
    """Seconds of one training epoch (its index the argument) of each loop, in LOOPS order."""
    return {
        "plain": lambda e: plain_epoch(images, labels, batch, batch, e),
        "plain-mb": lambda e: plain_epoch(images, labels, batch, micro, e),
        "bigbatch": lambda e: whole.train_epoch(e)["epoch_time"],
        "bigbatch-mb": lambda e: default.train_epoch(e)["epoch_time"],
    }


def child_peak_rss(data: str, train_limit: int, batch: int) -> float:
    """Peak resident MiB of a 1-epoch `bigbatch train` in its own process."""
    with tempfile.TemporaryDirectory() as out:
        sets = [
            f"data.path={data}",
            f"data.train_limit={train_limit}",
            "run.epochs=1",
            f"train.batch_size={batch}",
            f"runtime.output_dir={out}",
            "run.name=child",
            "runtime.progress=off",
        ]
        subprocess.run(
            [sys.executable, "-m", "bigbatch", "train", *(a for o in sets for a in ("--set", o))],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return read_jsonl(f"{out}/child/metrics.jsonl")[-1]["max_rss_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-limit", type=int, default=0, help="0: the whole training set")
    args = parser.parse_args()

    ds = load_dataset(
        "auto", args.data, train_limit=args.train_limit or None, cache_dir=default_cache_dir()
    )
    mean, std = channel_stats(ds.train_images)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    images = ((ds.train_images.float() / 255) - m) / s
    labels = ds.train_labels
    n = images.shape[0]
    batches = [b for b in BATCHES if b <= n]

    results: dict[tuple[str, int], float] = {}
    faults: dict[tuple[str, int], float] = {}  # minor page faults per epoch
    micro_of: dict[int, int] = {}
    progress = bar(len(batches) * 4 * (args.epochs + 1), "epochs")
    with tempfile.TemporaryDirectory() as out:
        for batch in batches:
            default = make_trainer(args.data, ds, batch, out, f"bench{batch}", [])
            whole = make_trainer(
                args.data, ds, batch, out, f"bench{batch}", [f"runtime.micro_batch_size={batch}"]
            )
            micro = micro_of[batch] = default.micro_batch
            loops = epoch_runners(images, labels, batch, micro, whole, default)
            times: dict[str, list[float]] = {name: [] for name in loops}
            counts: dict[str, list[int]] = {name: [] for name in loops}
            for run in loops.values():
                run(0)  # warm-up (oneDNN primitives, first-touch pages), not timed
                progress.update()
            for e in range(args.epochs):
                for name, run in loops.items():
                    before = page_faults()
                    times[name].append(run(e + 1))
                    counts[name].append(page_faults() - before)
                    progress.update()
            for name in loops:
                results[(name, batch)] = statistics.median(times[name])
                faults[(name, batch)] = statistics.median(counts[name])
    progress.close()
    peak = child_peak_rss(args.data, args.train_limit, batches[-1])

    print(header("Trainer vs a textbook loop: LeNet-5 training epochs (evaluation excluded)"))
    micro_text = ", ".join(f"{micro_of[b]} at batch {b}" for b in batches)
    print(
        f"{ds.name}: {n} training images; median of {args.epochs} interleaved epochs after a "
        f"warm-up epoch; the Trainer's micro-batches: {micro_text}\n"
    )
    rows = []
    for (name, batch), t in results.items():
        rows.append(
            [
                name,
                batch,
                micro_of[batch] if name.endswith("-mb") else batch,
                f"{t:.2f}",
                f"{1e6 * t / n:.1f}",
                f"{faults[(name, batch)] / n:.2f}",
                ratio(t, results[("plain", batch)]),
            ]
        )
    columns = ["loop", "batch", "micro-batch", "epoch s", "us/image", "page faults/image"]
    print(table([*columns, "vs plain"], rows))
    print("\nLike for like, bigbatch / plain (same batch, same micro-batching):\n")
    print(
        table(
            ["batch", "whole batches", "micro-batches"],
            [
                [
                    b,
                    ratio(results[("bigbatch", b)], results[("plain", b)]),
                    ratio(results[("bigbatch-mb", b)], results[("plain-mb", b)]),
                ]
                for b in batches
            ],
        )
    )
    if len(batches) == 2:
        small, big = batches
        print(f"\nTime per image at batch {big} against batch {small}, per loop:\n")
        print(
            table(
                ["loop", f"{big} / {small}"],
                [[name, ratio(results[(name, big)], results[(name, small)])] for name in LOOPS],
            )
        )
    print(
        f"\nPeak resident memory, 1-epoch `bigbatch train` at batch {batches[-1]}: {peak:.0f} MiB"
    )


if __name__ == "__main__":
    main()
