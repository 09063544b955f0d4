"""Image folders as directories and zips: PNG/JPEG, gray/RGB, odd sizes, bad files, limits, the
shared zip."""

import io
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bigbatch.data import DatasetError, load_dataset
from bigbatch.data.folder import load_image_folder

CIFAR_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
WIDTH, HEIGHT = 20, 12  # deliberately not square and not 32


def _encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _arrays(
    channels: int, per_class=None, classes=("dog", "cat", "bird")
) -> dict[tuple[str, str, int], np.ndarray]:
    per_class = per_class or {"train": 4, "test": 2}
    rng = np.random.default_rng(channels)
    shape = (HEIGHT, WIDTH) if channels == 1 else (HEIGHT, WIDTH, channels)
    return {
        (s, c, i): rng.integers(0, 256, shape, dtype=np.uint8)
        for s, n in per_class.items()
        for c in classes
        for i in range(n)
    }


def _smooth(arrays):
    """Low-frequency versions of the images: JPEG keeps these close, unlike random noise."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    out = {}
    for k, a in arrays.items():
        base = a.reshape(-1, a.shape[-1] if a.ndim == 3 else 1)[:2].astype(float)
        img = base[0] * (xx[..., None] / WIDTH) + base[1] * (yy[..., None] / HEIGHT) * 0.5
        out[k] = img.clip(0, 255).astype(np.uint8).reshape(a.shape)
    return out


def _write(
    tmp_path: Path,
    arrays,
    as_zip: bool,
    fmt="PNG",
    prefix="",
    name="imgs",
    junk=False,
    compression=zipfile.ZIP_STORED,
) -> Path:
    suffix = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp"}[fmt]
    files = {
        f"{prefix}{s}/{c}/{i:03d}.{suffix}": _encode(a, fmt) for (s, c, i), a in arrays.items()
    }
    if junk:  # what macOS and editors leave behind: must be ignored, not decoded
        files[f"__MACOSX/{prefix}train/dog/._000.{suffix}"] = b"resource fork"
        files[f"{prefix}train/dog/._001.{suffix}"] = b"resource fork"
        files[f"{prefix}train/dog/notes.txt"] = b"not an image"
        files[f"{prefix}README.md"] = b"readme"
    if as_zip:
        path = tmp_path / f"{name}.zip"
        with zipfile.ZipFile(path, "w", compression=compression) as zf:
            for member, data in files.items():
                zf.writestr(member, data)
    else:
        path = tmp_path / name
        for member, data in files.items():
            (path / member).parent.mkdir(parents=True, exist_ok=True)
            (path / member).write_bytes(data)
    return path


def _find(ds, split: str, want: torch.Tensor) -> list[int]:
    images = ds.train_images if split == "train" else ds.test_images
    return [j for j in range(images.shape[0]) if torch.equal(images[j], want)]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("as_zip", [False, True])
def test_png_roundtrip_is_pixel_exact(tmp_path, channels, as_zip):
    arrays = _arrays(channels)
    path = _write(tmp_path, arrays, as_zip, prefix="wrapped/" if as_zip else "", junk=True)
    ds = load_dataset("auto", path)
    assert ds.classes == ["bird", "cat", "dog"] and ds.name == "imgs"
    assert ds.train_images.shape == (12, channels, HEIGHT, WIDTH) and ds.test_images.shape == (
        6,
        channels,
        HEIGHT,
        WIDTH,
    )
    assert (
        ds.train_images.dtype == torch.uint8
        and ds.train_images.is_contiguous()
        and ds.train_labels.dtype == torch.int64
    )
    assert ds.channels == channels and ds.image_size == (HEIGHT, WIDTH)
    for (split, cls, _), expected in arrays.items():
        want = torch.from_numpy(expected).reshape(HEIGHT, WIDTH, channels).permute(2, 0, 1)
        hits = _find(ds, split, want)
        labels = ds.train_labels if split == "train" else ds.test_labels
        assert len(hits) == 1 and labels[hits[0]] == ds.classes.index(cls)
    again = load_dataset("image-folder", path)  # the fixed shuffle is the same on every load
    assert torch.equal(again.train_images, ds.train_images) and torch.equal(
        again.train_labels, ds.train_labels
    )


def test_jpeg_and_bmp_and_deflated_zip(tmp_path):
    arrays = _smooth(_arrays(3))
    jpeg = load_dataset(
        "auto", _write(tmp_path, arrays, True, fmt="JPEG", compression=zipfile.ZIP_DEFLATED)
    )
    png = load_dataset("auto", _write(tmp_path, arrays, False))
    # JPEG is lossy: close to the source, not equal.
    assert torch.equal(jpeg.train_labels, png.train_labels)
    diff = (jpeg.train_images.float() - png.train_images.float()).abs().mean()
    assert 0 < diff < 4
    bmp = load_dataset("auto", _write(tmp_path, arrays, True, fmt="BMP", name="bmp"))
    assert torch.equal(bmp.train_images, png.train_images)


def test_mode_follows_first_image_and_others_are_converted(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
    rgba = rng.integers(0, 256, (HEIGHT, WIDTH, 4), dtype=np.uint8)
    files = {
        "train/a/0.png": _encode(np.stack([gray] * 3, axis=-1)),  # first image: RGB -> 3 channels
        "train/a/1.png": _encode(gray),  # grayscale, converted to RGB
        "train/b/0.png": _encode(rgba),  # RGBA, alpha dropped
        "test/a/0.png": _encode(gray),
    }
    path = tmp_path / "mixed.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    ds = load_image_folder(path)
    assert ds.channels == 3
    assert len(_find(ds, "train", torch.from_numpy(gray).expand(3, -1, -1))) == 2
    assert len(_find(ds, "train", torch.from_numpy(rgba[..., :3]).permute(2, 0, 1))) == 1
    assert torch.equal(ds.test_images[0], torch.from_numpy(gray).expand(3, -1, -1))


def test_size_mismatch_names_file_and_sizes(tmp_path):
    arrays = _arrays(3)
    arrays[("train", "dog", 2)] = arrays[("train", "dog", 2)][:7]  # 20 wide, 7 high
    path = _write(tmp_path, arrays, as_zip=False)
    with pytest.raises(
        DatasetError, match=r"dog/002\.png' is 20x7 but the dataset's images are 20x12"
    ):
        load_dataset("image-folder", path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_names_member_and_zip(tmp_path, damage):
    arrays = _arrays(3)
    path = _write(tmp_path, arrays, as_zip=True, fmt="JPEG", prefix="top/")
    with zipfile.ZipFile(path) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    bad = "top/train/cat/001.jpg"
    files[bad] = b"garbage" if damage == "garbage" else files[bad][: len(files[bad]) // 2]
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    with pytest.raises(DatasetError, match=rf"cannot decode image '{bad}' in '.*imgs\.zip'"):
        load_dataset("auto", path)


def test_hostile_members_are_refused_before_they_take_memory(tmp_path):
    arrays = _arrays(3)
    path = _write(tmp_path, arrays, as_zip=True)
    with zipfile.ZipFile(path) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    bomb = "train/cat/001.png"
    files[bomb] = bytes(16 << 20)  # zeros deflate ~1000:1, a zip bomb in miniature
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    with pytest.raises(DatasetError, match=rf"member '{bomb}' in .*declares 16777216 bytes"):
        load_dataset("auto", path)
    # A small file whose header promises a huge image is refused before decoding.
    huge = tmp_path / "huge"
    _write(huge, _arrays(3), as_zip=False)
    Image.new("L", (5000, 4000)).save(huge / "imgs" / "train" / "cat" / "000.png")
    with pytest.raises(DatasetError, match=r"cat/000\.png' is 5000x4000, over the"):
        load_dataset("image-folder", huge / "imgs")


def test_a_large_folder_decodes_exactly_and_reports_the_first_bad_file(tmp_path):
    # 2100 training images: enough that the loader decodes them on several threads (when there
    # are several cores); every image must land with its own label, pixel for pixel.
    arrays = _arrays(3, per_class={"train": 700, "test": 5})
    path = _write(tmp_path, arrays, as_zip=True)
    ds = load_image_folder(path)
    for label, name in enumerate(ds.classes):
        written = sorted(
            a.tobytes() for (s, c, _), a in arrays.items() if s == "train" and c == name
        )
        mine = ds.train_images[ds.train_labels == label].permute(0, 2, 3, 1).numpy()
        assert sorted(m.tobytes() for m in mine) == written, name
    # Later members are listed after earlier ones: bird/950 sorts last in bird.
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("train/dog/950.png", b"bad")
        zf.writestr("train/bird/950.png", b"bad")
    with pytest.raises(DatasetError, match="train/bird/950.png"):
        load_image_folder(path)


def test_limits_are_balanced_and_skip_decoding_other_images(tmp_path):
    arrays = _arrays(3, per_class={"train": 6, "test": 3})
    path = _write(tmp_path, arrays, as_zip=True)
    full = load_image_folder(path)
    # A corrupt image past every class's quota is never decoded, so the limited load succeeds.
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("train/dog/999.png", b"corrupt, but beyond the limit")
    ds = load_dataset("image-folder", path, train_limit=7, test_limit=3)
    assert torch.bincount(ds.train_labels).tolist() == [3, 2, 2]  # remainder to the first classes
    assert torch.bincount(ds.test_labels).tolist() == [1, 1, 1]
    for split, k in (("train", {0: 3, 1: 2, 2: 2}), ("test", {0: 1, 1: 1, 2: 1})):
        for (s, cls, i), a in arrays.items():  # exactly the first k files of each class
            if s == split:
                hits = _find(ds, split, torch.from_numpy(a).permute(2, 0, 1))
                assert len(hits) == (1 if i < k[ds.classes.index(cls)] else 0)
    with pytest.raises(DatasetError, match="999.png"):
        load_image_folder(path)
    assert full.num_train == 18


def test_layout_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("image-folder", tmp_path / "missing")
    (tmp_path / "notzip.zip").write_bytes(b"nope")
    with pytest.raises(DatasetError, match=r"notzip\.zip' is not a readable \.zip"):
        load_dataset("auto", tmp_path / "notzip.zip")
    arrays = {k: v for k, v in _arrays(3).items() if k[0] == "train"}
    with pytest.raises(DatasetError, match=r"no images under 'test/<class>/'.*train/<class>"):
        load_dataset("image-folder", _write(tmp_path, arrays, as_zip=True, name="notest"))
    arrays = _arrays(3)
    arrays[("test", "zebra", 0)] = arrays[("test", "dog", 0)]
    with pytest.raises(DatasetError, match="test/ has classes with no training images.*zebra"):
        load_dataset("image-folder", _write(tmp_path, arrays, as_zip=False, name="zebra"))
    two_roots = tmp_path / "two.zip"
    png = _encode(np.zeros((4, 4), np.uint8))
    with zipfile.ZipFile(two_roots, "w") as zf:
        for root in ("a", "b"):
            for split in ("train", "test"):
                zf.writestr(f"{root}/{split}/x/0.png", png)
    with pytest.raises(DatasetError, match="several places.*'a/'.*'b/'"):
        load_image_folder(two_roots)


@pytest.mark.data
def test_shared_cifar10_zip_subset(cifar_zip):
    start = time.perf_counter()
    ds = load_dataset("auto", cifar_zip, train_limit=500, test_limit=200)
    elapsed = time.perf_counter() - start
    assert ds.classes == CIFAR_CLASSES and ds.name == "cifar10-jpeg"
    assert ds.train_images.shape == (500, 3, 32, 32) and ds.test_images.shape == (200, 3, 32, 32)
    assert (
        torch.bincount(ds.train_labels).tolist() == [50] * 10
        and torch.bincount(ds.test_labels).tolist() == [20] * 10
    )
    assert 100 < ds.train_images.float().mean() < 140  # CIFAR-10's mean pixel is about 120
    # Shuffled: a prefix holds (nearly) every class.
    assert len(set(ds.train_labels[:50].tolist())) >= 8
    assert elapsed < 15, (
        f"loading 700 images took {elapsed:.1f} s; limits should avoid decoding the rest"
    )
