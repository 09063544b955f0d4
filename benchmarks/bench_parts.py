"""One part of compare_commits.py, measured in this process with whichever bigbatch is importable.

compare_commits.py starts this script once per (source tree, part, round) with PYTHONPATH set to
one tree's src. It uses only APIs present both before and after the redesign (3547a31 and later),
and picks the config keys by feature check: bigbatch.config.RuntimeConfig means the [runtime]
section (runtime.output_dir, runtime.progress, runtime.cache_dir), its absence the older keys
(run.output_dir, train.progress, data.cache_dir). It prints one JSON line: the bigbatch it
imported, which key layout it used, seconds per measured row and its peak resident memory.

Parts:
  sgd        LeNet-5 SGD Trainer epochs (metrics 'epoch_time') at batch 128 and 2048
  kfac       the same with K-FAC at its default intervals
  stats      Conv2dFactors.a_contribution on random NCHW float32 inputs of LeNet-5's two convs
  landscape  evaluate_along over 11 points of one random direction, train and test batches
  resnet20   a ResNet-20 SGD epoch at batch 2048 (--retain-memory: run.retain_memory=true, old only)

Trainer parts run one untimed warm-up epoch, then --epochs timed ones (median).

    PYTHONPATH=/tmp/old/src .venv/bin/python benchmarks/bench_parts.py sgd [--train-examples N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import bigbatch
import bigbatch.config
from bigbatch.config import load_config
from bigbatch.data import load_dataset
from bigbatch.data.batches import BatchLoader, channel_stats
from bigbatch.data.dataset import apply_limits
from bigbatch.models import build_model
from bigbatch.train.trainer import Trainer
from common import DEFAULT_DATA, time_calls

PARTS = ("sgd", "kfac", "stats", "landscape", "resnet20")
# [runtime] arrived with the redesign; before it these keys lived in other sections.
RUNTIME_SECTION = hasattr(bigbatch.config, "RuntimeConfig")


def default_cache_dir() -> str:
    # The same folder under both trees, so that neither decodes the JPEGs again.
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "bigbatch")


def placement_keys(out: str, cache_dir: str) -> list[str]:
    if RUNTIME_SECTION:
        return [
            f"runtime.output_dir={out}",
            "runtime.progress=off",
            f"runtime.cache_dir={cache_dir}",
        ]
    return [f"run.output_dir={out}", "train.progress=off", f"data.cache_dir={cache_dir}"]


def trainer_epochs(args, ds, out: str, batch: int, extra: list[str], epochs: int) -> float:
    """Median 'epoch_time' of ``epochs`` timed epochs after one warm-up epoch."""
    cfg = load_config(
        None,
        [
            f"data.path={args.data}",
            f"train.batch_size={batch}",
            "train.train_eval_examples=0",
            f"run.name=b{batch}",
            f"run.epochs={epochs + 1}",
            *placement_keys(out, args.cache_dir),
            *extra,
        ],
    )
    trainer = Trainer(cfg, dataset=ds)
    trainer.train_epoch(0)
    return statistics.median(trainer.train_epoch(e + 1)["epoch_time"] for e in range(epochs))


def lenet_epochs(args, optimizer: str) -> dict[str, float]:
    ds = load(args, args.train_examples)
    name = "SGD" if optimizer == "sgd" else "K-FAC (defaults)"
    rows = {}
    with tempfile.TemporaryDirectory() as out:
        for batch in (128, 2048):
            batch_ = min(batch, ds.num_train)
            rows[f"LeNet-5 {name} epoch, batch {batch_}"] = trainer_epochs(
                args, ds, out, batch_, [f"optimizer.name={optimizer}"], args.epochs
            )
        if optimizer == "kfac":  # the paper study's large-batch K-FAC runs, its costliest
            batch_ = min(2048, ds.num_train)
            paper_lb = ["kfac.factor_interval=1", "kfac.inverse_interval=10"]
            rows[f"LeNet-5 K-FAC (paper.toml LB: 1/10, stats on 1/4), batch {batch_}"] = (
                trainer_epochs(
                    args,
                    ds,
                    out,
                    batch_,
                    ["optimizer.name=kfac", *paper_lb, "kfac.stats_fraction=0.25"],
                    args.epochs,
                )
            )
    return rows


def conv_statistics(args) -> dict[str, float]:
    from bigbatch.optim.kfac.layers import Conv2dFactors

    torch.manual_seed(0)
    rows = {}
    # LeNet-5's two convolutions with the input sizes they see on 32x32 images.
    for name, (cin, cout, size) in {"conv1": (3, 6, 32), "conv2": (6, 16, 14)}.items():
        factors = Conv2dFactors(name, nn.Conv2d(cin, cout, 5))
        for n in args.stats_examples:
            x = torch.randn(n, cin, size, size)
            with torch.no_grad():
                seconds = time_calls(partial(factors.a_contribution, x), 5, args.min_seconds)
            rows[f"K-FAC A statistics, {name} {cin}->{cout} on {n}x{cin}x{size}x{size}"] = seconds
    return rows


def landscape(args) -> dict[str, float]:
    from bigbatch.analysis.landscape import evaluate_along, linspace, random_direction

    ds = load(args, args.landscape_train, args.landscape_test)
    mean, std = channel_stats(ds.train_images)
    train = list(
        BatchLoader(ds.train_images, ds.train_labels, 128, mean=mean, std=std, shuffle=True)
    )
    torch.manual_seed(0)
    model = build_model("lenet5", ds.channels, ds.image_size, ds.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for x, y in train:  # one epoch from initialization, untimed: weights that have moved
        opt.zero_grad()
        F.cross_entropy(model(x.contiguous()), y).backward()
        opt.step()
    model.eval()
    # NHWC batches made once, as the CLI passes them; data preparation is not the part measured.
    loaders = {
        "train": BatchLoader(
            ds.train_images, ds.train_labels, 128, mean=mean, std=std, shuffle=False
        ),
        "test": BatchLoader(ds.test_images, ds.test_labels, 128, mean=mean, std=std, shuffle=False),
    }
    nhwc = torch.channels_last
    batches = {k: [(x.contiguous(memory_format=nhwc), y) for x, y in v] for k, v in loaders.items()}
    datasets = {k: (lambda b=b: b) for k, b in batches.items()}
    direction = [random_direction(model, 0)]
    points = [(a,) for a in linspace(-0.5, 1.5, 11)]
    # Positional: the old signature has a trailing workers=None that the new one lacks.
    seconds = time_calls(
        lambda: evaluate_along(model, direction, points, datasets), 5, args.min_seconds
    )
    n_train, n_test = ds.num_train, ds.num_test
    return {f"landscape, 11 points, LeNet-5, {n_train} train + {n_test} test": seconds}


def resnet20(args) -> dict[str, float]:
    extra = ["model.name=resnet20", "optimizer.name=sgd"]
    if args.retain_memory:
        if RUNTIME_SECTION:
            raise SystemExit(
                "--retain-memory needs a tree that has run.retain_memory (before 1d23087)"
            )
        extra.append("run.retain_memory=true")
    ds = load(args, args.resnet_examples)
    batch = min(args.resnet_batch, ds.num_train)
    with tempfile.TemporaryDirectory() as out:
        seconds = trainer_epochs(args, ds, out, batch, extra, args.resnet_epochs)
    return {f"ResNet-20 SGD epoch, batch {batch}, {ds.num_train} images": seconds}


def load(args, train: int, test: int = 512):
    ds = load_dataset("auto", args.data, cache_dir=args.cache_dir)
    return apply_limits(ds, train, test)


def peak_rss_mib() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("part", choices=PARTS)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--cache-dir", default=default_cache_dir())
    parser.add_argument("--epochs", type=int, default=2, help="timed LeNet-5 epochs")
    parser.add_argument("--train-examples", type=int, default=16384, help="LeNet-5 epochs")
    parser.add_argument("--stats-examples", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--min-seconds", type=float, default=1.0, help="per timed call site")
    parser.add_argument("--landscape-train", type=int, default=4096)
    parser.add_argument("--landscape-test", type=int, default=1024)
    parser.add_argument("--resnet-examples", type=int, default=4096)
    parser.add_argument("--resnet-batch", type=int, default=2048)
    parser.add_argument("--resnet-epochs", type=int, default=1, help="timed ResNet-20 epochs")
    parser.add_argument("--retain-memory", action="store_true")
    args = parser.parse_args()
    if args.part in ("sgd", "kfac"):
        rows = lenet_epochs(args, args.part)
    elif args.part == "stats":
        rows = conv_statistics(args)
    elif args.part == "landscape":
        rows = landscape(args)
    else:
        rows = resnet20(args)
    report = {
        "bigbatch": str(Path(bigbatch.__file__).resolve().parent),
        "keys": "runtime" if RUNTIME_SECTION else "legacy",
        "rows": rows,
        "peak_rss_mib": peak_rss_mib(),
    }
    print(json.dumps(report))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
