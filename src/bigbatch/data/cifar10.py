"""CIFAR-10 in the official python-batches format: ``cifar-10-batches-py/`` or
``cifar-10-python.tar.gz``.

The archive is read in one pass over its members, with no extraction: a gzip stream cannot seek
backwards cheaply, so the batches are collected in whatever order the tar holds them. Batches are
pickles, so they are unpickled with an allow-list that admits only the numpy array machinery: a
doctored file cannot run code.

The download (for users who are online) fetches the official archive, checks its MD5 and renames it
into place only when complete; without a network it fails within seconds with a clear message.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import pickle
import socket
import tarfile
import threading
import urllib.parse
import urllib.request
import zlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from bigbatch.data.dataset import DatasetError, ImageDataset
from bigbatch.io import atomic_file

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
FOLDER_NAME = "cifar-10-batches-py"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
GET_HINT = (
    "pass --set runtime.download=true when online, or point data.path at cifar-10-python.tar.gz "
    "or cifar-10-batches-py/"
)


def is_archive_name(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def find_cifar10(path: Path) -> Path | None:
    """The batches folder or the archive at ``path`` or directly inside it."""
    for candidate in (path, path / FOLDER_NAME, path / ARCHIVE_NAME):
        if candidate.is_file() and is_archive_name(candidate):
            return candidate
        if candidate.is_dir() and (candidate / TEST_BATCH).is_file():
            return candidate
    return None


class _BatchUnpickler(pickle.Unpickler):
    """Admits only what CIFAR-10 batches are made of: containers, bytes and numpy arrays."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),  # protocol 5 arrays
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how protocol 2 spells a bytes object
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}, which a CIFAR-10 batch never contains"
        )


def _field(batch: dict, key: str) -> Any:
    # The official files were pickled by Python 2, with byte-string keys; re-pickled copies use
    # str keys.
    return batch[key.encode()] if key.encode() in batch else batch[key]


def _unpickle(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
        images = np.asarray(_field(batch, "data"), dtype=np.uint8)
        labels = np.asarray(_field(batch, "labels"), dtype=np.int64)
    except Exception as exc:  # a damaged pickle can raise almost anything
        raise DatasetError(
            f"CIFAR-10 batch {where} is corrupt ({type(exc).__name__}: {exc}); download it again"
        ) from None
    if images.ndim != 2 or images.shape[1] != 3 * 32 * 32 or labels.shape != (images.shape[0],):
        raise DatasetError(
            f"CIFAR-10 batch {where} holds data {images.shape} and {labels.shape[0]} labels, "
            "expected [N, 3072] with N labels; download it again"
        )
    if labels.size and not 0 <= labels.min() <= labels.max() < len(CLASSES):
        raise DatasetError(f"CIFAR-10 batch {where} has labels outside 0..9; download it again")
    return images, labels


def _read_members(source: Path) -> dict[str, bytes]:
    """The batch files by base name, from the folder or in one pass over the archive."""
    wanted = {*TRAIN_BATCHES, TEST_BATCH}
    if source.is_dir():
        try:
            return {
                name: (source / name).read_bytes() for name in wanted if (source / name).is_file()
            }
        except OSError as exc:
            raise DatasetError(
                f"cannot read CIFAR-10 batches in '{source}' ({exc}); check the files' permissions"
            ) from None
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(source, "r:*") as tar:
            for member in tar:
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and name in wanted and name not in found:
                    found[name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DatasetError(
            f"'{source}' is not a readable tar archive ({exc}); delete it and download it again"
        ) from None
    return found


def load_cifar10(path: str | Path) -> ImageDataset:
    """CIFAR-10 from the batches folder, the archive, or a directory holding either."""
    path = Path(path)
    source = find_cifar10(path)
    if source is None:
        raise DatasetError(
            f"no CIFAR-10 at '{path}': expected {FOLDER_NAME}/ or {ARCHIVE_NAME} there; {GET_HINT}"
        )
    members = _read_members(source)
    splits = {}
    for split, names in (("train", TRAIN_BATCHES), ("test", [TEST_BATCH])):
        parts = []
        for name in names:
            if name not in members:
                raise DatasetError(
                    f"'{source}' has no {name}; the copy is incomplete, download it again"
                )
            parts.append(_unpickle(members.pop(name), f"'{name}' in '{source}'"))
        # Rows are R, G, B planes.
        images = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([p[1] for p in parts])
        splits[split] = (torch.from_numpy(images), torch.from_numpy(labels))
    # batches.meta only repeats the published class names, so it is not read.
    return ImageDataset("cifar10", list(CLASSES), *splits["train"], *splits["test"])


def _resolve_host(url: str, timeout_s: float) -> None:
    """Look the host up with a deadline: urllib's timeout does not cover DNS, which can hang
    offline."""
    host = urllib.parse.urlsplit(url).hostname
    if not host:
        return
    outcome: list[BaseException | None] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, None)
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=lookup, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        raise TimeoutError(f"looking up {host} took more than {timeout_s:g} s")
    if outcome[0] is not None:
        raise outcome[0]


def download_cifar10(
    dest: str | Path, url: str | None = None, md5: str | None = None, timeout_s: float = 10.0
) -> Path:
    """Fetch the official archive, verified, written atomically; returns the archive's path.

    ``dest`` is a directory (the archive lands in it as cifar-10-python.tar.gz) or the archive's
    own path. ``url``/``md5`` default to the official ones (read at call time, so tests can point
    them elsewhere). ``timeout_s`` bounds the host lookup, the connection and each read.
    """
    url, md5 = url or CIFAR10_URL, md5 or CIFAR10_MD5
    dest = Path(dest)
    target = dest if is_archive_name(dest) else dest / ARCHIVE_NAME
    created = not target.parent.exists()
    digest = hashlib.md5()
    try:
        with atomic_file(target, "wb") as out:
            if urllib.parse.urlsplit(url).scheme in ("http", "https"):
                _resolve_host(url, timeout_s)
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != md5:
                raise DatasetError(
                    f"downloaded {url} but its MD5 is {digest.hexdigest()}, expected {md5}; the "
                    f"transfer was damaged, try again or download it by hand to '{target}'"
                )
    except BaseException as exc:
        if created:
            try:
                target.parent.rmdir()  # leave no empty folder behind a failed first download
            except OSError:
                pass
        if isinstance(exc, (OSError, ValueError, http.client.HTTPException)):
            raise DatasetError(
                f"could not download CIFAR-10 from {url}: {exc}; download it by hand to '{target}' "
                "or point data.path at an existing copy"
            ) from None
        raise
    return target
