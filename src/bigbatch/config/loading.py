"""Configs from TOML files (with ``include``), ``--set`` overrides and stored config.json files."""

from __future__ import annotations

import json
import tomllib
import typing
from pathlib import Path
from typing import Any

from bigbatch.config.checks import suggest
from bigbatch.config.schema import Config
from bigbatch.config.validation import validate
from bigbatch.errors import ConfigError


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field's annotated type; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, e.g. {key}=[71], got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")


# Keys that moved to [runtime]; run directories written before the move still name them here.
MOVED_TO_RUNTIME = {
    "run.output_dir",
    "run.device",
    "run.threads",
    "run.dist_timeout",
    "data.cache_dir",
    "data.download",
    "train.progress",
    "train.channels_last",
    "train.micro_batch_size",
    "train.eval_batch_size",
    "train.checkpoint_every",
}


def _apply(section_obj: Any, section: str, values: dict[str, Any]) -> None:
    hints = typing.get_type_hints(type(section_obj))
    for key, value in values.items():
        if key not in hints:
            if f"{section}.{key}" in MOVED_TO_RUNTIME:
                raise ConfigError(
                    f"config key '{section}.{key}' is now 'runtime.{key}'; set it in [runtime]"
                )
            raise ConfigError(
                f"unknown config key '{section}.{key}'{suggest(key, hints)} "
                f"(valid keys in [{section}]: {', '.join(hints)})"
            )
        setattr(section_obj, key, _coerce(f"{section}.{key}", value, hints[key]))


def _move_legacy_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """A stored config from before [runtime] existed, with those keys moved there."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    runtime = out.setdefault("runtime", {})
    for dotted in MOVED_TO_RUNTIME:
        section, key = dotted.split(".")
        if key in out.get(section, {}):
            runtime.setdefault(key, out[section].pop(key))
    out.get("run", {}).pop("retain_memory", None)  # a CPU allocator switch, since removed
    return out


def config_from_dict(raw: dict[str, Any], stored: bool = False) -> Config:
    """A Config from nested tables; ``stored``: a run's config.json, possibly of an older layout."""
    if stored:
        raw = _move_legacy_keys(raw)
    cfg = Config()
    sections = typing.get_type_hints(Config)
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(
                f"unknown config section '[{section}]'{suggest(section, sections)} "
                f"(valid sections: {', '.join(sections)})"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"config section '[{section}]' must be a table of keys")
        _apply(getattr(cfg, section), section, values)
    if cfg.data.path:
        # Stored resolved, so analysis and --resume find the data from any directory.
        cfg.data.path = str(Path(cfg.data.path).expanduser().absolute())
    return cfg


def read_run_config(run_dir: str | Path) -> Config:
    """The Config a run directory's config.json stores; a clear ConfigError when it is missing
    or is not one bigbatch wrote."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise ConfigError(
            f"'{run_dir}' is not a bigbatch run directory (no config.json); pass the directory of "
            "a run that bigbatch wrote"
        )
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON table")
        return config_from_dict(raw, stored=True)
    except (ValueError, TypeError, AttributeError, OSError) as exc:  # ConfigError is a ValueError
        raise ConfigError(
            f"'{path}' is not a bigbatch run config ({exc}); pass the directory of a run that "
            "bigbatch wrote"
        ) from None


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse ``section.key=value``; the value is read as TOML, or as a bare string."""
    if "=" not in text:
        raise ConfigError(
            f"override '{text}' must look like section.key=value, e.g. optimizer.lr=0.01"
        )
    dotted, raw_value = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key '{dotted}' must be section.key, e.g. optimizer.lr")
    raw_value = raw_value.strip()
    try:
        value = tomllib.loads(f"v = {raw_value}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value
    return parts[0], parts[1], value


def merge_overrides(raw: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for text in overrides:
        section, key, value = parse_override(text)
        merged.setdefault(section, {})
        if not isinstance(merged[section], dict):
            raise ConfigError(f"config section '[{section}]' must be a table of keys")
        merged[section][key] = value
    return merged


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: tables merge key by key, anything else (lists too) is
    replaced."""
    out = dict(base)
    for key, value in over.items():
        both_tables = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = deep_merge(out[key], value) if both_tables else value
    return out


def read_toml(path: str | Path, _including: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A TOML file's tables; ``include = "other.toml"`` (relative to the file) lies beneath them."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"config '{path}' is a directory; pass the path of a TOML file such as "
            "configs/quick.toml"
        )
    if not path.is_file():
        raise ConfigError(
            f"config file '{path}' does not exist; pass the path of a TOML file such as "
            "configs/quick.toml"
        )
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file '{path}' is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file '{path}' is not UTF-8 text (byte {exc.start}); TOML files are UTF-8, "
            "save it in that encoding"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file '{path}' cannot be read: {exc.strerror}") from None
    include = raw.pop("include", None)
    if include is None:
        return raw
    if not isinstance(include, str):
        raise ConfigError(
            f"'include' in '{path}' must be one file name, e.g. include = \"paper.toml\""
        )
    target = (path.parent / include).resolve()
    if target in _including or target == path.resolve():
        raise ConfigError(f"config file '{path}' includes '{include}', which includes it again")
    return deep_merge(read_toml(target, (*_including, path.resolve())), raw)


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    raw = read_toml(path) if path is not None else {}
    cfg = config_from_dict(merge_overrides(raw, overrides))
    validate(cfg)
    return cfg
