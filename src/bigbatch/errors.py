"""Errors users can act on: the CLI prints their message, never a traceback."""


class BigbatchError(Exception):
    """Base class: the message names the problem and the fix."""


class ConfigError(BigbatchError):
    """A config key or value that cannot work."""


class TrainingError(BigbatchError):
    """A run that cannot continue (non-finite loss, incompatible checkpoint)."""
