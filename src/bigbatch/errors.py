"""Errors users can act on: the CLI prints their message, never a traceback."""

from __future__ import annotations


class BigbatchError(Exception):
    """Base class: the message names the problem and the fix."""


class ConfigError(BigbatchError):
    """A config key or value that cannot work."""


class TrainingError(BigbatchError):
    """A run that cannot continue (non-finite loss, incompatible checkpoint)."""


class CollectiveError(TrainingError):
    """A torch.distributed collective failed: another rank died or hung; the process group is broken."""


def collective_error(what: str, rank: int, timeout_s: float | None, exc: BaseException) -> CollectiveError:
    """The error for a torch.distributed collective that failed because another rank died or hung."""
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    limit = f"timeout {timeout_s:g}s, run.dist_timeout" if timeout_s is not None else "see run.dist_timeout"
    return CollectiveError(
        f"{what} failed on rank {rank}: {type(exc).__name__}: {first_line}. Another rank died or hung ({limit}); "
        "restart the whole job with --resume to continue from the last checkpoint"
    )
