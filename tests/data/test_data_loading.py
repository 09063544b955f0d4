"""The load_dataset entry point: format detection, errors, synthetic data, limits, the decode
cache."""

import gzip
import io
import os
import struct
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from bigbatch import data
from bigbatch.data import DATASET_FORMATS, DatasetError, ImageDataset, detect_format, load_dataset
from bigbatch.errors import BigbatchError


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _image_zip(path, per_class=4, classes=("b", "a")):
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as zf:
        for split, n in (("train", per_class), ("test", 2)):
            for c in classes:
                for i in range(n):
                    zf.writestr(
                        f"{split}/{c}/{i}.png",
                        _png(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)),
                    )
    return path


def _idx_dir(root):
    root.mkdir()
    for name, shape in (
        ("train-images-idx3-ubyte", (4, 5, 5)),
        ("train-labels-idx1-ubyte", (4,)),
        ("t10k-images-idx3-ubyte", (2, 5, 5)),
        ("t10k-labels-idx1-ubyte", (2,)),
    ):
        # Labels 0, 1, 0, 1: two classes.
        array = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape) % 2
        if "images" in name:
            array = np.zeros(shape, np.uint8)
        (root / f"{name}.gz").write_bytes(
            gzip.compress(
                struct.pack(">HBB", 0, 8, len(shape))
                + struct.pack(f">{len(shape)}I", *shape)
                + array.tobytes()
            )
        )
    return root


def test_detect_format(tmp_path):
    assert detect_format(_image_zip(tmp_path / "x.zip")) == "image-folder"
    # By name, even before it exists.
    assert detect_format(tmp_path / "not-yet.zip") == "image-folder"
    assert detect_format(tmp_path / "cifar-10-python.tar.gz") == "cifar10"
    assert detect_format(tmp_path / "cifar-10-batches-py") == "cifar10"
    assert detect_format(_idx_dir(tmp_path / "idx")) == "idx"
    (tmp_path / "folder" / "train" / "a").mkdir(parents=True)
    assert detect_format(tmp_path / "folder") == "image-folder"
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DatasetError, match=r"cannot tell what dataset '.*empty' holds.*data\.format"
    ):
        detect_format(tmp_path / "empty")
    with pytest.raises(DatasetError, match="does not exist"):
        detect_format(tmp_path / "missing")


def test_errors_name_the_problem_and_fix(tmp_path):
    with pytest.raises(
        DatasetError,
        match="unknown dataset format 'imagenet'.*"
        "auto, cifar10, image-folder, idx, fashion-mnist, synthetic",
    ):
        load_dataset("imagenet", None)
    with pytest.raises(DatasetError, match=r"data\.path is empty.*image-folder.*train/<class>/"):
        load_dataset("image-folder", "")
    with pytest.raises(DatasetError, match=r"data\.path is empty.*cifar10.*runtime\.download=true"):
        load_dataset("cifar10", None)
    with pytest.raises(
        DatasetError, match=r"image-folder dataset path '.*gone\.zip' does not exist"
    ):
        load_dataset("auto", tmp_path / "gone.zip")
    with pytest.raises(DatasetError, match="train_limit is -1"):
        load_dataset("synthetic", None, train_limit=-1)
    assert issubclass(DatasetError, BigbatchError)  # the CLI prints these without a traceback
    assert DATASET_FORMATS == ("cifar10", "image-folder", "idx", "fashion-mnist", "synthetic")


def test_synthetic_is_seeded_balanced_and_learnable():
    ds = load_dataset("synthetic", None, train_limit=600, test_limit=200, seed=3)
    assert ds.train_images.shape == (600, 3, 32, 32) and ds.test_images.shape == (200, 3, 32, 32)
    assert ds.train_images.dtype == torch.uint8 and ds.num_classes == 10
    assert torch.bincount(ds.train_labels).tolist() == [60] * 10
    same = load_dataset("synthetic", "ignored", train_limit=600, test_limit=200, seed=3)
    assert torch.equal(same.train_images, ds.train_images) and torch.equal(
        same.test_labels, ds.test_labels
    )
    assert not torch.equal(
        load_dataset("synthetic", None, train_limit=600, test_limit=200, seed=4).train_images,
        ds.train_images,
    )
    # Learnable: nearest class mean (from the training set) classifies the test set well, but the
    # noise keeps single pixels from being enough.
    x, y = ds.train_images.float().flatten(1), ds.train_labels
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    pred = torch.cdist(ds.test_images.float().flatten(1), means).argmin(1)
    assert (pred == ds.test_labels).float().mean() > 0.9
    defaults = load_dataset("synthetic", None)
    assert (defaults.num_train, defaults.num_test) == (2000, 500)
    small = data.make_synthetic(50, 20, num_classes=4, channels=1, size=(8, 12))
    assert small.train_images.shape == (50, 1, 8, 12) and small.classes == [
        "class0",
        "class1",
        "class2",
        "class3",
    ]


