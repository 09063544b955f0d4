"""Typed run configuration: dataclass defaults, TOML loading, ``--set`` overrides, validation.

Every value has a default, so an empty config is a valid run. Unknown keys and bad values are
rejected before any work with a :class:`ConfigError` that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigbatch.errors import ConfigError

# One tuple per set of choices: the config, the CLI, the data loader and K-FAC all read these.
DATA_FORMATS = ("auto", "cifar10", "image-folder", "idx", "fashion-mnist", "synthetic")
MODELS = ("lenet5", "resnet20", "resnet32", "resnet44", "resnet56")
OPTIMIZERS = ("sgd", "kfac")
FISHER_TYPES = ("empirical", "mc")
INVERSE_METHODS = ("eigen", "inverse")
SWITCH_MODES = ("auto", "on", "off")  # runtime.progress and runtime.channels_last
MAX_RUN_NAME = 128


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    epochs: int = 10


@dataclass
class DataConfig:
    format: str = "auto"
    # Empty: CIFAR-10 in runtime.cache_dir (downloaded there with runtime.download = true).
    path: str = ""
    # 0 means the whole split; a positive value takes a class-balanced subset.
    train_limit: int = 0
    test_limit: int = 0


@dataclass
class ModelConfig:
    name: str = "lenet5"


@dataclass
class AugmentConfig:
    crop_flip: bool = False
    crop_padding: int = 4
    # 0 disables each of these.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    label_smoothing: float = 0.0


@dataclass
class TrainConfig:
    batch_size: int = 128
    # Clean (no augmentation) accuracy on this many training examples each epoch; 0 disables.
    train_eval_examples: int = 10000
    drop_last: bool = False


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False


@dataclass
class ScheduleConfig:
    # 1-based epochs from which the LR is multiplied by decay_factor (the paper: [71], 0.5).
    decay_epochs: list[int] = field(default_factory=list)
    decay_factor: float = 0.5
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.1
    # Linear scaling rule (Goyal et al. 2017): lr * batch_size / base_batch_size.
    linear_scaling: bool = False
    base_batch_size: int = 128


@dataclass
class KFACConfig:
    """K-FAC's options; KFACPreconditioner takes them as keywords and validates them here too."""

    damping: float = 1e-2
    factor_decay: float = 0.95
    factor_interval: int = 10
    inverse_interval: int = 100
    kl_clip: float = 1e-3
    fisher_type: str = "empirical"
    pi_damping: bool = False
    inverse_method: str = "eigen"
    # Statistics from the first stats_fraction of every micro-batch (a subsample of each batch).
    stats_fraction: float = 1.0
    skip_layers: list[str] = field(default_factory=list)
    # Data-parallel runs all-reduce only each factor's upper triangle (about half the bytes).
    upper_triangle: bool = True

    def validate(self, section: str = "kfac") -> None:
        def key(name: str) -> str:
            return f"{section}.{name}" if section else name

        _require(self.damping > 0, key("damping"), f"must be > 0, got {self.damping}")
        _require(0 <= self.factor_decay < 1, key("factor_decay"), "must be in [0, 1)")
        _require(self.factor_interval >= 1, key("factor_interval"), "must be >= 1")
        _require(self.inverse_interval >= 1, key("inverse_interval"), "must be >= 1")
        _require(self.kl_clip >= 0, key("kl_clip"), "must be >= 0 (0 disables KL-clipping)")
        _choice(self.fisher_type, key("fisher_type"), FISHER_TYPES)
        _choice(self.inverse_method, key("inverse_method"), INVERSE_METHODS)
        _require(0 < self.stats_fraction <= 1, key("stats_fraction"), "must be in (0, 1]")


def default_cache_dir() -> str:
    """The user's cache folder for datasets and decoded tensors (XDG), not the working directory."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "bigbatch")


@dataclass
class RuntimeConfig:
    """How and where a run executes; none of it changes the results, so --resume may change it."""

    device: str = "auto"
    # 0 keeps torch's default thread count.
    threads: int = 0
    # Seconds a rank waits in a collective before giving up on a dead or hung peer.
    dist_timeout: float = 300.0
    progress: str = "auto"
    output_dir: str = "runs"
    cache_dir: str = field(default_factory=default_cache_dir)
    # Fetch CIFAR-10 into data.path (or the cache) when no local copy exists.
    download: bool = False
    # NHWC activations; "auto": on for the CPU, whose convolutions run faster on them.
    channels_last: str = "auto"
    # 0 picks automatically: 256-example micro-batches on CPU for models without BatchNorm, whose
    # buffers the allocator reuses; the gradient is the whole batch's either way.
    micro_batch_size: int = 0
    eval_batch_size: int = 256
    checkpoint_every: int = 1


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    kfac: KFACConfig = field(default_factory=KFACConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def experiment(self) -> dict[str, Any]:
        """Every key that can change a run's results: what --resume compares."""
        return {k: v for k, v in self.to_dict().items() if k != "runtime"}

    def run_dir(self) -> Path:
        return Path(self.runtime.output_dir) / self.run.name


