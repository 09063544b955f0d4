"""MNIST-style IDX files (optionally gzipped), e.g. Fashion-MNIST from Debian's
dataset-fashion-mnist.

An IDX file is a 4-byte magic (two zero bytes, a type code, the number of dimensions), one
big-endian uint32 per dimension, then the values. Both the header and the body length are checked,
so a truncated download fails here, with the file's name, rather than as a reshape error later.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from bigbatch.data.dataset import DatasetError, ImageDataset

FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_HINT = (
    "run `apt-get install dataset-fashion-mnist` or point data.path at a folder of Fashion-MNIST "
    "IDX files"
)
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
UBYTE = 0x08


def find_idx_file(root: Path, stem: str) -> Path | None:
    """``stem`` in ``root``, plain or .gz, also in the dotted spelling some mirrors use."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, f"{stem}.gz", dotted, f"{dotted}.gz"):
        if (root / name).is_file():
            return root / name
    return None


def read_idx(path: Path, dims: int) -> np.ndarray:
    """An unsigned-byte IDX array of ``dims`` dimensions, validated against its header."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(
            f"cannot read IDX file '{path}' ({exc}); the file is damaged or truncated, reinstall "
            "or download it again"
        ) from None
    header = 4 + 4 * dims
    if len(raw) < header:
        raise DatasetError(
            f"IDX file '{path}' is truncated ({len(raw)} bytes, shorter than its header); "
            "reinstall or download it again"
        )
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != UBYTE or ndim != dims:
        raise DatasetError(
            f"IDX file '{path}' has a bad header (magic 0x{zero:04x}{dtype:02x}{ndim:02x}: type "
            f"0x{dtype:02x}, {ndim} dims; "
            f"expected unsigned bytes (0x08) with {dims} dims); is it the right file?"
        )
    shape = struct.unpack(f">{dims}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        raise DatasetError(
            f"IDX file '{path}' holds {len(raw) - header} values but its header {list(shape)} "
            f"promises {expected}; "
            "the file is truncated or damaged, reinstall or download it again"
        )
    # bytearray makes the array writable, so torch.from_numpy shares it without a warning.
    return np.frombuffer(bytearray(memoryview(raw)[header:]), dtype=np.uint8).reshape(shape)


def load_idx(
    path: str | Path,
    classes: list[str] | None = None,
    name: str | None = None,
    hint: str | None = None,
) -> ImageDataset:
    """The four train/t10k image and label files in ``path``; images come out as [N, 1, H, W]."""
    root = Path(path)
    hint = (
        hint or f"point data.path at a folder holding {', '.join(FILES.values())} (each may be .gz)"
    )
    if not root.is_dir():
        raise DatasetError(f"IDX folder '{root}' does not exist; {hint}")
    arrays, files = {}, {}
    for key, stem in FILES.items():
        file = find_idx_file(root, stem)
        if file is None:
            raise DatasetError(f"'{root}' has no {stem} (or {stem}.gz); {hint}")
        files[key] = file
        arrays[key] = read_idx(file, 3 if key.endswith("images") else 1)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise DatasetError(
                f"'{files[f'{split}_images']}' holds {len(images)} images but "
                f"'{files[f'{split}_labels']}' holds "
                f"{len(labels)} labels; one of them is from another dataset or damaged"
            )
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise DatasetError(
            f"'{files['train_images']}' holds {arrays['train_images'].shape[1:]} images but "
            f"'{files['test_images']}' "
            f"holds {arrays['test_images'].shape[1:]}; they are from different datasets"
        )
    top = max(int(arrays["train_labels"].max(initial=0)), int(arrays["test_labels"].max(initial=0)))
    if classes is not None and top >= len(classes):
        raise DatasetError(
            f"'{root}' has label {top} but {name or 'the dataset'} has {len(classes)} classes; is "
            "it the right dataset?"
        )
    if classes is None:
        # Without declared classes the labels define them: they must be 0..K-1, each used.
        missing = sorted(set(range(top + 1)) - set(np.unique(arrays["train_labels"]).tolist()))
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
            raise DatasetError(
                f"'{files['train_labels']}' has labels up to {top}, but {len(missing)} of those "
                f"{top + 1} classes have no training example ({shown}); labels must be class "
                "indices 0..K-1. For Fashion-MNIST set data.format=fashion-mnist, else relabel "
                "the files"
            )
    classes = classes or [str(i) for i in range(top + 1)]
    return ImageDataset(
        name or root.name,
        list(classes),
        torch.from_numpy(arrays["train_images"]).unsqueeze(1),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        torch.from_numpy(arrays["test_images"]).unsqueeze(1),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
    )
