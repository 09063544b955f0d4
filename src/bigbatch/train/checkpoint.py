"""Checkpoints: written atomically (bigbatch.io), loaded so that a file from anyone runs no code."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from bigbatch.errors import TrainingError

CHECKPOINT_NAME = "checkpoint.pt"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"no checkpoint at '{path}'; train without --resume to start the run")
    try:
        # weights_only: unpickling may build tensors and plain containers only, so a checkpoint from
        # someone else cannot run code here.
        return torch.load(path, map_location="cpu", weights_only=True)
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
