"""CIFAR-10 in the official python-batches format: ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz``.

The download (for users who are online) fetches the official archive, checks its MD5 and renames it
into place only when complete; without a network it fails within seconds with a clear message.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bigbatch.data.dataset import DatasetError, ImageDataset

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
FOLDER_NAME = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def find_cifar10(path: Path) -> Path | None:
    """The batches folder or the archive at ``path`` or directly inside it."""
    candidates = [path, path / FOLDER_NAME, path / ARCHIVE_NAME]
    for c in candidates:
        if c.is_file() and c.name.endswith((".tar.gz", ".tgz")):
            return c
        if c.is_dir() and (c / TEST_BATCH).exists():
            return c
    return None


def _unpickle(data: bytes, where: str) -> tuple[np.ndarray, list[int]]:
    try:
        batch = pickle.loads(data, encoding="bytes")
        images = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = list(batch[b"labels"])
    except Exception as exc:  # a damaged pickle raises many types
        raise DatasetError(f"CIFAR-10 batch {where} is corrupt ({type(exc).__name__}: {exc}); download it again") from None
    if images.ndim != 2 or images.shape[1] != 3072 or len(labels) != images.shape[0]:
        raise DatasetError(f"CIFAR-10 batch {where} has shape {images.shape}, expected [N, 3072] with N labels; download it again")
    return images, labels


def load_cifar10(path: str | Path) -> ImageDataset:
    path = Path(path)
    source = find_cifar10(path)
    if source is None:
        raise DatasetError(
            f"no CIFAR-10 at '{path}': expected {FOLDER_NAME}/ or {ARCHIVE_NAME} there. Pass "
            f"--set data.download=true when online, or point data.path at an existing copy"
        )
    read: Callable[[str], bytes]
    if source.is_file():
        try:
            tar = tarfile.open(source, "r:gz")
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DatasetError(f"'{source}' is not a readable tar.gz ({exc}); delete it and download it again") from None

        def read(name: str) -> bytes:
            if name not in members:
                raise DatasetError(f"'{source}' has no member {name}; it is not the official CIFAR-10 archive")
            try:
                return tar.extractfile(members[name]).read()  # type: ignore[union-attr]
            except (tarfile.TarError, OSError, EOFError, OSError) as exc:
                raise DatasetError(f"cannot read {name} from '{source}' ({exc}); the archive is damaged, download it again") from None
    else:
        tar = None

        def read(name: str) -> bytes:
            file = source / name
            if not file.is_file():
                raise DatasetError(f"missing CIFAR-10 file '{file}'; the folder is incomplete, download it again")
            return file.read_bytes()

    try:
        splits = {}
        for split, names in (("train", TRAIN_BATCHES), ("test", [TEST_BATCH])):
            parts = [_unpickle(read(n), f"'{n}' in '{source}'") for n in names]
            images = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
            labels = [label for p in parts for label in p[1]]
            splits[split] = (torch.from_numpy(images.copy()), torch.tensor(labels, dtype=torch.int64))
    finally:
        if tar is not None:
            tar.close()
    return ImageDataset("cifar10", list(CLASSES), *splits["train"], *splits["test"])


def download_cifar10(dest: str | Path, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5, timeout_s: float = 10.0) -> Path:
    """Fetch the official archive into ``dest`` (a directory), verified, written atomically."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / ARCHIVE_NAME
    fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{ARCHIVE_NAME}.", suffix=".part")
    digest = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise DatasetError(f"downloaded {url} but its MD5 is {digest.hexdigest()}, expected {md5}; try again later")
        os.replace(tmp, target)
    except DatasetError:
        Path(tmp).unlink(missing_ok=True)
        raise
    except (OSError, ValueError) as exc:
        Path(tmp).unlink(missing_ok=True)
        raise DatasetError(
            f"could not download CIFAR-10 from {url}: {exc}. Download {ARCHIVE_NAME} by hand into '{dest}' "
            "or point data.path at an existing copy"
        ) from None
    return target
