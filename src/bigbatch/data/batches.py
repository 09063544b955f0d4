"""In-memory batches: per-epoch shuffling, per-rank sharding, crop/flip augmentation, normalization.

Randomness depends only on (seed, epoch), so a run resumed at an epoch boundary sees exactly the
batches it would have seen, and the ranks of a data-parallel job together see exactly the
single-process batch: every random draw is made for the whole global batch, then sliced.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch


def channel_stats(images_u8: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the [0, 1] scale, in float64 chunks (no float copy of the dataset)."""
    channels = images_u8.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images_u8.shape[0], chunk):
        x = images_u8[start : start + chunk].to(torch.float64).transpose(0, 1).reshape(channels, -1)
        total += x.sum(1)
        total_sq += (x * x).sum(1)
    count = images_u8.shape[0] * images_u8[0, 0].numel()
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return [float(m) / 255 for m in mean], [float(s) / 255 for s in std]


def crop_flip(images: torch.Tensor, padding: int, shifts: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip for a whole batch at once.

    ``shifts`` [b, 2] holds each crop's (row, column) offset in [0, 2 * padding] inside the padded
    image; ``flips`` [b] says which crops are mirrored.
    """
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    rows = shifts[:, 0:1] + torch.arange(h)  # [b, h]
    base = torch.arange(w)
    cols = shifts[:, 1:2] + torch.where(flips[:, None], w - 1 - base, base)  # [b, w]
    batch_idx = torch.arange(b)[:, None, None, None]
    chan_idx = torch.arange(c)[None, :, None, None]
    return padded[batch_idx, chan_idx, rows[:, None, :, None], cols[:, None, None, :]]


class BatchLoader:
    """Iterates (x float32 normalized [b, C, H, W], y int64 [b]) over this rank's part of each batch."""

    def __init__(
        self,
        images_u8: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        mean: list[float],
        std: list[float],
        shuffle: bool,
        seed: int = 0,
        augment: bool = False,
        crop_padding: int = 4,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ):
        n = labels.shape[0]
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch size {batch_size} must be between 1 and the number of examples ({n})")
        if batch_size < world_size:
            raise ValueError(f"batch size {batch_size} is smaller than the {world_size} ranks sharing it")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.images, self.labels = images_u8, labels
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.augment, self.crop_padding = augment, crop_padding
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        channels = images_u8.shape[1]
        # x / 255 then (x - mean) / std folded into one multiply-add on the uint8 values.
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, channels, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, channels, 1, 1)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = self.labels.shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.labels.shape[0]
        g = self._generator()
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        h, w = self.images.shape[2:]
        for b in range(len(self)):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.augment:
                shifts = torch.randint(0, 2 * self.crop_padding + 1, (batch.shape[0], 2), generator=g)
                flips = torch.rand(batch.shape[0], generator=g) < 0.5
            if self.world_size > 1:
                part = torch.tensor_split(torch.arange(batch.shape[0]), self.world_size)[self.rank]
                batch = batch[part]
                if self.augment:
                    shifts, flips = shifts[part], flips[part]
            x = self.images.index_select(0, batch)
            if self.augment:
                x = crop_flip(x, self.crop_padding, shifts, flips)
            yield x.float().mul_(self.scale).add_(self.shift), self.labels.index_select(0, batch)
