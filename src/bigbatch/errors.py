"""Errors users can act on: the CLI prints their message, never a traceback."""

from __future__ import annotations


class BigbatchError(Exception):
    """Base class: the message names the problem and the fix."""


class ConfigError(BigbatchError, ValueError):
    """A config key or value that cannot work (a ValueError too, for library callers)."""


class TrainingError(BigbatchError):
    """A run that cannot continue (non-finite loss, incompatible checkpoint)."""


class DivergedError(TrainingError):
    """A run's loss became non-finite or too large: a result of its settings (a sweep's too-high
    learning rate), not a fault of the machine."""


class CollectiveError(TrainingError):
    """A torch.distributed collective failed: another rank died or hung; the process group is
    broken."""
