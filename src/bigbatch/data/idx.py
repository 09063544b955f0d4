"""MNIST-style IDX files (optionally gzipped), e.g. Fashion-MNIST from Debian's dataset-fashion-mnist."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from bigbatch.data.dataset import DatasetError, ImageDataset

FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
UBYTE = 0x08


def find_idx_file(root: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz", stem.replace("-idx", ".idx"), f"{stem.replace('-idx', '.idx')}.gz"):
        if (root / name).is_file():
            return root / name
    return None


def read_idx(path: Path, dims: int) -> np.ndarray:
    """An unsigned-byte IDX array of ``dims`` dimensions, validated against its header."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DatasetError(f"cannot read IDX file '{path}' ({exc}); the file is damaged, reinstall or download it again") from None
    if len(raw) < 4 + 4 * dims:
        raise DatasetError(f"IDX file '{path}' is truncated ({len(raw)} bytes); reinstall or download it again")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != UBYTE or ndim != dims:
        raise DatasetError(
            f"IDX file '{path}' has a bad header (type 0x{dtype:02x}, {ndim} dims; expected unsigned bytes with {dims} dims); "
            "is it the right file?"
        )
    shape = struct.unpack(f">{dims}I", raw[4 : 4 + 4 * dims])
    expected = int(np.prod(shape))
    body = raw[4 + 4 * dims :]
    if len(body) != expected:
        raise DatasetError(f"IDX file '{path}' holds {len(body)} values but its header promises {expected}; the file is truncated or damaged")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def load_idx(path: str | Path, classes: list[str] | None = None, name: str | None = None) -> ImageDataset:
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"IDX directory '{root}' does not exist; for Fashion-MNIST run `apt-get install dataset-fashion-mnist` or pass its folder")
    arrays = {}
    for key, stem in FILES.items():
        file = find_idx_file(root, stem)
        if file is None:
            raise DatasetError(f"'{root}' has no {stem}[.gz]; an IDX dataset needs {', '.join(FILES.values())}")
        arrays[key] = read_idx(file, 3 if key.endswith("images") else 1)
    for split in ("train", "test"):
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            raise DatasetError(f"'{root}': {split} has {len(arrays[f'{split}_images'])} images but {len(arrays[f'{split}_labels'])} labels")
    num_classes = int(max(arrays["train_labels"].max(), arrays["test_labels"].max())) + 1
    classes = classes or [str(i) for i in range(num_classes)]
    return ImageDataset(
        name or root.name,
        classes,
        torch.from_numpy(arrays["train_images"].copy()).unsqueeze(1),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        torch.from_numpy(arrays["test_images"].copy()).unsqueeze(1),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
    )
