"""Checkpoints: written atomically (bigbatch.io), loaded so that a file from anyone runs no code."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from bigbatch.errors import TrainingError

CHECKPOINT_NAME = "checkpoint.pt"
# What each reader needs: analysis only the weights and the epoch, a resume everything.
WEIGHTS = {"model": dict, "epoch": int}
TRAINING_STATE = {
    **WEIGHTS,
    "step": int,
    "metrics": list,
    "optimizer": dict,
    "rng": dict,
    "config": dict,
    "train_time": float,
    "wall_time": float,
}


def load_checkpoint(path: str | Path, require: dict[str, type] = WEIGHTS) -> dict[str, Any]:
    """The checkpoint at ``path``, refused with a message unless it holds ``require``'s keys."""
    return parse_checkpoint(read_checkpoint(Path(path)), Path(path), require)


def read_checkpoint(path: Path) -> bytes:
    if not path.is_file():
        raise TrainingError(f"no checkpoint at '{path}'; train without --resume to start the run")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TrainingError(f"checkpoint '{path}' cannot be read ({exc.strerror})") from None


def parse_checkpoint(data: bytes, path: Path, require: dict[str, type] = WEIGHTS) -> dict[str, Any]:
    """The checkpoint in ``data`` (read from ``path``), checked to hold ``require``'s keys."""
    state = _load(data, path)
    wrong = (
        sorted(require)
        if not isinstance(state, dict)
        else sorted(k for k, kind in require.items() if not isinstance(state.get(k), kind))
    )
    if wrong:
        raise TrainingError(
            f"checkpoint '{path}' is not a bigbatch checkpoint (missing or wrong: "
            f"{', '.join(wrong)}); it may be another program's file or from an incompatible "
            "version. Point at a bigbatch run directory, or delete it to restart the run"
        )
    return state


def _load(data: bytes, path: Path) -> Any:
    try:
        # weights_only: unpickling may build tensors and plain containers only, so a checkpoint from
        # someone else cannot run code here.
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else "refused"
        raise TrainingError(
            f"checkpoint '{path}' holds objects other than tensors and plain containers, which "
            "could "
            f"run code when loaded ({first_line}); bigbatch does not open it. Use a checkpoint "
            "written by this version of bigbatch, or delete it to restart the run from scratch"
        ) from None
    except Exception as exc:  # torch raises many types for a damaged file
        raise TrainingError(
            f"checkpoint '{path}' cannot be read ({type(exc).__name__}: {exc}); "
            "delete it to restart the run from scratch"
        ) from None
