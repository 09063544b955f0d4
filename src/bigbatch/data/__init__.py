"""Datasets, each loaded once into memory as uint8 tensors: ``load_dataset(format, path, ...)``.

One entry point for every format, so the config names a dataset with two strings (data.format,
data.path) and everything downstream sees the same ``ImageDataset``. Decoded file datasets can be
cached (``cache_dir``): decoding the 60,000-image JPEG zip costs seconds on every run, reading the
cached tensors a fraction of a second.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

from bigbatch.config import DATA_FORMATS
from bigbatch.data.cifar10 import (
    FOLDER_NAME,
    GET_HINT,
    download_cifar10,
    find_cifar10,
    is_archive_name,
    load_cifar10,
)
from bigbatch.data.dataset import DatasetError, ImageDataset, apply_limits
from bigbatch.data.folder import load_image_folder
from bigbatch.data.idx import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_HINT,
    FASHION_MNIST_PATH,
    FILES,
    find_idx_file,
    load_idx,
)
from bigbatch.data.synthetic import DEFAULT_TEST, DEFAULT_TRAIN, make_synthetic
from bigbatch.io import atomic_torch_save

DATASET_FORMATS = tuple(f for f in DATA_FORMATS if f != "auto")
CACHE_VERSION = 2  # bump when a loader's output changes, so old cache files are not reused
MISSING_HINTS = {
    "cifar10": GET_HINT,
    "fashion-mnist": FASHION_MNIST_HINT,
    "image-folder": "point data.path at a directory or .zip holding train/<class>/ and "
    "test/<class>/ image folders",
    "idx": f"point data.path at a folder holding {', '.join(FILES.values())} (each may be .gz)",
}


def detect_format(path: Path) -> str:
    """The format a path holds: a .zip or a folder with train/ is an image folder, and so on."""
    if path.suffix.lower() == ".zip":
        return "image-folder"
    if is_archive_name(path) or path.name == FOLDER_NAME or find_cifar10(path) is not None:
        return "cifar10"
    if path.is_dir() and (path / "train").is_dir():
        return "image-folder"
    if path.is_dir() and find_idx_file(path, FILES["train_images"]) is not None:
        return "idx"
    if not path.exists():
        raise DatasetError(
            f"dataset path '{path}' does not exist; point data.path at a CIFAR-10 archive or "
            "folder, an image "
            "folder (directory or .zip), or a directory of IDX files"
        )
    raise DatasetError(
        f"cannot tell what dataset '{path}' holds (no .zip, train/ folder, CIFAR-10 batches or IDX "
        "files); "
        f"set data.format to one of {', '.join(DATASET_FORMATS)}"
    )


def _fingerprint(path: Path) -> str:
    """Size and mtime of the file, or of every file under the directory: changes when the data
    does."""
    if path.is_file():
        stat = path.stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha1()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            stat = os.stat(os.path.join(root, name))
            digest.update(
                f"{os.path.relpath(os.path.join(root, name), path)}:{stat.st_size}:"
                f"{stat.st_mtime_ns}\n".encode()
            )
    return digest.hexdigest()


def cache_file(
    cache_dir: Path, fmt: str, source: Path, train_limit: int | None, test_limit: int | None
) -> Path:
    """Where the decoded tensors of ``source`` with these limits are cached."""
    parts = (
        f"v{CACHE_VERSION}",
        fmt,
        source.resolve(),
        _fingerprint(source),
        train_limit,
        test_limit,
    )
    key = "|".join(map(str, parts))
    return (
        cache_dir
        / f"{fmt}-{source.name.split('.')[0]}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"
    )


def _read_cache(file: Path) -> ImageDataset | None:
    try:
        return ImageDataset(**torch.load(file, weights_only=True))
    except Exception:  # a damaged, partial or foreign cache file is rebuilt, never fatal
        return None


def _write_cache(file: Path, ds: ImageDataset) -> None:
    try:
        atomic_torch_save(file, dict(vars(ds)))
    except Exception as exc:  # a cache that cannot be written only costs speed
        warnings.warn(
            f"could not write the dataset cache '{file}' ({exc}); the next run decodes the data "
            "again",
            stacklevel=3,
        )


def _load_uncached(
    fmt: str, source: Path, train_limit: int | None, test_limit: int | None
) -> ImageDataset:
    if fmt == "image-folder":
        return load_image_folder(source, train_limit, test_limit)  # limits applied before decoding
    if fmt == "cifar10":
        ds = load_cifar10(source)
    elif fmt == "fashion-mnist":
        ds = load_idx(source, FASHION_MNIST_CLASSES, "fashion-mnist", FASHION_MNIST_HINT)
    else:
        ds = load_idx(source)
    return apply_limits(ds, train_limit, test_limit)


def _check_limit(name: str, value: int | None) -> int | None:
    if value is not None and value < 0:
        raise DatasetError(
            f"{name} is {value}; use a positive count, or 0 / None for the whole split"
        )
    return value or None


def load_dataset(
    format: str,
    path: str | Path | None,
    *,
    download: bool = False,
    train_limit: int | None = None,
    test_limit: int | None = None,
    cache_dir: str | Path | None = None,
    seed: int = 0,
) -> ImageDataset:
    """Load a dataset by format ("auto" detects it from the path).

    ``train_limit``/``test_limit`` take class-balanced subsets (the first examples of each class
    in file order; 0 or None means all). ``download`` fetches CIFAR-10 when no local copy exists.
    With ``cache_dir``, decoded tensors of file datasets are kept there, keyed by path, size,
    mtime and limits. ``seed`` only matters for "synthetic", which ignores ``path`` and makes
    3x32x32 images of 10 classes (train_limit/test_limit examples, default 2000/500).
    """
    train_limit, test_limit = (
        _check_limit("train_limit", train_limit),
        _check_limit("test_limit", test_limit),
    )
    if format not in DATASET_FORMATS and format != "auto":
        raise DatasetError(
            f"unknown dataset format '{format}'; set data.format to one of auto, "
            f"{', '.join(DATASET_FORMATS)}"
        )
    if format == "synthetic":
        return make_synthetic(train_limit or DEFAULT_TRAIN, test_limit or DEFAULT_TEST, seed=seed)
    if format == "fashion-mnist" and not path:
        path = FASHION_MNIST_PATH
    if format in ("auto", "cifar10") and not path and cache_dir:
        # No path given: CIFAR-10 lives (and is downloaded) in the user's cache.
        format, path = "cifar10", Path(cache_dir) / "cifar10"
    if path is None or str(path) == "":
        hint = MISSING_HINTS.get(
            format, "point data.path at the dataset, or set data.format=synthetic"
        )
        raise DatasetError(f"data.path is empty, so there is no {format} dataset to load; {hint}")
    path = Path(path).expanduser()
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "cifar10":
        found = find_cifar10(path)
        if found is None and download:
            # A path naming the archive gets the archive; a folder (or a batches folder's parent)
            # gets it inside.
            found = download_cifar10(
                path if is_archive_name(path) else path.parent if path.name == FOLDER_NAME else path
            )
        if found is None:
            what = (
                "does not exist"
                if not path.exists()
                else f"holds neither {FOLDER_NAME}/ nor cifar-10-python.tar.gz"
            )
            raise DatasetError(f"CIFAR-10 path '{path}' {what}; {GET_HINT}")
        source = found
    else:
        if not path.exists():
            raise DatasetError(f"{fmt} dataset path '{path}' does not exist; {MISSING_HINTS[fmt]}")
        source = path
    cache = cache_file(Path(cache_dir), fmt, source, train_limit, test_limit) if cache_dir else None
    if cache is not None and cache.is_file():
        cached = _read_cache(cache)
        if cached is not None:
            return cached
    ds = _load_uncached(fmt, source, train_limit, test_limit)
    if cache is not None:
        _write_cache(cache, ds)
    return ds


__all__ = [
    "DATASET_FORMATS",
    "DatasetError",
    "ImageDataset",
    "detect_format",
    "load_dataset",
    "make_synthetic",
]
