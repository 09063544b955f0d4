"""Image-folder datasets: ``train/<class>/*.{png,jpg,jpeg,bmp}`` and ``test/<class>/*``, a directory
or a .zip.

Classes are sorted by name (for the CIFAR-10 JPEG copy that is CIFAR-10's own label order). The
first training image fixes the mode (grayscale -> 1 channel, anything else -> RGB) and the size;
every other image is converted to that mode and must have that size.

Decoding tens of thousands of small images is dominated by per-image overhead, so: a stored
(uncompressed) zip member is sliced straight out of a memory map (CRC still checked) instead of
going through zipfile's per-member machinery, the format is hinted from the suffix so Pillow does
not probe every plugin, pixels go straight into one preallocated uint8 array, and a few threads
share the work (Pillow releases the GIL while decoding). With limits, only the chosen images are
decoded.

Folders are listed class by class; the loaded splits are put in a fixed shuffled order (the same on
every load) so that any prefix of a split, such as the subset the trainer measures training
accuracy on, holds every class.
"""

from __future__ import annotations

import io
import mmap
import os
import struct
import sys
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from bigbatch.data.dataset import DatasetError, ImageDataset, per_class_quota

SPLITS = ("train", "test")
# Suffix -> the Pillow format to try first (a wrong suffix still decodes: Pillow then probes all).
IMAGE_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
}
GRAYSCALE_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
LAYOUT_HINT = (
    "an image folder needs train/<class>/*.png|jpg and test/<class>/* (e.g. train/cat/0001.jpg)"
)
PARALLEL_MIN_IMAGES = 2000  # below this, thread start-up costs more than it saves
MAX_DECODE_THREADS = 8  # beyond this the GIL-held part of each decode dominates
# Bounds that keep a hostile or mistaken archive from taking the machine's memory: one image file,
# its inflation ratio (image formats are compressed already), and its decoded pixels.
MAX_MEMBER_BYTES = 64 << 20
MAX_INFLATION = 200
MAX_IMAGE_PIXELS = 4096 * 4096


@dataclass
class _Entry:
    split: str
    cls: str
    member: str  # a path for folders, a member name for zips


def _is_hidden(parts: list[str] | tuple[str, ...]) -> bool:
    # macOS archives carry __MACOSX/ and ._name resource forks that look like images but are not.
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _suffix(name: str) -> str:
    # Plain string work: pathlib objects cost more than the rest of listing 60,000 members.
    dot = name.rfind(".")
    return name[dot:].lower() if dot > name.rfind("/") else ""


def _entry(parts: list[str], member: str) -> _Entry | None:
    if len(parts) == 3 and parts[0] in SPLITS and _suffix(parts[2]) in IMAGE_FORMATS:
        return _Entry(parts[0], parts[1], member)
    return None


