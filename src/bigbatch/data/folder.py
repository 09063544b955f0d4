"""Image-folder datasets: ``train/<class>/*.{png,jpg,...}`` and ``test/<class>/*``, in a directory or a .zip.

Classes are sorted by name (for the CIFAR-10 JPEG copy that is CIFAR-10's own label order). Every
image must have the size and mode of the first one; images are decoded straight into one
preallocated uint8 array, then put in a fixed shuffled order (the same on every load).
"""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from bigbatch.data.dataset import DatasetError, ImageDataset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SPLITS = ("train", "test")


def _group(entries: list[tuple[str, str, str]], where: str) -> dict[str, dict[str, list[str]]]:
    """(split, class, member) triples -> split -> class -> sorted members."""
    out: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
    for split, cls, member in entries:
        out[split].setdefault(cls, []).append(member)
    for split in SPLITS:
        if not out[split]:
            raise DatasetError(
                f"no images under '{split}/<class>/' in '{where}'; an image folder needs "
                "train/<class>/*.png|jpg and test/<class>/* (e.g. train/cat/0001.jpg)"
            )
        for members in out[split].values():
            members.sort()
    if set(out["train"]) != set(out["test"]):
        raise DatasetError(
            f"'{where}': train and test have different classes "
            f"(train only: {sorted(set(out['train']) - set(out['test']))}, test only: {sorted(set(out['test']) - set(out['train']))})"
        )
    return out


def _split_member(parts: tuple[str, ...]) -> tuple[str, str] | None:
    # Tolerate one leading folder (archives often wrap everything in "<name>/").
    for offset in (0, 1):
        rest = parts[offset:]
        if len(rest) == 3 and rest[0] in SPLITS and Path(rest[2]).suffix.lower() in IMAGE_SUFFIXES:
            return rest[0], rest[1]
    return None


def _list_zip(zf: zipfile.ZipFile) -> list[tuple[str, str, str]]:
    entries = []
    for name in zf.namelist():
        hit = _split_member(PurePosixPath(name).parts)
        if hit:
            entries.append((*hit, name))
    return entries


def _list_dir(root: Path) -> list[tuple[str, str, str]]:
    entries = []
    for split in SPLITS:
        for path in (root / split).glob("*/*"):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                entries.append((split, path.parent.name, str(path)))
    return entries


def _decode_all(
    members: list[str], read: Callable[[str], bytes], describe: Callable[[str], str], mode: str | None, size: tuple[int, int] | None
) -> tuple[np.ndarray, str, tuple[int, int]]:
    array: np.ndarray | None = None
    bar = tqdm(members, desc="decoding images", unit="img", disable=not sys.stderr.isatty(), leave=False, mininterval=0.5)
    for i, member in enumerate(bar):
        try:
            with Image.open(io.BytesIO(read(member))) as img:
                if mode is None:
                    mode = "L" if img.mode in ("L", "1", "I;16", "I") else "RGB"
                    size = img.size
                if img.size != size:
                    raise DatasetError(f"image {describe(member)} is {img.size[0]}x{img.size[1]} but the dataset's images are {size[0]}x{size[1]}; resize it or remove it")
                pixels = np.asarray(img.convert(mode))
        except DatasetError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, zipfile.BadZipFile) as exc:
            raise DatasetError(f"cannot decode image {describe(member)}: {exc}; replace or remove the file") from None
        if array is None:
            assert size is not None
            array = np.empty((len(members), size[1], size[0], 1 if mode == "L" else 3), dtype=np.uint8)
        array[i] = pixels.reshape(array.shape[1:])
    assert array is not None and mode is not None and size is not None
    return array, mode, size


def _per_class_limit(limit: int | None, num_classes: int, index: int) -> int | None:
    if not limit:
        return None
    return limit // num_classes + (1 if index < limit % num_classes else 0)


def load_image_folder(path: str | Path, train_limit: int | None = None, test_limit: int | None = None) -> ImageDataset:
    path = Path(path)
    if path.is_file():
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DatasetError(f"'{path}' is not a readable .zip archive ({exc}); check the file or download it again") from None
        entries = _list_zip(zf)
        read: Callable[[str], bytes] = zf.read
        describe: Callable[[str], str] = lambda m: f"'{m}' in '{path}'"  # noqa: E731
    elif path.is_dir():
        zf = None
        entries = _list_dir(path)
        read = lambda m: Path(m).read_bytes()  # noqa: E731
        describe = lambda m: f"'{m}'"  # noqa: E731
    else:
        raise DatasetError(f"image folder '{path}' does not exist; pass a directory or .zip with train/<class>/ and test/<class>/")
    try:
        grouped = _group(entries, str(path))
        classes = sorted(grouped["train"])
        mode, size = None, None
        tensors = {}
        for split, limit in (("train", train_limit), ("test", test_limit)):
            members, labels = [], []
            for index, cls in enumerate(classes):
                chosen = grouped[split][cls][: _per_class_limit(limit, len(classes), index)]
                members += chosen
                labels += [index] * len(chosen)
            array, mode, size = _decode_all(members, read, describe, mode, size)
            # Folders are sorted by class; a fixed shuffle makes any prefix of the split (a
            # train-accuracy subset, the examples an analysis uses) hold every class.
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
            images = torch.from_numpy(array).permute(0, 3, 1, 2)[order].contiguous()
            tensors[split] = (images, torch.tensor(labels, dtype=torch.int64)[order])
    finally:
        if zf is not None:
            zf.close()
    return ImageDataset(path.stem, classes, *tensors["train"], *tensors["test"])
