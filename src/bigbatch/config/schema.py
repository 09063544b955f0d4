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
MODELS = ("lenet5", "resnet8", "resnet20", "resnet32", "resnet44", "resnet56")
OPTIMIZERS = ("sgd", "kfac", "lars", "lamb", "muon")
MUON_REST_OPTIMIZERS = ("sgd", "adamw")
MUON_LR_ADJUSTMENTS = ("original", "match_rms_adamw")
PRECISIONS = ("fp32", "bf16", "fp16")
FISHER_TYPES = ("empirical", "mc")
INVERSE_METHODS = ("eigen", "inverse")
BATCHNORM_CURVATURES = ("unit", "none")
SWITCH_MODES = ("auto", "on", "off")  # runtime.progress and runtime.channels_last
MAX_RUN_NAME = 128


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    epochs: int = 10
    # End training after the first epoch whose test accuracy reaches this (0: train all epochs).
    stop_at_test_acc: float = 0.0


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
    # Ghost batch normalization (Hoffer et al. 2017): BatchNorm normalizes each slice of this many
    # examples with the slice's own statistics; 0 normalizes the whole (local) batch.
    ghost_batch_size: int = 0


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
    # torch.compile the model for training steps (K-FAC's statistics steps run it eagerly).
    compile: bool = False
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
    # LARS (You et al. 2017): each layer's lr times lars_trust * |w| / (|g| + weight_decay * |w|).
    lars_trust: float = 1e-3
    # LARS and LAMB leave 1-D parameters (biases, BatchNorm) out of the trust ratio and weight
    # decay, as You et al. do.
    exclude_1d: bool = True
    # Adam moments of LAMB (You et al. 2020) and of Muon's AdamW companion.
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    # Muon (torch.optim.Muon) takes conv and hidden Linear weights (optimizer.lr, momentum,
    # nesterov, weight_decay); muon_rest (sgd | adamw) at muon_rest_lr takes the biases,
    # BatchNorm parameters and the classifier head, as Muon's authors prescribe.
    muon_ns_steps: int = 5
    muon_adjust_lr: str = "original"
    muon_rest: str = "sgd"
    muon_rest_lr: float = 0.01
    # SAM (Foret et al. 2021) neighbourhood radius around any optimizer but kfac; 0 disables.
    sam_rho: float = 0.0


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
    # BatchNorm's (gamma, beta): "unit" preconditions them with a 2x2 Fisher block per channel,
    # "none" leaves them the raw gradient.
    batchnorm: str = "unit"
    # Share of the ranks that precondition each layer (KAISA): 1 = all of them (each holds every
    # decomposition), 1/world = the layer's owner alone, which broadcasts the result.
    grad_worker_fraction: float = 1.0
    # Levenberg-Marquardt damping (Martens & Grosse 2015, sec 6.5): every adaptive_interval steps
    # the damping moves by (19/20)^interval from the reduction ratio, within [min, max]_damping.
    adaptive_damping: bool = False
    adaptive_interval: int = 5
    min_damping: float = 1e-8
    max_damping: float = 1e3

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
        choice(self.batchnorm, key("batchnorm"), BATCHNORM_CURVATURES)
        require(self.adaptive_interval >= 1, key("adaptive_interval"), "must be >= 1")
        if self.adaptive_damping:
            require(
                0 < self.min_damping <= self.damping <= self.max_damping,
                key("damping"),
                f"is {self.damping:g}; with adaptive_damping it must lie within "
                f"[min_damping, max_damping] = [{self.min_damping:g}, {self.max_damping:g}]",
            )
        require(
            0 < self.grad_worker_fraction <= 1,
            key("grad_worker_fraction"),
            f"must be in (0, 1], got {self.grad_worker_fraction}",
        )
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

    def grad_workers(self, world_size: int, section: str = "kfac") -> int:
        """Ranks that precondition each layer: grad_worker_fraction * world_size, which must be a
        whole number dividing world_size (the ranks split into groups of that size)."""
        exact = self.grad_worker_fraction * world_size
        workers = max(1, round(exact))
        valid = [f"{d}/{world_size}" for d in range(1, world_size + 1) if world_size % d == 0]
        require(
            abs(exact - workers) < 1e-6 and world_size % workers == 0,
            f"{section}.grad_worker_fraction" if section else "grad_worker_fraction",
            f"is {self.grad_worker_fraction:g}, giving {exact:g} of {world_size} ranks per layer; "
            f"choose one of {', '.join(valid)}",
        )
        return workers


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
    # NHWC activations; "auto": on for the CPU, whose convolutions run faster on them, and for
    # convolutional models under CUDA mixed precision (tensor-core kernels take NHWC).
    channels_last: str = "auto"
    # 0 picks automatically: 256-example micro-batches on CPU for models without BatchNorm, whose
    # buffers the allocator reuses; the gradient is the whole batch's either way.
    micro_batch_size: int = 0
    eval_batch_size: int = 256
    checkpoint_every: int = 1
    # An epoch whose training or test loss exceeds this many times log(classes), a uniform
    # guess's loss, stops the run as diverged (0: only non-finite losses stop it).
    max_loss_factor: float = 10.0
    # A run that had learned (clean train loss at most 0.8 log(classes)) and then spends this
    # many epochs in a row with train and test loss at 0.95 log(classes) or more and accuracy at
    # most twice 1 / classes (it predicts no better than a uniform guess) stops as collapsed
    # (0: never).
    collapse_epochs: int = 3
    # Deterministic cuDNN/cuBLAS kernels, so a resumed GPU run equals an uninterrupted one bit for
    # bit; false allows faster, autotuned kernels (runs then differ in the last bits).
    deterministic: bool = True
    # torch.compile's backend for train.compile ("inductor" generates kernels; "aot_eager" only
    # captures graphs, for checking that a model compiles).
    compile_backend: str = "inductor"


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
