"""Every config key, its type, default and meaning: one dataclass per section.

Experiment sections ([run] [data] [model] [augment] [train] [optimizer] [schedule] [kfac]) decide
the results; [runtime] decides only how and where a run executes, so --resume may change it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigbatch.config.checks import choice, require

# One tuple per set of choices: the config, the CLI, the data loader and K-FAC all read these.
DATA_FORMATS = ("auto", "cifar10", "image-folder", "idx", "fashion-mnist", "synthetic")
MODELS = ("lenet5", "resnet20", "resnet32", "resnet44", "resnet56")
OPTIMIZERS = ("sgd", "kfac")
PRECISIONS = ("fp32", "bf16", "fp16")
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
    # Autocast precision of forward passes: fp32 (off), bf16, or fp16 (with a gradient scaler).
    precision: str = "fp32"
    # The gradient noise scale B_simple per epoch (train/noise_scale.py), from the parts a step's
    # gradient is in (ranks, micro-batches); a gradient in one piece is split in two to measure it
    # on steps 0, k, 2k, ... of each epoch, k = noise_scale_split_every (0: never).
    noise_scale: bool = True
    noise_scale_split_every: int = 16


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

        require(self.damping > 0, key("damping"), f"must be > 0, got {self.damping}")
        require(0 <= self.factor_decay < 1, key("factor_decay"), "must be in [0, 1)")
        require(self.factor_interval >= 1, key("factor_interval"), "must be >= 1")
        require(self.inverse_interval >= 1, key("inverse_interval"), "must be >= 1")
        require(self.kl_clip >= 0, key("kl_clip"), "must be >= 0 (0 disables KL-clipping)")
        choice(self.fisher_type, key("fisher_type"), FISHER_TYPES)
        choice(self.inverse_method, key("inverse_method"), INVERSE_METHODS)
        require(0 < self.stats_fraction <= 1, key("stats_fraction"), "must be in (0, 1]")
        for pattern in self.skip_layers:
            try:
                re.compile(pattern)
            except re.error as exc:
                require(
                    False,
                    key("skip_layers"),
                    f"holds {pattern!r}, not a regular expression ({exc}); escape special "
                    "characters, e.g. 'conv\\[1' for a literal bracket",
                )
        if self.inverse_interval < self.factor_interval:
            warnings.warn(
                f"{key('inverse_interval')} ({self.inverse_interval}) is smaller than "
                f"{key('factor_interval')} ({self.factor_interval}): some decompositions repeat "
                "on unchanged factors; set inverse_interval to a multiple of factor_interval",
                stacklevel=2,
            )


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
    # An epoch whose training or test loss exceeds this many times log(classes), a uniform
    # guess's loss, stops the run as diverged (0: only non-finite losses stop it).
    max_loss_factor: float = 10.0
    # Deterministic cuDNN/cuBLAS kernels, so a resumed GPU run equals an uninterrupted one bit for
    # bit; false allows faster, autotuned kernels (runs then differ in the last bits).
    deterministic: bool = True


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
