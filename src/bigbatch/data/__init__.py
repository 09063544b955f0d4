"""Datasets, each loaded once into memory as uint8 tensors: ``load_dataset(format, path, ...)``."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from bigbatch.data.cifar10 import download_cifar10, find_cifar10, load_cifar10
from bigbatch.data.dataset import DatasetError, ImageDataset, apply_limits
from bigbatch.data.folder import load_image_folder
from bigbatch.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_PATH, FILES, find_idx_file, load_idx
from bigbatch.data.synthetic import make_synthetic

DATASET_FORMATS = ("cifar10", "image-folder", "idx", "fashion-mnist", "synthetic")


def detect_format(path: Path) -> str:
    if path.is_file() and path.suffix.lower() == ".zip":
        return "image-folder"
    if find_cifar10(path) is not None:
        return "cifar10"
    if path.is_dir() and (path / "train").is_dir() and (path / "test").is_dir():
        return "image-folder"
    if path.is_dir() and find_idx_file(path, FILES["train_images"]) is not None:
        return "idx"
    if not path.exists():
        raise DatasetError(
            f"dataset path '{path}' does not exist; point data.path at a CIFAR-10 archive or folder, an image "
            "folder (directory or .zip), or a directory of IDX files"
        )
    raise DatasetError(
        f"cannot tell what dataset '{path}' is; set data.format to one of {', '.join(DATASET_FORMATS)}"
    )


def _load_uncached(fmt: str, path: Path, download: bool, train_limit: int | None, test_limit: int | None) -> ImageDataset:
    if fmt == "cifar10":
        if find_cifar10(path) is None and download:
            download_cifar10(path if path.suffix == "" else path.parent)
        return apply_limits(load_cifar10(path), train_limit, test_limit)
    if fmt == "image-folder":
        # Limits are applied while listing, so unneeded images are never decoded.
        return load_image_folder(path, train_limit, test_limit)
    if fmt == "fashion-mnist":
        return apply_limits(load_idx(path, FASHION_MNIST_CLASSES, "fashion-mnist"), train_limit, test_limit)
    return apply_limits(load_idx(path), train_limit, test_limit)


def _cache_file(cache_dir: Path, fmt: str, path: Path, train_limit: int | None, test_limit: int | None) -> Path:
    stat = path.stat()
    key = f"{fmt}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{train_limit}|{test_limit}"
    return cache_dir / f"{fmt}-{path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"


def _read_cache(file: Path) -> ImageDataset | None:
    try:
        return ImageDataset(**torch.load(file, weights_only=True))
    except Exception:  # a damaged or stale cache is rebuilt, never fatal
        return None


def _write_cache(file: Path, ds: ImageDataset) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ds.__dict__, f)
        os.replace(tmp, file)
    except OSError:
        Path(tmp).unlink(missing_ok=True)


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
    """Load a dataset by format ("auto" detects it from the path); limits take class-balanced subsets.

    With ``cache_dir``, decoded tensors of file-based datasets are kept there (keyed by path, size,
    mtime and limits) so that later runs skip decoding.
    """
    if format == "synthetic":
        return make_synthetic(train_limit or 2000, test_limit or 500, seed=seed)
    if format == "fashion-mnist" and not path:
        path = FASHION_MNIST_PATH
    if path is None or str(path) == "":
        raise DatasetError(f"data.path is empty; point it at the {format} dataset")
    path = Path(path)
    if format == "auto":
        format = detect_format(path)
    if format not in DATASET_FORMATS:
        raise DatasetError(f"unknown dataset format '{format}'; choose one of auto, {', '.join(DATASET_FORMATS)}")
    if not path.exists() and not (format == "cifar10" and download):
        hint = {
            "cifar10": "pass --set data.download=true when online, or point data.path at cifar-10-python.tar.gz",
            "fashion-mnist": "run `apt-get install dataset-fashion-mnist` or point data.path at the IDX files",
        }.get(format, "point data.path at the dataset")
        raise DatasetError(f"dataset path '{path}' does not exist; {hint}")
    cache = _cache_file(Path(cache_dir), format, path, train_limit, test_limit) if cache_dir and path.exists() else None
    if cache is not None and cache.exists():
        cached = _read_cache(cache)
        if cached is not None:
            return cached
    ds = _load_uncached(format, path, download, train_limit, test_limit)
    if cache is not None:
        _write_cache(cache, ds)
    return ds


__all__ = ["DATASET_FORMATS", "DatasetError", "ImageDataset", "load_dataset"]
