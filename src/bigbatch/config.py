"""Typed run configuration: dataclass defaults, TOML loading, ``--set`` overrides, validation.

Every value has a default, so an empty config is a valid run. Unknown keys and bad values are
rejected before any work with a :class:`ConfigError` that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigbatch.errors import ConfigError

DATA_FORMATS = ("auto", "cifar10", "image-folder", "idx", "fashion-mnist", "synthetic")
MODELS = ("lenet5", "resnet20", "resnet32", "resnet44", "resnet56")
OPTIMIZERS = ("sgd", "kfac")
FISHER_TYPES = ("empirical", "mc")
INVERSE_METHODS = ("eigen", "inverse")
PROGRESS_MODES = ("auto", "on", "off")  # also the choices of train.channels_last


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    epochs: int = 10
    output_dir: str = "runs"
    device: str = "auto"
    # 0 keeps torch's default thread count.
    threads: int = 0
    # Seconds a rank waits in a collective before giving up on a dead or hung peer.
    dist_timeout: float = 300.0


@dataclass
class DataConfig:
    format: str = "auto"
    path: str = "../shared/data/cifar10-jpeg.zip"
    download: bool = False
    # 0 means the whole split; a positive value takes a class-balanced subset.
    train_limit: int = 0
    test_limit: int = 0
    cache_dir: str = ".cache/bigbatch"


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
    # 0 picks automatically: 256-example micro-batches on CPU for models without BatchNorm, whose buffers
    # the allocator reuses (a whole 2048-example batch page-faults fresh memory every step).
    micro_batch_size: int = 0
    # Evaluation batches stay small on CPU: LeNet-5's per-epoch evaluation (20,000 images, one
    # thread) takes 0.41 s at 256 against 0.48 s at 1000.
    eval_batch_size: int = 256
    # Clean (no augmentation) accuracy on this many training examples each epoch; 0 disables.
    train_eval_examples: int = 10000
    drop_last: bool = False
    checkpoint_every: int = 1
    progress: str = "auto"
    # NHWC activations: "auto" turns them on for the CPU, where oneDNN convolutions are faster on them.
    channels_last: str = "auto"


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False


@dataclass
class ScheduleConfig:
    # 1-based epochs from which the LR is multiplied by decay_factor (the seed: [71], 0.5).
    decay_epochs: list[int] = field(default_factory=list)
    decay_factor: float = 0.5
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.1
    # Linear scaling rule (Goyal et al. 2017): lr * batch_size / base_batch_size.
    linear_scaling: bool = False
    base_batch_size: int = 128


@dataclass
class KFACConfig:
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


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


def _apply(section_obj: Any, section: str, values: dict[str, Any]) -> None:
    hints = typing.get_type_hints(type(section_obj))
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(
                f"unknown config key '{section}.{key}'{_suggest(key, hints)} "
                f"(valid keys in [{section}]: {', '.join(hints)})"
            )
        setattr(section_obj, key, _coerce(f"{section}.{key}", value, hints[key]))


def config_from_dict(raw: dict[str, Any]) -> Config:
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
        raise ConfigError(f"override '{text}' must look like section.key=value, e.g. optimizer.lr=0.01")
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


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass the path of a TOML file such as configs/quick.toml")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file '{path}' is not valid TOML: {exc}") from None


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    raw = read_toml(path) if path is not None else {}
    cfg = config_from_dict(merge_overrides(raw, overrides))
    validate(cfg)
    return cfg


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {message}")


def _choice(value: str, key: str, options: tuple[str, ...]) -> None:
    _require(value in options, key, f"is '{value}'{_suggest(value, options)}; choose one of: {', '.join(options)}")


def validate(cfg: Config) -> None:
    """Reject values that cannot work; checks needing the dataset size live in :func:`validate_against_data`."""
    _require(cfg.run.epochs >= 1, "run.epochs", f"must be >= 1, got {cfg.run.epochs}")
    _require(cfg.run.threads >= 0, "run.threads", "must be >= 0 (0 keeps torch's default)")
    _require(cfg.run.dist_timeout > 0, "run.dist_timeout", "must be > 0 seconds")
    _require(bool(cfg.run.name) and "/" not in cfg.run.name, "run.name", "must be a non-empty name without '/'")
    _choice(cfg.data.format, "data.format", DATA_FORMATS)
    _require(cfg.data.train_limit >= 0, "data.train_limit", "must be >= 0 (0 means the whole training set)")
    _require(cfg.data.test_limit >= 0, "data.test_limit", "must be >= 0 (0 means the whole test set)")
    _choice(cfg.model.name, "model.name", MODELS)
    _require(cfg.augment.crop_padding >= 0, "augment.crop_padding", "must be >= 0")
    for key in ("mixup_alpha", "cutmix_alpha"):
        value = getattr(cfg.augment, key)
        _require(value >= 0, f"augment.{key}", f"must be > 0 to enable or 0 to disable, got {value}")
    _require(
        not (cfg.augment.mixup_alpha > 0 and cfg.augment.cutmix_alpha > 0),
        "augment.cutmix_alpha",
        "and augment.mixup_alpha cannot both be enabled; set one of them to 0",
    )
    _require(0 <= cfg.augment.label_smoothing < 1, "augment.label_smoothing", "must be in [0, 1)")
    _require(cfg.train.batch_size >= 1, "train.batch_size", f"must be >= 1, got {cfg.train.batch_size}")
    _require(cfg.train.micro_batch_size >= 0, "train.micro_batch_size", "must be >= 0 (0 picks automatically)")
    _require(cfg.train.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
    _require(cfg.train.train_eval_examples >= 0, "train.train_eval_examples", "must be >= 0")
    _require(cfg.train.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
    _choice(cfg.train.progress, "train.progress", PROGRESS_MODES)
    _choice(cfg.train.channels_last, "train.channels_last", PROGRESS_MODES)
    _choice(cfg.optimizer.name, "optimizer.name", OPTIMIZERS)
    _require(cfg.optimizer.lr > 0, "optimizer.lr", f"must be > 0, got {cfg.optimizer.lr}")
    _require(0 <= cfg.optimizer.momentum < 1, "optimizer.momentum", "must be in [0, 1)")
    _require(cfg.optimizer.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    _require(
        not cfg.optimizer.nesterov or cfg.optimizer.momentum > 0,
        "optimizer.nesterov",
        "needs optimizer.momentum > 0",
    )
    _require(0 < cfg.schedule.decay_factor <= 1, "schedule.decay_factor", "must be in (0, 1]")
    _require(all(e >= 1 for e in cfg.schedule.decay_epochs), "schedule.decay_epochs", "must hold 1-based epochs >= 1")
    _require(cfg.schedule.warmup_epochs >= 0, "schedule.warmup_epochs", "must be >= 0")
    _require(0 < cfg.schedule.warmup_start_factor <= 1, "schedule.warmup_start_factor", "must be in (0, 1]")
    _require(cfg.schedule.base_batch_size >= 1, "schedule.base_batch_size", "must be >= 1")
    _require(cfg.kfac.damping > 0, "kfac.damping", f"must be > 0, got {cfg.kfac.damping}")
    _require(0 <= cfg.kfac.factor_decay < 1, "kfac.factor_decay", "must be in [0, 1)")
    _require(cfg.kfac.factor_interval >= 1, "kfac.factor_interval", "must be >= 1")
    _require(cfg.kfac.inverse_interval >= 1, "kfac.inverse_interval", "must be >= 1")
    _require(cfg.kfac.kl_clip >= 0, "kfac.kl_clip", "must be >= 0 (0 disables KL-clipping)")
    _choice(cfg.kfac.fisher_type, "kfac.fisher_type", FISHER_TYPES)
    _choice(cfg.kfac.inverse_method, "kfac.inverse_method", INVERSE_METHODS)
    _require(0 < cfg.kfac.stats_fraction <= 1, "kfac.stats_fraction", "must be in (0, 1]")


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