def _suggest(name: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


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
                f"unknown config key '{section}.{key}'{_suggest(key, hints)} "
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
                f"unknown config section '[{section}]'{_suggest(section, sections)} "
                f"(valid sections: {', '.join(sections)})"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"config section '[{section}]' must be a table of keys")
        _apply(getattr(cfg, section), section, values)
    return cfg


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


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {message}")


def _choice(value: str, key: str, options: tuple[str, ...]) -> None:
    _require(
        value in options,
        key,
        f"is '{value}'{_suggest(value, options)}; choose one of: {', '.join(options)}",
    )


def _check_run_name(name: str) -> None:
    # The name becomes a directory under runtime.output_dir and must stay inside it.
    _require(
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and len(name) <= MAX_RUN_NAME,
        "run.name",
        f"is {name!r}; use a plain directory name (no '/', not '.' or '..', at most "
        f"{MAX_RUN_NAME} characters)",
    )


def validate(cfg: Config) -> None:
    """Reject values that cannot work; checks needing the dataset live in validate_against_data."""
    _check_run_name(cfg.run.name)
    _require(cfg.run.epochs >= 1, "run.epochs", f"must be >= 1, got {cfg.run.epochs}")
    _choice(cfg.data.format, "data.format", DATA_FORMATS)
    _require(
        cfg.data.train_limit >= 0, "data.train_limit", "must be >= 0 (0: the whole training set)"
    )
    _require(cfg.data.test_limit >= 0, "data.test_limit", "must be >= 0 (0: the whole test set)")
    _choice(cfg.model.name, "model.name", MODELS)
    _require(cfg.augment.crop_padding >= 0, "augment.crop_padding", "must be >= 0")
    for key in ("mixup_alpha", "cutmix_alpha"):
        value = getattr(cfg.augment, key)
        _require(
            value >= 0, f"augment.{key}", f"must be > 0 to enable or 0 to disable, got {value}"
        )
    _require(
        not (cfg.augment.mixup_alpha > 0 and cfg.augment.cutmix_alpha > 0),
        "augment.cutmix_alpha",
        "and augment.mixup_alpha cannot both be enabled; set one of them to 0",
    )
    _require(0 <= cfg.augment.label_smoothing < 1, "augment.label_smoothing", "must be in [0, 1)")
    _require(
        cfg.train.batch_size >= 1, "train.batch_size", f"must be >= 1, got {cfg.train.batch_size}"
    )
    _require(cfg.train.train_eval_examples >= 0, "train.train_eval_examples", "must be >= 0")
    _choice(cfg.optimizer.name, "optimizer.name", OPTIMIZERS)
    _require(cfg.optimizer.lr > 0, "optimizer.lr", f"must be > 0, got {cfg.optimizer.lr}")
    _require(0 <= cfg.optimizer.momentum < 1, "optimizer.momentum", "must be in [0, 1)")
    _require(cfg.optimizer.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    _require(
        not cfg.optimizer.nesterov or cfg.optimizer.momentum > 0,
        "optimizer.nesterov",
        "needs optimizer.momentum > 0",
    )
    s = cfg.schedule
    _require(0 < s.decay_factor <= 1, "schedule.decay_factor", "must be in (0, 1]")
    _require(all(e >= 1 for e in s.decay_epochs), "schedule.decay_epochs", "must hold epochs >= 1")
    _require(s.warmup_epochs >= 0, "schedule.warmup_epochs", "must be >= 0")
    _require(0 < s.warmup_start_factor <= 1, "schedule.warmup_start_factor", "must be in (0, 1]")
    _require(s.base_batch_size >= 1, "schedule.base_batch_size", "must be >= 1")
    cfg.kfac.validate()
    r = cfg.runtime
    _require(r.threads >= 0, "runtime.threads", "must be >= 0 (0 keeps torch's default)")
    _require(r.dist_timeout > 0, "runtime.dist_timeout", "must be > 0 seconds")
    _choice(r.progress, "runtime.progress", SWITCH_MODES)
    _choice(r.channels_last, "runtime.channels_last", SWITCH_MODES)
    _require(
        r.micro_batch_size >= 0, "runtime.micro_batch_size", "must be >= 0 (0 picks automatically)"
    )
    _require(r.eval_batch_size >= 1, "runtime.eval_batch_size", "must be >= 1")
    _require(r.checkpoint_every >= 1, "runtime.checkpoint_every", "must be >= 1")


def validate_against_data(cfg: Config, num_train: int, num_test: int, world_size: int = 1) -> None:
    """Checks that need the dataset: an impossible batch size is named before training starts."""
    _require(
        cfg.train.batch_size <= num_train,
        "train.batch_size",
        f"is {cfg.train.batch_size} but the training set has only {num_train} examples; "
        "lower train.batch_size or raise data.train_limit",
    )
    _require(
        cfg.train.batch_size >= world_size,
        "train.batch_size",
        f"is {cfg.train.batch_size}, smaller than the {world_size} ranks sharing each batch",
    )
    _require(num_test >= 1, "data.test_limit", "leaves an empty test set")
