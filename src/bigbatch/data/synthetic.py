"""A small, learnable, generated image dataset for tests and benchmarks that need no files.

Each class is a fixed random prototype image; examples are the prototype plus Gaussian noise,
clipped to uint8. With the default noise a small CNN learns it within a few epochs but not in a
handful of steps, so it exercises real training dynamics at a fraction of CIFAR-10's cost.
Everything follows from ``seed``: the same call returns the same tensors.
"""

from __future__ import annotations

import torch

from bigbatch.data.dataset import ImageDataset

DEFAULT_TRAIN = 2000
DEFAULT_TEST = 500


def make_synthetic(
    train_size: int = DEFAULT_TRAIN,
    test_size: int = DEFAULT_TEST,
    num_classes: int = 10,
    channels: int = 3,
    size: tuple[int, int] = (32, 32),
    noise: float = 60.0,
    seed: int = 0,
) -> ImageDataset:
    """``train_size``/``test_size`` examples, classes balanced (sizes differ by at most one), in
    random order."""
    if train_size < 1 or test_size < 1 or num_classes < 1 or channels < 1 or min(size) < 1:
        raise ValueError(
            f"synthetic dataset needs positive sizes, got train {train_size}, test {test_size}, "
            f"{num_classes} classes, {channels}x{size[0]}x{size[1]} images"
        )
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(num_classes, channels, *size, generator=g) * 255

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        x = prototypes[labels] + noise * torch.randn(n, channels, *size, generator=g)
        return x.clamp_(0, 255).round_().to(torch.uint8), labels

    return ImageDataset(
        "synthetic",
        [f"class{i}" for i in range(num_classes)],
        *split(train_size),
        *split(test_size),
    )
