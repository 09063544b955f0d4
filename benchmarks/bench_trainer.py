"""Trainer speed vs a minimal hand-written PyTorch loop, side by side in one process.

Times training epochs (evaluation excluded) of LeNet-5 on CIFAR-10 at batch 128 and 2048 for:
  plain      the shortest correct loop: pre-normalized float tensors, one forward/backward per batch,
             on a textbook LeNet-5 (nn.Conv2d, ReLU, nn.MaxPool2d: what a user would write)
  plain-mb   the same loop with the batch split into micro-batches (gradients identical)
  plain-tuned  plain-mb on bigbatch's LeNet-5 (conv1 + pool as phases, pool before ReLU) with NHWC
             (channels_last) tensors: the same computation as bigbatch's trainer, so
             bigbatch / plain-tuned measures what the trainer's bookkeeping costs
  bigbatch   bigbatch's Trainer (uint8 dataset, per-batch normalization, metrics, progress off)
and prints ratios and page faults per image, then runs "plain" at 2048 once more in a child process
that keeps freed memory (RETAINED_MEMORY), to show what the allocator costs a loop without
micro-batches. Usage:

    .venv/bin/python benchmarks/bench_trainer.py [--data PATH] [--epochs 5] [--train-limit N]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from bigbatch.train.allocator import RETAINED_BYTES
from torch import nn

from bigbatch.config import load_config
from bigbatch.data import load_dataset
from bigbatch.data.batches import channel_stats
from bigbatch.io import read_jsonl
from bigbatch.models import build_model
from bigbatch.train.trainer import CPU_MICRO_BATCH, Trainer

# Environment in which glibc keeps freed memory in the process from the start: blocks up to
# RETAINED_BYTES come from the heap, as with run.retain_memory, and the heap's free top is never given
# back. (Once that top exceeds the trim threshold glibc returns all of it, and ASDL's K-FAC step at batch
# 2048 frees ~1.2 GB at once: with run.retain_memory's 1 GiB it page-faulted 40,000-270,000 times per
# step.) Both settings are needed; either alone leaves most page faults.
NEVER_TRIM = 1 << 36
RETAINED_MEMORY = {
    "MALLOC_MMAP_THRESHOLD_": str(RETAINED_BYTES),
    "MALLOC_TRIM_THRESHOLD_": str(NEVER_TRIM),
}


def page_faults() -> int:
    """Minor page faults of this process so far: pages the kernel handed over (and zero-filled)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def textbook_lenet5(in_channels: int, num_classes: int = 10) -> nn.Module:
    """LeNet-5 as the seed's Table 1 reads, for 32x32 inputs, in the modules a user would reach for."""
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
    images: torch.Tensor,
    labels: torch.Tensor,
    batch: int,
    micro: int,
    seed: int,
    tuned: bool = False,
) -> float:
    torch.manual_seed(seed)
    if tuned:
        model = build_model("lenet5", images.shape[1], tuple(images.shape[2:]), 10)
    else:
        model = textbook_lenet5(images.shape[1])
    fmt = torch.channels_last if tuned else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    perm = torch.randperm(images.shape[0])
    start = time.perf_counter()
    for s in range(0, images.shape[0], batch):
        idx = perm[s : s + batch]
        x, y = images[idx], labels[idx]
        opt.zero_grad(set_to_none=True)
        n = x.shape[0]
        for k in range(0, n, micro):
            xs, ys = x[k : k + micro].contiguous(memory_format=fmt), y[k : k + micro]
            (F.cross_entropy(model(xs), ys) * (xs.shape[0] / n)).backward()
        opt.step()
    return time.perf_counter() - start


