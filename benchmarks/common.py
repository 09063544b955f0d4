"""Helpers shared by the benchmark scripts: header line, Markdown tables, timing, progress bars.

Imports neither bigbatch nor anything of this checkout's src, so that bench_parts.py can use it
under either source tree.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
# The shared CIFAR-10 next to the checkout; the package itself has no machine default.
DEFAULT_DATA = os.path.normpath(REPO_ROOT / "../shared/data/cifar10-jpeg.zip")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    # The cores this process may use, which a container or taskset can make fewer than the host's.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def header(title: str) -> str:
    """The line every table starts from: what ran, on what hardware and software, and when."""
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        f"{title}\n\n{cpu_model()}, {cores()} cores, {torch.get_num_threads()} torch threads; "
        f"torch {torch.__version__}, Python {platform.python_version()}; {now}\n"
    )


def table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}x" if baseline > 0 else "n/a"


def page_faults() -> int:
    """Minor page faults of this process so far: pages the kernel handed over (and zero-filled)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def time_calls(fn: Callable[[], object], min_calls: int = 5, min_seconds: float = 1.0) -> float:
    """Median seconds per call after one untimed call, over at least min_calls and min_seconds."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def make_trainer(data: str, ds: Any, batch: int, out: str, name: str, extra: list[str]) -> Any:
    """A bigbatch Trainer on LeNet-5 for timing epochs: no clean-accuracy pass, no progress bar."""
    from bigbatch.config import load_config  # here: this module also serves the old tree
    from bigbatch.train.trainer import Trainer

    sets = [
        f"data.path={data}",
        f"train.batch_size={batch}",
        "train.train_eval_examples=0",
        "runtime.progress=off",
        f"runtime.output_dir={out}",
        f"run.name={name}",
        *extra,
    ]
    return Trainer(load_config(None, sets), dataset=ds)
