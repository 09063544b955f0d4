"""The in-memory dataset every loader returns: uint8 images and int64 labels, train and test."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bigbatch.errors import BigbatchError


class DatasetError(BigbatchError):
    """A dataset that cannot be read: the message names the file and the fix."""


@dataclass
class ImageDataset:
    name: str
    classes: list[str]
    train_images: torch.Tensor  # uint8 [N, C, H, W]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor  # uint8 [M, C, H, W]
    test_labels: torch.Tensor  # int64 [M]

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_images.shape[2]), int(self.train_images.shape[3])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_train(self) -> int:
        return int(self.train_labels.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_labels.shape[0])


def balanced_subset(labels: torch.Tensor, limit: int | None) -> torch.Tensor | None:
    """Indices of the first ceil/floor(limit / classes) examples of each class, in file order; None for all."""
    if not limit or limit >= labels.shape[0]:
        return None
    classes = torch.unique(labels)
    per_class = [limit // len(classes) + (1 if i < limit % len(classes) else 0) for i in range(len(classes))]
    chosen = [torch.nonzero(labels == c).flatten()[:k] for c, k in zip(classes, per_class)]
    return torch.sort(torch.cat(chosen)).values


def apply_limits(ds: ImageDataset, train_limit: int | None, test_limit: int | None) -> ImageDataset:
    for split, limit in (("train", train_limit), ("test", test_limit)):
        idx = balanced_subset(getattr(ds, f"{split}_labels"), limit)
        if idx is not None:
            setattr(ds, f"{split}_images", getattr(ds, f"{split}_images")[idx].contiguous())
            setattr(ds, f"{split}_labels", getattr(ds, f"{split}_labels")[idx].contiguous())
    return ds
