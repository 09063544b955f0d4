"""What a run is made of beside the model: its dataset, RNG states, the resume and rank checks,
resident memory."""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigbatch.config import Config
from bigbatch.data import ImageDataset, load_dataset
from bigbatch.errors import TrainingError

# A run may be extended: its length is the one experiment key --resume does not compare.
EXTENDABLE = "run.epochs"


def _flatten_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, section in cfg.items() for k, v in section.items()}


def config_changes(
    saved: dict[str, Any], current: dict[str, Any], ignore: tuple[str, ...] = ()
) -> dict[str, list[Any]]:
    """{key: [old, new]} for every dotted key whose value differs, except those in ``ignore``."""
    a, b = _flatten_config(saved), _flatten_config(current)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in ignore)
    return {k: [a.get(k), b.get(k)] for k in keys}


def check_compatible(
    saved: dict[str, Any], current: dict[str, Any], path: Path, allowed: tuple[str, ...] = ()
) -> dict[str, list[Any]]:
    """The allowed changes as {key: [old, new]}; any other experiment-key change is refused."""
    unknown = sorted(set(allowed) - set(_flatten_config(current)))
    if unknown:
        raise TrainingError(
            f"--allow-change {', '.join(unknown)}: not an experiment config key (runtime keys "
            "may change on every resume without it); e.g. --allow-change optimizer.lr"
        )
    changed = config_changes(saved, current, ignore=(EXTENDABLE,))
    refused = [k for k in changed if k not in allowed]
    if refused:
        details = ", ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
        raise TrainingError(
            f"cannot resume '{path}': the config changed ({details}); resume with the original "
            f"config, allow the change explicitly with --allow-change {refused[0]}, or use a new "
            "run.name"
        )
    return {k: v for k, v in changed.items() if k in allowed}


def experiment_fingerprint(cfg: Config) -> int:
    """A hash of the experiment keys that ranks compare at start; data.path may differ between
    machines."""
    experiment = {**cfg.experiment(), "data": {**cfg.experiment()["data"], "path": ""}}
    digest = hashlib.sha256(json.dumps(experiment, sort_keys=True).encode()).hexdigest()
    return int(digest[:15], 16)


def load_config_dataset(cfg: Config) -> ImageDataset:
    """The dataset a run's [data] section names."""
    return load_dataset(
        cfg.data.format,
        cfg.data.path,
        download=cfg.runtime.download,
        train_limit=cfg.data.train_limit or None,
        test_limit=cfg.data.test_limit or None,
        cache_dir=cfg.runtime.cache_dir or None,
    )


def rng_state() -> dict[str, Any]:
    # Tensors and plain containers only: checkpoints load with weights_only=True.
    numpy_raw: Any = np.random.get_state()
    kind, keys, pos, has_gauss, cached = numpy_raw
    numpy_state = {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])


def fix_cublas_workspace() -> None:
    """cuBLAS needs a fixed workspace for reproducible GEMMs; it reads this when CUDA initializes,
    so call it before anything touches the GPU (joining an nccl group does)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def set_determinism(deterministic: bool, device: torch.device) -> None:
    """Deterministic kernels (or, off, cuDNN's autotuner); the CPU kernels bigbatch uses already
    are, so only CUDA changes."""
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    if device.type != "cuda":
        return
    if deterministic:
        fix_cublas_workspace()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if not deterministic:
        warnings.warn(
            "runtime.deterministic=false: autotuned GPU kernels, so a resumed run is not "
            "bit-identical to an uninterrupted one",
            stacklevel=2,
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_rss_mib() -> float:
    """Peak resident memory of this process; VmHWM, unlike ru_maxrss, does not count a parent's
    pages before exec."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
