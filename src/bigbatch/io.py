"""Atomic files and JSONL: everything bigbatch writes goes to a temporary file that is then renamed.

A crash (even SIGKILL) at any moment leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

from bigbatch.errors import BigbatchError


def _file_mode() -> int:
    """What open() would give a new file under the current umask (mkstemp's 0600 would hide
    results)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


STORAGE_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES}


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """A file opened for writing that appears at ``path`` only when the block ends without error."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise WriteError(path, exc) from None
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        # Storage errors only: an OSError of the caller's own (a failed download) stays its own.
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRORS:
            raise WriteError(path, exc) from None
        raise


class WriteError(BigbatchError):
    """A file could not be written (disk full, read-only, not a directory); the old one is kept."""

    def __init__(self, path: Path, exc: OSError):
        reason = exc.strerror or str(exc)
        kept = "its previous version is intact" if path.exists() else "nothing was written there"
        super().__init__(
            f"could not write '{path}' ({reason}); {kept}. Free disk space or choose a writable "
            "runtime.output_dir, then run again (with --resume to continue a run)"
        )


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    # Serialized in memory first: torch.save turns a failed write (disk full) into an opaque
    # RuntimeError, a plain write keeps the OSError that says what happened.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_file(path, "wb") as f:
        f.write(buffer.getbuffer())


def _finite_row(row: dict[str, Any]) -> dict[str, Any]:
    """The row with non-finite numbers as null, named in a "nonfinite" list (JSON has no NaN)."""
    bad = sorted(k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v))
    if not bad:
        return row
    return {**{k: None if k in bad else v for k, v in row.items()}, "nonfinite": bad}


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    lines = (json.dumps(_finite_row(r), sort_keys=True, allow_nan=False) + "\n" for r in rows)
    atomic_write_text(path, "".join(lines))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file; [] when it does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise BigbatchError(
                    f"metrics file '{path}' line {i} is not valid JSON (damaged); the run's "
                    "checkpoint holds every row up to its epoch, so `bigbatch train CONFIG "
                    "--resume` with the run's config rewrites the file"
                ) from None
    return rows
