"""In-memory batches: per-epoch shuffling, per-rank sharding, crop/flip augmentation, normalization.

Randomness depends only on (seed, epoch), so a run resumed at an epoch boundary sees exactly the
batches it would have seen, with no RNG state in the checkpoint. The ranks of a data-parallel job
together see exactly the single-process batch: every random draw (the permutation, each example's
crop offset and flip) is made for the whole global batch, then each rank takes its contiguous part.

Everything stays uint8 until the last step (indexing and cropping move a quarter of the bytes),
and the work is done on whichever device holds the images; the random draws are made on the CPU,
once per epoch, so that a run gives the same batches on every device and the host sends the
device one set of indices per epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F


def channel_stats(images_u8: torch.Tensor, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std on the [0, 1] scale.

    Computed from per-channel histograms of the 256 pixel values, chunk by chunk: exact integer
    counts, no float copy of the dataset. A constant channel gets std 1 (normalization then only
    centres it instead of dividing by zero).
    """
    if images_u8.dtype != torch.uint8 or images_u8.dim() != 4 or images_u8.shape[0] == 0:
        raise ValueError(
            f"channel_stats needs uint8 images [N, C, H, W] with N >= 1, got {images_u8.dtype} "
            f"{tuple(images_u8.shape)}"
        )
    channels = images_u8.shape[1]
    counts = torch.zeros(channels, 256, dtype=torch.int64, device=images_u8.device)
    for start in range(0, images_u8.shape[0], chunk):
        part = images_u8[start : start + chunk]
        for c in range(channels):
            counts[c] += torch.bincount(part[:, c].reshape(-1), minlength=256)
    counts = counts.cpu().double()
    values = torch.arange(256, dtype=torch.float64) / 255
    n = counts.sum(1)
    mean = counts @ values / n
    var = (counts @ (values * values) / n - mean * mean).clamp_min(0)
    std = torch.where(var > 1e-12, var.sqrt(), torch.ones_like(var))
    return mean.tolist(), std.tolist()


def crop_flip(
    images: torch.Tensor, padding: int, shifts: torch.Tensor, flips: torch.Tensor
) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip for a whole batch at once.

    ``shifts`` [b, 2] holds each crop's (row, column) offset in [0, 2 * padding] inside the padded
    image (``padding`` is the centred, unshifted crop); ``flips`` [b] says which crops are mirrored.
    One gather over the padded batch does both: each output pixel reads from its example's shifted
    (and, if flipped, column-reversed) window, an index shared by all channels.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    width = w + 2 * padding
    shifts, flips = shifts.to(images.device), flips.to(images.device)
    cols = torch.arange(w, device=images.device)
    cols = torch.where(flips[:, None], w - 1 - cols, cols) + shifts[:, 1:2]  # [b, w]
    rows = torch.arange(h, device=images.device) + shifts[:, 0:1]  # [b, h]
    index = (rows[:, :, None] * width + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.view(b, c, -1).gather(2, index).view(b, c, h, w)


class BatchLoader:
    """Iterates (x float32 normalized [b, C, H, W], y int64 [b]) over this rank's part of each
    batch.

    ``len(loader)`` is the number of global batches per epoch; every rank yields that many (a rank's
    part of a short last batch can be smaller, or empty when that batch has fewer examples than
    there are ranks; ``drop_last`` drops the short batch). A short last batch with fewer examples
    than ranks is always dropped: a rank with nothing to compute would have no loss to average.
    """

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
        n = int(labels.shape[0])
        if images_u8.dtype != torch.uint8 or images_u8.dim() != 4 or images_u8.shape[0] != n:
            raise ValueError(
                f"BatchLoader needs uint8 images [N, C, H, W] and N labels, got {images_u8.dtype} "
                f"{tuple(images_u8.shape)} and {n} labels"
            )
        if not 1 <= batch_size <= n:
            raise ValueError(
                f"batch size {batch_size} must be between 1 and the number of examples ({n})"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"rank {rank} of world size {world_size} is invalid; need world_size >= 1 and 0 <= "
                "rank < world_size"
            )
        if batch_size < world_size:
            raise ValueError(
                f"batch size {batch_size} is smaller than the {world_size} ranks sharing it; each "
                "rank needs at least one example"
            )
        channels = images_u8.shape[1]
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise ValueError(
                f"mean and std need one value per channel ({channels}) and std > 0, got mean "
                f"{mean}, std {std}"
            )
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.images, self.labels = images_u8, labels
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.augment, self.crop_padding = augment, crop_padding
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        # (x / 255 - mean) / std folded into one multiply and one add on the converted batch.
        device = images_u8.device
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device).view(
            1, channels, 1, 1
        )
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=device).view(
            1, channels, 1, 1
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation and augmentation the next iteration yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = self.labels.shape[0]
        full, rest = divmod(n, self.batch_size)
        return full + (0 if self.drop_last or rest < self.world_size else 1)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.labels.shape[0]
        g = self._generator()
        # The epoch's draws, for the global order, made at once on the CPU and moved to the
        # images' device once: no copy from the host per batch.
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        if self.augment:
            shifts = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=g)
            flips = torch.rand(n, generator=g) < 0.5
            shifts, flips = shifts.to(self.images.device), flips.to(self.images.device)
        order = order.to(self.images.device)
        for b in range(len(self)):
            start = b * self.batch_size
            positions = torch.arange(start, min(start + self.batch_size, n))
            if self.world_size > 1:  # this rank's contiguous part of the global batch
                positions = torch.tensor_split(positions, self.world_size)[self.rank]
            lo, hi = (int(positions[0]), int(positions[-1]) + 1) if len(positions) else (0, 0)
            batch = order[lo:hi]
            x = self.images.index_select(0, batch)
            if self.augment:
                x = crop_flip(x, self.crop_padding, shifts[lo:hi], flips[lo:hi])
            yield (
                x.float().mul_(self.scale).add_(self.shift),
                self.labels.index_select(0, batch.to(self.labels.device)),
            )
