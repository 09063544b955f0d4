"""The three helpers every config check uses: each failure names the key and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from bigbatch.errors import ConfigError


def suggest(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {message}")


def choice(value: str, key: str, options: tuple[str, ...]) -> None:
    require(
        value in options,
        key,
        f"is '{value}'{suggest(value, options)}; choose one of: {', '.join(options)}",
    )