def test_image_dataset_checks_its_tensors():
    x, y = torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 0, 1])
    ds = ImageDataset("t", ["a", "b"], x.transpose(2, 3), y, x[:2], y[:2])
    assert ds.train_images.is_contiguous() and (
        ds.num_train,
        ds.num_test,
        ds.channels,
        ds.image_size,
    ) == (4, 2, 1, (2, 2))
    with pytest.raises(DatasetError, match="'t': train images are torch.float32"):
        ImageDataset("t", ["a", "b"], x.float(), y, x, y)
    with pytest.raises(DatasetError, match="'t': test labels are torch.int32"):
        ImageDataset("t", ["a", "b"], x, y, x, y.int())
    y3 = torch.tensor([0, 1, 2, 1])
    with pytest.raises(DatasetError, match="labels span 0..2 but there are 2 classes"):
        ImageDataset("t", ["a", "b"], x, y3, x, y3)
    with pytest.raises(DatasetError, match="1 class"):
        ImageDataset("t", ["a"], x, y * 0, x, y * 0)
    with pytest.raises(
        DatasetError, match=r"train images are \(1, 2, 2\) but test images are \(1, 3, 3\)"
    ):
        ImageDataset("t", ["a", "b"], x, y, torch.zeros(4, 1, 3, 3, dtype=torch.uint8), y)


def test_cache_roundtrip_is_used_and_invalidated(tmp_path, monkeypatch):
    path = _image_zip(tmp_path / "imgs.zip")
    cache = tmp_path / "cache"
    first = load_dataset("auto", path, train_limit=4, cache_dir=cache)
    files = list(cache.glob("*.pt"))
    assert len(files) == 1 and files[0].name.startswith("image-folder-imgs-")
    assert not [f for f in cache.iterdir() if f.suffix == ".tmp"]

    calls = []  # every decode of the zip goes through the public image-folder loader
    real = data.load_image_folder
    monkeypatch.setattr(data, "load_image_folder", lambda *a: calls.append(a) or real(*a))
    again = load_dataset("auto", path, train_limit=4, cache_dir=str(cache))
    assert calls == []  # served from the cache
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(again, name), getattr(first, name))
    assert again.classes == first.classes == ["a", "b"] and again.name == first.name

    load_dataset("auto", path, train_limit=2, cache_dir=cache)  # other limits: another entry
    assert len(calls) == 1 and len(list(cache.glob("*.pt"))) == 2

    files[0].write_bytes(b"damaged")  # a damaged cache is rebuilt, not fatal
    rebuilt = load_dataset("auto", path, train_limit=4, cache_dir=cache)
    assert len(calls) == 2 and torch.equal(rebuilt.train_images, first.train_images)
    assert (
        load_dataset("auto", path, train_limit=4, cache_dir=cache) is not None and len(calls) == 2
    )

    _image_zip(path, per_class=5)  # the data changed (size and mtime): decoded afresh
    os.utime(path, ns=(1, 1))
    changed = load_dataset("auto", path, cache_dir=cache)
    assert len(calls) == 3 and changed.num_train == 10


def test_cache_of_a_directory_sees_changed_files(tmp_path):
    root = _idx_dir(tmp_path / "idx")
    cache = tmp_path / "cache"
    assert load_dataset("idx", root, cache_dir=cache).train_labels.tolist() == [0, 1, 0, 1]
    labels = root / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(struct.pack(">HBBI", 0, 8, 1, 4) + bytes([1, 2, 0, 2])))
    os.utime(labels, ns=(5, 5))
    assert load_dataset("idx", root, cache_dir=cache).train_labels.tolist() == [1, 2, 0, 2]


def test_unwritable_cache_only_warns(tmp_path):
    path = _image_zip(tmp_path / "imgs.zip")
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="could not write the dataset cache"):
        ds = load_dataset("auto", path, cache_dir=blocker / "cache")
    assert ds.num_train == 8


def test_no_path_means_cifar10_in_the_cache_dir(tmp_path):
    # Nothing is downloaded unless asked: the error names the cache folder and both fixes.
    with pytest.raises(
        DatasetError,
        match=r"CIFAR-10 path '.*cache/cifar10' does not exist.*runtime\.download=true",
    ):
        load_dataset("auto", "", cache_dir=tmp_path / "cache")
