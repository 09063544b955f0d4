"""Atomic files: checkpoints, metrics and JSON are written to a temporary file, then renamed.

A crash (even SIGKILL) at any moment leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from bigbatch.errors import TrainingError

CHECKPOINT_NAME = "checkpoint.pt"


def _file_mode() -> int:
    """What open() would give a new file under the current umask (mkstemp's 0600 would hide results)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write(Path(path), lambda f: f.write(text), "w")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    _atomic_write(Path(path), lambda f: torch.save(obj, f), "wb")


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise TrainingError(f"metrics file '{path}' line {i} is not valid JSON; delete the run directory to start over") from None
    return rows


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"no checkpoint at '{path}'; train without --resume to start the run")
    try:
        # weights_only: unpickling may build tensors and plain containers only, so a checkpoint from
        # someone else cannot run code here.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise TrainingError(
            f"checkpoint '{path}' holds objects other than tensors and plain containers, which could "
            f"run code when loaded ({str(exc).splitlines()[0] if str(exc) else 'refused'}); bigbatch "
            "does not open it. Use a checkpoint written by this version of bigbatch, or delete it to "
            "restart the run from scratch"
        ) from None
    except Exception as exc:  # torch raises many types for a damaged file
        raise TrainingError(
            f"checkpoint '{path}' cannot be read ({type(exc).__name__}: {exc}); "
            "delete it to restart the run from scratch"
        ) from None