class _ZipSource:
    """Members of a zip: stored ones sliced from a memory map, compressed ones through zipfile."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise DatasetError(
                f"'{path}' is not a readable .zip archive ({exc}); check the file or download it "
                "again"
            ) from None
        with open(path, "rb") as file:  # the map keeps its own reference to the file
            self.map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        self.infos = {info.filename: info for info in self.zf.infolist() if not info.is_dir()}

    def list(self) -> list[_Entry]:
        # Tolerate one top-level folder around train/ and test/ (archives of a folder have one).
        by_prefix: dict[str, list[_Entry]] = {}
        for name in self.infos:
            parts = [p for p in name.split("/") if p]
            if _is_hidden(parts):
                continue
            for prefix_len in (0, 1):
                entry = _entry(parts[prefix_len:], name)
                if entry is not None:
                    by_prefix.setdefault("/".join(parts[:prefix_len]), []).append(entry)
                    break
        if len(by_prefix) > 1:
            roots = ", ".join(f"'{p}/'" if p else "the top level" for p in sorted(by_prefix))
            raise DatasetError(
                f"'{self.path}' holds train/ and test/ folders in several places ({roots}); keep "
                "one"
            )
        return next(iter(by_prefix.values()), [])

    def read(self, name: str) -> bytes:
        info = self.infos[name]
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > MAX_MEMBER_BYTES or ratio > MAX_INFLATION:
            raise DatasetError(
                f"member {self.describe(name)} declares {info.file_size} bytes from "
                f"{info.compress_size} compressed (limits: {MAX_MEMBER_BYTES} bytes, "
                f"{MAX_INFLATION}x); it is not an image of a dataset: remove it"
            )
        offset = info.header_offset
        if (
            info.compress_type != zipfile.ZIP_STORED
            or info.flag_bits & 0x1
            or self.map[offset : offset + 4] != b"PK\x03\x04"
        ):
            # Compressed or unusual: zipfile knows best (and raises its own errors).
            return self.zf.read(info)
        name_len, extra_len = struct.unpack_from("<HH", self.map, offset + 26)
        start = offset + 30 + name_len + extra_len
        data = self.map[start : start + info.compress_size]
        if len(data) != info.file_size or zlib.crc32(data) != info.CRC:
            raise zipfile.BadZipFile(f"bad CRC-32 or size for member {name}")
        return data

    def describe(self, name: str) -> str:
        return f"'{name}' in '{self.path}'"

    def close(self) -> None:
        self.map.close()
        self.zf.close()


class _DirSource:
    def __init__(self, path: Path):
        self.path = path

    def list(self) -> list[_Entry]:
        entries = []
        for split in SPLITS:
            for file in (self.path / split).glob("*/*"):
                rel = list(file.relative_to(self.path).parts)
                if not _is_hidden(rel) and file.is_file():
                    entry = _entry(rel, str(file))
                    if entry is not None:
                        entries.append(entry)
        return entries

    def read(self, name: str) -> bytes:
        return Path(name).read_bytes()

    def describe(self, name: str) -> str:
        return f"'{name}'"

    def close(self) -> None:
        pass


def _group(entries: list[_Entry], where: Path) -> tuple[list[str], dict[str, dict[str, list[str]]]]:
    """Sorted class names, and split -> class -> members sorted by name."""
    grouped: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
    for e in entries:
        grouped[e.split].setdefault(e.cls, []).append(e.member)
    for split in SPLITS:
        if not grouped[split]:
            raise DatasetError(f"no images under '{split}/<class>/' in '{where}'; {LAYOUT_HINT}")
        for members in grouped[split].values():
            members.sort()
    unknown = sorted(set(grouped["test"]) - set(grouped["train"]))
    if unknown:
        raise DatasetError(
            f"'{where}': test/ has classes with no training images ({', '.join(unknown)}); add "
            "train/<class>/ images or remove them"
        )
    return sorted(grouped["train"]), grouped


class _Decoder:
    """Decodes members into rows of a uint8 [N, H, W, C] array, checking mode and size."""

    def __init__(self, source: _ZipSource | _DirSource):
        self.source = source
        self.mode: str | None = None
        self.size: tuple[int, int] | None = None  # (width, height), as Pillow reports it

    def open(self, member: str) -> Image.Image:
        data = self.source.read(member)
        hint = IMAGE_FORMATS.get(_suffix(member.replace(os.sep, "/")))
        try:
            img = Image.open(io.BytesIO(data), formats=[hint] if hint else None)
        except UnidentifiedImageError:
            img = Image.open(io.BytesIO(data))  # the suffix lied; let Pillow probe every format
        if img.width * img.height > MAX_IMAGE_PIXELS:  # read from the header, before decoding
            raise DatasetError(
                f"image {self.source.describe(member)} is {img.width}x{img.height}, over the "
                f"{MAX_IMAGE_PIXELS}-pixel limit for dataset images; resize or remove it"
            )
        img.load()
        return img

    def pixels(self, member: str) -> np.ndarray:
        try:
            img = self.open(member)
            if self.mode is None:
                self.mode = "L" if img.mode in GRAYSCALE_MODES else "RGB"
                self.size = img.size
            if img.size != self.size:
                assert self.size is not None
                raise DatasetError(
                    f"image {self.source.describe(member)} is {img.size[0]}x{img.size[1]} but the "
                    "dataset's images are "
                    f"{self.size[0]}x{self.size[1]} (width x height); resize it or remove it"
                )
            if img.mode != self.mode:
                img = img.convert(self.mode)
            return np.frombuffer(img.tobytes(), dtype=np.uint8)
        except DatasetError:
            raise
        except Exception as exc:  # decoders of arbitrary files raise many types
            raise DatasetError(
                f"cannot decode image {self.source.describe(member)}: {exc}; replace or remove the "
                "file"
            ) from None

    def decode_into(self, out: np.ndarray, members: list[str], slots: list[int]) -> int:
        for member, slot in zip(members, slots):
            out[slot] = self.pixels(member).reshape(out.shape[1:])
        return len(members)


def _decode_threads(count: int) -> int:
    if count < PARALLEL_MIN_IMAGES:
        return 1
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    return max(1, min(MAX_DECODE_THREADS, cores))


def _decode_split(
    decoder: _Decoder, members: list[str], slots: list[int], out: np.ndarray, bar: tqdm
) -> None:
    threads = _decode_threads(len(members))
    step = max(64, len(members) // (threads * 16))  # small chunks keep threads busy to the end
    chunks = [(members[i : i + step], slots[i : i + step]) for i in range(0, len(members), step)]

    def run(chunk: tuple[list[str], list[int]]) -> int:
        return decoder.decode_into(out, *chunk)

    if threads == 1:
        for chunk in chunks:
            bar.update(run(chunk))
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="bigbatch-decode")
    try:
        # In order, so the first bad file in file order is reported.
        for done in pool.map(run, chunks):
            bar.update(done)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def load_image_folder(
    path: str | Path, train_limit: int | None = None, test_limit: int | None = None
) -> ImageDataset:
    """An image folder (directory or .zip); limits take the first k images of each class."""
    path = Path(path)
    if path.is_file():
        source: _ZipSource | _DirSource = _ZipSource(path)
    elif path.is_dir():
        source = _DirSource(path)
    else:
        raise DatasetError(
            f"image folder '{path}' does not exist; pass a directory or .zip with train/<class>/ "
            "and test/<class>/"
        )
    try:
        classes, grouped = _group(source.list(), path)
        chosen: dict[str, tuple[list[str], list[int]]] = {}
        for split, limit in (("train", train_limit), ("test", test_limit)):
            members: list[str] = []
            labels: list[int] = []
            for index, cls in enumerate(classes):
                files = grouped[split].get(cls, [])
                files = files[: per_class_quota(limit, len(classes), index)] if limit else files
                members += files
                labels += [index] * len(files)
            chosen[split] = (members, labels)
        decoder = _Decoder(source)
        # The first image fixes mode and size before the parallel part.
        first = decoder.pixels(chosen["train"][0][0])
        assert decoder.size is not None
        width, height = decoder.size
        channels = first.size // (width * height)
        total = sum(len(m) for m, _ in chosen.values())
        tensors = {}
        with tqdm(
            total=total,
            desc="decoding images",
            unit="img",
            disable=not sys.stderr.isatty(),
            leave=False,
            mininterval=0.5,
        ) as bar:
            for split, (members, labels) in chosen.items():
                # Decode member i straight into its row of the fixed shuffle: order[j] is the member
                # at row j.
                order = torch.randperm(len(members), generator=torch.Generator().manual_seed(0))
                slots = torch.argsort(order).tolist()
                out = np.empty((len(members), height, width, channels), dtype=np.uint8)
                _decode_split(decoder, members, slots, out, bar)
                images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
                tensors[split] = (images, torch.tensor(labels, dtype=torch.int64)[order])
    finally:
        source.close()
    return ImageDataset(path.stem, classes, *tensors["train"], *tensors["test"])
