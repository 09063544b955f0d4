"""The directory one run writes: locked while a process trains it, never half-replaced.

A run started with ``--overwrite`` over an existing run is built in a hidden directory beside it,
``.NAME.overwrite-PID``, and swapped in when its first checkpoint is written; if it fails before
that, the hidden directory goes and the old run is untouched. Both directories are locked (an
advisory ``flock`` on their ``.lock`` file, released by the kernel even on SIGKILL), so a second
``train`` or ``reproduce`` of the same run refuses instead of training it concurrently.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import IO

from bigbatch.errors import TrainingError

try:
    import fcntl
except ImportError:  # not on Windows: runs are not locked there
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


class RunLock:
    """An exclusive lock on one run directory, held until ``release``."""

    def __init__(self, run_dir: Path):
        self.file: IO[str] | None = None
        try:
            file = open(run_dir / LOCK_NAME, "a+")
        except OSError as exc:
            raise TrainingError(
                f"cannot use run directory '{run_dir}' ({exc.strerror}); set runtime.output_dir "
                "to a writable directory"
            ) from None
        if fcntl is not None:
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                file.seek(0)
                holder = file.read().strip() or "unknown"
                file.close()
                raise TrainingError(
                    f"run directory '{run_dir}' is being trained by another process (pid "
                    f"{holder}); wait for it to finish, stop it, or choose another run.name"
                ) from None
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        self.file = file

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing drops the flock
            self.file = None


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainingError(
            f"cannot create run directory '{path}' ({exc.strerror}); set runtime.output_dir to a "
            "writable directory"
        ) from None


def _is_locked(path: Path) -> bool:
    try:
        RunLock(path).release()
    except TrainingError:
        return True
    return False


class RunDirectory:
    """``path`` is where the run writes now; ``commit()`` after each checkpoint, ``close()`` at the
    end (or on failure)."""

    def __init__(self, final: Path, replace: bool):
        self.final = final
        self.locks: list[RunLock] = []
        _make_dir(final)
        self.locks.append(RunLock(final))
        self.path = final
        if replace:
            for stale in final.parent.glob(f".{final.name}.overwrite-*"):
                if stale.is_dir() and not _is_locked(stale):
                    shutil.rmtree(stale, ignore_errors=True)  # left by a killed --overwrite
            self.path = final.parent / f".{final.name}.overwrite-{os.getpid()}"
            shutil.rmtree(self.path, ignore_errors=True)
            _make_dir(self.path)
            self.locks.append(RunLock(self.path))

    @property
    def replacing(self) -> bool:
        return self.path != self.final

    def commit(self) -> None:
        """The new run has a checkpoint: it takes the old run's place."""
        if not self.replacing:
            return
        old = self.final.parent / f".{self.final.name}.replaced-{os.getpid()}"
        os.replace(self.final, old)
        os.replace(self.path, self.final)
        self.path = self.final
        shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        if self.replacing:
            shutil.rmtree(self.path, ignore_errors=True)  # failed before its first checkpoint
            self.path = self.final
        for lock in self.locks:
            lock.release()
        self.locks.clear()
