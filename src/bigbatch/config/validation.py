"""Whole-config checks, run before any work: an impossible value is named with its fix."""

from __future__ import annotations

import dataclasses
import math

from bigbatch.config.checks import choice, require
from bigbatch.config.optimizer_checks import check_ghost_batch_norm, check_optimizer_options
from bigbatch.config.schema import (
    DATA_FORMATS,
    MAX_RUN_NAME,
    MODELS,
    OPTIMIZERS,
    PRECISIONS,
    SWITCH_MODES,
    Config,
)


def _check_run_name(name: str) -> None:
    # The name becomes a directory under runtime.output_dir and must stay inside it.
    require(
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


def _check_finite(cfg: Config) -> None:
    # inf and nan parse as TOML floats; no key of bigbatch's means anything with them.
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if isinstance(value, float):
                require(
                    math.isfinite(value),
                    f"{section.name}.{f.name}",
                    f"must be a finite number, got {value}",
                )


def validate(cfg: Config) -> None:
    """Reject values that cannot work; checks needing the dataset live in validate_against_data."""
    _check_finite(cfg)
    _check_run_name(cfg.run.name)
    require(cfg.run.epochs >= 1, "run.epochs", f"must be >= 1, got {cfg.run.epochs}")
    require(
        0 <= cfg.run.stop_at_test_acc <= 1,
        "run.stop_at_test_acc",
        "must be a test accuracy in (0, 1], e.g. 0.6, or 0 to train every epoch",
    )
    choice(cfg.data.format, "data.format", DATA_FORMATS)
    require(
        cfg.data.train_limit >= 0, "data.train_limit", "must be >= 0 (0: the whole training set)"
    )
    require(cfg.data.test_limit >= 0, "data.test_limit", "must be >= 0 (0: the whole test set)")
    choice(cfg.model.name, "model.name", MODELS)
    require(cfg.augment.crop_padding >= 0, "augment.crop_padding", "must be >= 0")
    for key in ("mixup_alpha", "cutmix_alpha"):
        value = getattr(cfg.augment, key)
        require(value >= 0, f"augment.{key}", f"must be > 0 to enable or 0 to disable, got {value}")
    require(
        not (cfg.augment.mixup_alpha > 0 and cfg.augment.cutmix_alpha > 0),
        "augment.cutmix_alpha",
        "and augment.mixup_alpha cannot both be enabled; set one of them to 0",
    )
    require(0 <= cfg.augment.label_smoothing < 1, "augment.label_smoothing", "must be in [0, 1)")
    require(
        cfg.train.batch_size >= 1, "train.batch_size", f"must be >= 1, got {cfg.train.batch_size}"
    )
    require(cfg.train.train_eval_examples >= 0, "train.train_eval_examples", "must be >= 0")
    choice(cfg.train.precision, "train.precision", PRECISIONS)
    require(
        cfg.train.noise_scale_split_every >= 0,
        "train.noise_scale_split_every",
        f"must be >= 0 (0: never split a batch to measure the noise scale), got "
        f"{cfg.train.noise_scale_split_every}",
    )
    choice(cfg.optimizer.name, "optimizer.name", OPTIMIZERS)
    require(cfg.optimizer.lr > 0, "optimizer.lr", f"must be > 0, got {cfg.optimizer.lr}")
    require(0 <= cfg.optimizer.momentum < 1, "optimizer.momentum", "must be in [0, 1)")
    require(cfg.optimizer.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    require(
        not cfg.optimizer.nesterov or cfg.optimizer.momentum > 0,
        "optimizer.nesterov",
        "needs optimizer.momentum > 0",
    )
    check_optimizer_options(cfg)
    check_ghost_batch_norm(cfg)
    s = cfg.schedule
    require(0 < s.decay_factor <= 1, "schedule.decay_factor", "must be in (0, 1]")
    require(all(e >= 1 for e in s.decay_epochs), "schedule.decay_epochs", "must hold epochs >= 1")
    require(s.warmup_epochs >= 0, "schedule.warmup_epochs", "must be >= 0")
    require(0 < s.warmup_start_factor <= 1, "schedule.warmup_start_factor", "must be in (0, 1]")
    require(s.base_batch_size >= 1, "schedule.base_batch_size", "must be >= 1")
    cfg.kfac.validate()
    r = cfg.runtime
    require(r.threads >= 0, "runtime.threads", "must be >= 0 (0 keeps torch's default)")
    require(r.dist_timeout > 0, "runtime.dist_timeout", "must be > 0 seconds")
    choice(r.progress, "runtime.progress", SWITCH_MODES)
    choice(r.channels_last, "runtime.channels_last", SWITCH_MODES)
    require(
        r.micro_batch_size >= 0, "runtime.micro_batch_size", "must be >= 0 (0 picks automatically)"
    )
    require(r.eval_batch_size >= 1, "runtime.eval_batch_size", "must be >= 1")
    require(r.checkpoint_every >= 1, "runtime.checkpoint_every", "must be >= 1")
    require(
        r.max_loss_factor == 0 or r.max_loss_factor > 1,
        "runtime.max_loss_factor",
        "must be > 1 (a multiple of log(classes)) or 0 to stop only on non-finite losses",
    )
    require(r.collapse_epochs >= 0, "runtime.collapse_epochs", "must be >= 0 (0: never stop)")


def validate_against_data(
    cfg: Config,
    num_train: int,
    num_test: int,
    world_size: int = 1,
    image_size: tuple[int, int] | None = None,
) -> None:
    """Checks that need the dataset: an impossible batch size is named before training starts."""
    if image_size is not None:
        # The padded copy of every batch grows with the padding: bound it by the image.
        side = max(image_size)
        require(
            cfg.augment.crop_padding <= side,
            "augment.crop_padding",
            f"is {cfg.augment.crop_padding} but the images are {image_size[0]}x{image_size[1]}; "
            f"pad at most {side} pixels (4 is usual for 32x32 images)",
        )
    require(
        cfg.train.batch_size <= num_train,
        "train.batch_size",
        f"is {cfg.train.batch_size} but the training set has only {num_train} examples; "
        "lower train.batch_size or raise data.train_limit",
    )
    require(
        cfg.train.batch_size >= world_size,
        "train.batch_size",
        f"is {cfg.train.batch_size}, smaller than the {world_size} ranks sharing each batch",
    )
    require(num_test >= 1, "data.test_limit", "leaves an empty test set")
    if cfg.optimizer.name == "kfac":
        cfg.kfac.grad_workers(world_size)
