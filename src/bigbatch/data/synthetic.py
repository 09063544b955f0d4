"""A small, learnable, generated image dataset for tests and benchmarks that need no files.

Each class is a fixed random prototype image; examples are the prototype plus noise, so a model can
learn it in a few epochs but not instantly.
"""

from __future__ import annotations

import torch

from bigbatch.data.dataset import ImageDataset


def make_synthetic(
    train_size: int = 2000, test_size: int = 500, num_classes: int = 10, channels: int = 3,
    size: tuple[int, int] = (32, 32), noise: float = 60.0, seed: int = 0,
) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(num_classes, channels, *size, generator=g) * 255

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=g)]
        x = prototypes[labels] + noise * torch.randn(n, channels, *size, generator=g)
        return x.clamp(0, 255).round().to(torch.uint8), labels

    return ImageDataset("synthetic", [f"class{i}" for i in range(num_classes)], *split(train_size), *split(test_size))