def make_trainer(data: str, batch: int, train_limit: int, out: str) -> Trainer:
    cfg = load_config(
        None,
        [
            f"data.path={data}",
            f"train.batch_size={batch}",
            "train.train_eval_examples=0",
            "runtime.progress=off",
            f"runtime.output_dir={out}",
            f"run.name=bench{batch}",
            f"data.train_limit={train_limit}",
            "data.test_limit=1000",
        ],
    )
    return Trainer(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.zip")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-limit", type=int, default=0)
    parser.add_argument(
        "--plain-2048", action="store_true", help=argparse.SUPPRESS
    )  # the child run
    args = parser.parse_args()

    ds = load_dataset(
        "auto", args.data, train_limit=args.train_limit or None, cache_dir=".cache/bigbatch"
    )
    mean, std = channel_stats(ds.train_images)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    images = ((ds.train_images.float() / 255) - m) / s
    n = images.shape[0]
    if args.plain_2048:
        plain_epoch(images, ds.train_labels, 2048, 2048, 0)  # warm-up
        times, faults = [], []
        for e in range(args.epochs):
            before = page_faults()
            times.append(plain_epoch(images, ds.train_labels, 2048, 2048, e + 1))
            faults.append(page_faults() - before)
        print(f"{1e6 * statistics.median(times) / n:.1f} {statistics.median(faults) / n:.1f}")
        return
    print(
        f"LeNet-5 on {ds.name}: {n} training images, {torch.get_num_threads()} threads, micro-batch {CPU_MICRO_BATCH}"
    )

    results: dict[tuple[str, int], float] = {}
    fault_counts: dict[tuple[str, int], float] = {}  # minor page faults per epoch
    with tempfile.TemporaryDirectory() as out:
        for batch in (128, 2048):
            micro = min(CPU_MICRO_BATCH, batch)
            trainer = make_trainer(args.data, batch, args.train_limit, out)
            variants = {
                "plain": lambda e: plain_epoch(images, ds.train_labels, batch, batch, e),
                "plain-mb": lambda e: plain_epoch(images, ds.train_labels, batch, micro, e),
                "plain-tuned": lambda e: plain_epoch(
                    images, ds.train_labels, batch, micro, e, tuned=True
                ),
                "bigbatch": lambda e: trainer.train_epoch(e)["epoch_time"],
            }
            times: dict[str, list[float]] = {name: [] for name in variants}
            faults: dict[str, list[int]] = {name: [] for name in variants}
            for name, run in variants.items():
                run(0)  # warm-up (oneDNN primitives, allocator), not timed
            # Interleave so that machine noise hits every variant alike; keep the median.
            for e in range(args.epochs):
                for name, run in variants.items():
                    before = page_faults()
                    times[name].append(run(e + 1))
                    faults[name].append(page_faults() - before)
            for name, values in times.items():
                results[(name, batch)] = statistics.median(values)
                fault_counts[(name, batch)] = statistics.median(faults[name])

    print("\n| loop | batch | epoch s | us/image | page faults/image |")
    print("|---|---|---|---|---|")
    for (name, batch), t in results.items():
        print(
            f"| {name} | {batch} | {t:.2f} | {1e6 * t / n:.1f} | {fault_counts[(name, batch)] / n:.1f} |"
        )
    print("\nratios (same run):")
    for batch in (128, 2048):
        ours = results[("bigbatch", batch)]
        print(
            f"  batch {batch}: bigbatch / plain-tuned = {ours / results[('plain-tuned', batch)]:.3f}, "
            f"bigbatch / plain = {ours / results[('plain', batch)]:.3f}"
        )
    for name in ("plain", "plain-mb", "plain-tuned", "bigbatch"):
        print(
            f"  {name}: per-image time at 2048 / at 128 = {results[(name, 2048)] / results[(name, 128)]:.3f}"
        )
    retained = subprocess.run(
        [
            sys.executable,
            __file__,
            "--data",
            args.data,
            "--epochs",
            str(args.epochs),
            "--train-limit",
            str(args.train_limit),
            "--plain-2048",
        ],
        env=dict(os.environ, **RETAINED_MEMORY),
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    print(
        f"  plain at 2048 with freed memory retained ({', '.join(f'{k}={v}' for k, v in RETAINED_MEMORY.items())}): "
        f"{retained[0]} us/image, {retained[1]} page faults/image"
    )
    print(
        f"  peak resident memory of a 1-epoch `bigbatch train` at batch 2048: "
        f"{child_run(args.data, ['train.batch_size=2048'])[-1]['max_rss_mib']:.0f} MiB"
    )


def child_run(data: str, overrides: list[str]) -> list[dict]:
    """Metrics rows of a real `bigbatch train` in its own process (this process holds float copies)."""
    with tempfile.TemporaryDirectory() as out:
        sets = [
            f"data.path={data}",
            "run.epochs=1",
            f"runtime.output_dir={out}",
            "run.name=child",
            "runtime.progress=off",
            *overrides,
        ]
        subprocess.run(
            [sys.executable, "-m", "bigbatch", "train", *(a for o in sets for a in ("--set", o))],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return read_jsonl(f"{out}/child/metrics.jsonl")


if __name__ == "__main__":
    main()
