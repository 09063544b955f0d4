"""The in-memory dataset every loader returns: uint8 images and int64 labels, train and test.

Keeping whole splits as uint8 tensors (a quarter of the float32 size) lets the batch iterator
index, augment and normalize a batch in a few vectorized operations, with no worker processes.
"""

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
    train_images: torch.Tensor  # uint8 [N, C, H, W], contiguous
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor  # uint8 [M, C, H, W], contiguous
    test_labels: torch.Tensor  # int64 [M]

    def __post_init__(self) -> None:
        # Every loader (and the cache) goes through here, so a shape or dtype slip is caught at
        # load time with the dataset's name instead of deep inside a training step.
        if len(self.classes) < 2:
            raise DatasetError(
                f"dataset '{self.name}' has {len(self.classes)} class(es) {self.classes}; "
                "classification needs at least 2. Point data.path at the folder that holds one "
                "sub-folder per class (train/<class>/..., test/<class>/...)"
            )
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise DatasetError(
                    f"dataset '{self.name}': {split} images are {images.dtype} "
                    f"{tuple(images.shape)}, expected uint8 [N, C, H, W]"
                )
            if (
                labels.dtype != torch.int64
                or labels.dim() != 1
                or labels.shape[0] != images.shape[0]
            ):
                raise DatasetError(
                    f"dataset '{self.name}': {split} labels are {labels.dtype} "
                    f"{tuple(labels.shape)}, expected int64 [{images.shape[0]}]"
                )
            if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < len(
                self.classes
            ):
                raise DatasetError(
                    f"dataset '{self.name}': {split} labels span "
                    f"{int(labels.min())}..{int(labels.max())} "
                    f"but there are {len(self.classes)} classes"
                )
            setattr(self, f"{split}_images", images.contiguous())
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise DatasetError(
                f"dataset '{self.name}': train images are {tuple(self.train_images.shape[1:])} "
                f"but test images are {tuple(self.test_images.shape[1:])}"
            )

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


def per_class_quota(limit: int, num_classes: int, index: int) -> int:
    """How many examples class ``index`` contributes to a balanced subset of ``limit``.

    The remainder goes to the lowest class indices, so quotas differ by at most one.
    """
    return limit // num_classes + (1 if index < limit % num_classes else 0)


def balanced_subset(labels: torch.Tensor, limit: int | None) -> torch.Tensor | None:
    """Indices of the first quota examples of each class, in file order; None means all.

    "First in file order" keeps the subset deterministic and nested (a larger limit contains a
    smaller one), which makes results at different limits comparable.
    """
    if not limit or limit >= labels.shape[0]:
        return None
    classes = torch.unique(labels)
    chosen = [
        torch.nonzero(labels == c).flatten()[: per_class_quota(limit, len(classes), i)]
        for i, c in enumerate(classes.tolist())
    ]
    return torch.sort(torch.cat(chosen)).values


def apply_limits(ds: ImageDataset, train_limit: int | None, test_limit: int | None) -> ImageDataset:
    """Shrink the splits to class-balanced subsets (for loaders that must read everything
    anyway)."""
    for split, limit in (("train", train_limit), ("test", test_limit)):
        idx = balanced_subset(getattr(ds, f"{split}_labels"), limit)
        if idx is not None:
            setattr(
                ds,
                f"{split}_images",
                getattr(ds, f"{split}_images").index_select(0, idx).contiguous(),
            )
            setattr(
                ds,
                f"{split}_labels",
                getattr(ds, f"{split}_labels").index_select(0, idx).contiguous(),
            )
    return ds
