"""The compute of one step and of an evaluation pass, apart from the epoch loop's bookkeeping."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigbatch.augment.mixup import MixedTargets, mixed_correct, mixed_cross_entropy
from bigbatch.config import Config
from bigbatch.data import ImageDataset
from bigbatch.data.batches import BatchLoader, channel_stats
from bigbatch.errors import ConfigError
from bigbatch.models import micro_batch_unit
from bigbatch.train.distributed import ParallelContext

# Micro-batch size whose activations the CPU allocator reuses from step to step (BENCHMARKS.md).
CPU_MICRO_BATCH = 256


def micro_batch_size(cfg: Config, model: nn.Module, device: torch.device, local_batch: int) -> int:
    if cfg.runtime.micro_batch_size:
        return min(cfg.runtime.micro_batch_size, local_batch)
    # BatchNorm statistics depend on the batch: split only into whole ghost batches (or not at all).
    unit = micro_batch_unit(model)
    if device.type == "cpu" and unit:
        return min(max(unit, CPU_MICRO_BATCH - CPU_MICRO_BATCH % unit), local_batch)
    return local_batch


# A dataset moves to an accelerator when it takes at most this share of its free memory.
DATASET_MEMORY_SHARE = 0.25


def on_device_if_it_fits(ds: ImageDataset, device: torch.device) -> ImageDataset:
    """The dataset (uint8, as loaded) on ``device`` when it fits there, so batches are indexed,
    augmented and normalized where the model runs; else unchanged (batches are then copied)."""
    if device.type == "cpu":
        return ds
    tensors = (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels)
    size = sum(t.numel() * t.element_size() for t in tensors)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    if size > DATASET_MEMORY_SHARE * free:
        return ds
    moved = [t.to(device) for t in tensors]
    return dataclasses.replace(
        ds,
        train_images=moved[0],
        train_labels=moved[1],
        test_images=moved[2],
        test_labels=moved[3],
    )


def make_loaders(
    cfg: Config, ds: ImageDataset, rank: int, world_size: int
) -> tuple[BatchLoader, BatchLoader, BatchLoader | None]:
    """This rank's training batches, and its shards of the test set and of the clean training
    subset (None when that subset is off)."""
    # Normalization statistics of the training set, computed where it lies.
    mean, std = channel_stats(ds.train_images)
    shard: dict[str, Any] = dict(rank=rank, world_size=world_size, mean=mean, std=std)
    train = BatchLoader(
        ds.train_images,
        ds.train_labels,
        cfg.train.batch_size,
        shuffle=True,
        seed=cfg.run.seed,
        augment=cfg.augment.crop_flip,
        crop_padding=cfg.augment.crop_padding,
        drop_last=cfg.train.drop_last,
        **shard,
    )
    eval_bs = max(min(cfg.runtime.eval_batch_size, ds.num_test), world_size)
    test = BatchLoader(ds.test_images, ds.test_labels, eval_bs, shuffle=False, **shard)
    n_eval = min(cfg.train.train_eval_examples, ds.num_train)
    if n_eval < world_size:
        return train, test, None
    clean = BatchLoader(
        ds.train_images[:n_eval],
        ds.train_labels[:n_eval],
        max(min(eval_bs, n_eval), world_size),
        shuffle=False,
        **shard,
    )
    return train, test, clean


def use_channels_last(cfg: Config, device: torch.device, model: nn.Module | None = None) -> bool:
    """NHWC activations ("auto"): on the CPU, whose convolutions run faster on them
    (BENCHMARKS.md), and for convolutional models under CUDA mixed precision, where the tensor
    cores' convolution kernels take NHWC."""
    mode = cfg.runtime.channels_last
    if mode != "auto":
        return mode == "on"
    if device.type == "cpu":
        return True
    convolutional = model is not None and any(isinstance(m, nn.Conv2d) for m in model.modules())
    return device.type == "cuda" and cfg.train.precision != "fp32" and convolutional


def compile_model(model: nn.Module, backend: str) -> Any:
    """torch.compile(model) with a backend named in the config (checked here, where torch's list
    of backends is at hand)."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ConfigError(
            f"config key 'runtime.compile_backend' is {backend!r}; choose one of {', '.join(known)}"
        )
    return torch.compile(model, backend=backend)


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The forward passes' mixed-precision context ("fp32": disabled)."""
    dtype = AUTOCAST_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    # The loss of autocast's bf16/fp16 logits in float32; float64 models stay float64.
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def forward_backward(
    model: nn.Module,
    x: torch.Tensor,
    targets: MixedTargets,
    micro: int,
    label_smoothing: float = 0.0,
    mc_fisher: Any = None,
    memory_format: torch.memory_format = torch.contiguous_format,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    after_backward: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate the gradient of the batch-mean loss in micro-batches; returns (loss sum, hits)
    as float64 tensors on the batch's device, read by no one here: no host sync.

    Each micro-batch's mean loss is weighted by its share of the batch, so the accumulated gradient
    equals the full-batch gradient up to float rounding (tests check this). Forward passes run
    under ``precision``'s autocast, backward passes of ``scaler``-scaled losses;
    ``after_backward(size)`` runs after each micro-batch's backward (the noise scale's probe).
    """
    n = x.shape[0]
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    hits = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, n, micro):
        size = min(micro, n - start)
        part = targets.narrow(start, size)
        with autocast(x.device, precision):
            logits = model(x.narrow(0, start, size).contiguous(memory_format=memory_format))
            if mc_fisher is not None:
                mc_fisher.accumulate_mc_fisher(logits)
            loss = mixed_cross_entropy(_at_least_float32(logits), part, label_smoothing)
        weighted = loss * (size / n)
        (scaler.scale(weighted) if scaler is not None else weighted).backward()
        if after_backward is not None:
            after_backward(size)
        loss_sum += loss.detach().double() * size
        hits += mixed_correct(logits.detach(), part).double()
    return loss_sum, hits


def adapt_kfac_damping(
    trainer: Any,
    x: torch.Tensor,
    targets: MixedTargets,
    before: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """K-FAC's Levenberg-Marquardt step on the batch ``trainer`` just trained on
    (optim/kfac/adaptive.py), judged with the training loss itself (mixing and label smoothing
    included)."""
    cfg = trainer.cfg

    def loss_of_rows(logits: torch.Tensor, start: int, size: int) -> torch.Tensor:
        part = targets.narrow(start, size)
        return mixed_cross_entropy(_at_least_float32(logits), part, cfg.augment.label_smoothing)

    trainer.kfac.adapt_damping(
        trainer.model,
        x.contiguous(memory_format=trainer.memory_format),
        loss_of_rows,
        before,
        cfg.optimizer.weight_decay,
        trainer.micro_batch,
        trainer.parallel.all_sum,
    )


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: BatchLoader,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
    parallel: ParallelContext | None = None,
    precision: str = "fp32",
) -> dict[str, float]:
    """Mean loss and top-1 accuracy; with several ranks each evaluates its shard and the sums are
    reduced."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    hits = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = _at_least_float32(model(x.contiguous(memory_format=memory_format)))
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        hits += (logits.argmax(1) == y).sum()
        count += y.shape[0]
    model.train(was_training)
    total_loss, total_hits, total = (parallel or ParallelContext()).all_sum(
        [float(loss_sum), float(hits), float(count)]
    )
    return {"loss": total_loss / total, "acc": total_hits / total}
