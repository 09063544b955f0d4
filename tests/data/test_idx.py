"""MNIST-style IDX files: plain and gzipped, header and length checks, Fashion-MNIST names."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from bigbatch.data import DatasetError, load_dataset
from bigbatch.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_PATH, read_idx

NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _idx(array: np.ndarray, type_code: int = 0x08) -> bytes:
    return (
        struct.pack(">HBB", 0, type_code, array.ndim)
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.tobytes()
    )


def _make(root: Path, gz: bool, size=(28, 28), n_train=23, n_test=7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    data = {
        "train_images": rng.integers(0, 256, (n_train, *size), dtype=np.uint8),
        "train_labels": (np.arange(n_train) * 7 % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, *size), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for key, array in data.items():
        raw = _idx(array)
        (root / (NAMES[key] + (".gz" if gz else ""))).write_bytes(gzip.compress(raw) if gz else raw)
    return data


@pytest.mark.parametrize("gz", [False, True])
def test_roundtrip(tmp_path, gz):
    data = _make(tmp_path, gz)
    ds = load_dataset("auto", tmp_path)
    assert ds.train_images.shape == (23, 1, 28, 28) and ds.test_images.shape == (7, 1, 28, 28)
    assert (
        ds.train_images.dtype == torch.uint8
        and ds.train_labels.dtype == torch.int64
        and ds.train_images.is_contiguous()
    )
    assert np.array_equal(ds.train_images[:, 0].numpy(), data["train_images"])
    assert np.array_equal(ds.test_images[:, 0].numpy(), data["test_images"])
    assert (
        ds.train_labels.tolist() == data["train_labels"].tolist()
        and ds.test_labels.tolist() == data["test_labels"].tolist()
    )
    assert ds.classes == [str(i) for i in range(10)] and ds.name == tmp_path.name
    fashion = load_dataset("fashion-mnist", tmp_path)
    assert fashion.classes == FASHION_MNIST_CLASSES and fashion.name == "fashion-mnist"
    assert fashion.classes[0] == "T-shirt/top" and fashion.classes[9] == "Ankle boot"


def test_other_image_sizes_and_dotted_names(tmp_path):
    data = _make(tmp_path, gz=False, size=(9, 13))
    for stem in NAMES.values():  # some mirrors spell them train-images.idx3-ubyte
        (tmp_path / stem).rename(tmp_path / stem.replace("-idx", ".idx"))
    ds = load_dataset("idx", tmp_path)
    assert ds.image_size == (9, 13) and torch.equal(
        ds.train_images[:, 0], torch.from_numpy(data["train_images"])
    )


def test_truncated_bad_magic_and_damaged_gzip_name_the_file(tmp_path):
    _make(tmp_path, gz=False)
    f = tmp_path / "train-images-idx3-ubyte"
    good = f.read_bytes()
    f.write_bytes(good[:-10])
    with pytest.raises(
        DatasetError,
        match=r"train-images-idx3-ubyte' holds .* values but its header \[23, 28, 28\] "
        r"promises 18032.*truncated",
    ):
        load_dataset("idx", tmp_path)
    f.write_bytes(good[:6])
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.*shorter than its header"):
        load_dataset("idx", tmp_path)
    f.write_bytes(_idx(np.zeros((2, 3, 3), np.uint8), type_code=0x0D))  # float data
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.*bad header.*type 0x0d"):
        load_dataset("idx", tmp_path)
    f.write_bytes(_idx(np.zeros((2, 9), np.uint8)))  # 2 dims where 3 are needed
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.*bad header.*2 dims"):
        load_dataset("idx", tmp_path)
    f.unlink()
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(good)[:-50])
    with pytest.raises(DatasetError, match=r"cannot read IDX file '.*train-images-idx3-ubyte\.gz'"):
        load_dataset("idx", tmp_path)
    gz.unlink()
    with pytest.raises(DatasetError, match="has no train-images-idx3-ubyte"):
        load_dataset("idx", tmp_path)


def test_count_mismatch_and_label_range(tmp_path):
    _make(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.zeros(6, np.uint8)))
    with pytest.raises(
        DatasetError,
        match="t10k-images-idx3-ubyte' holds 7 images but .*t10k-labels-idx1-ubyte' holds 6 labels",
    ):
        load_dataset("idx", tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.full(7, 12, np.uint8)))
    # Generic IDX: the labels define the classes, so a test label no training example has is
    # refused with the gap named.
    with pytest.raises(DatasetError, match=r"3 of those 13 classes have no training example"):
        load_dataset("idx", tmp_path)
    with pytest.raises(DatasetError, match="label 12 but fashion-mnist has 10 classes"):
        load_dataset("fashion-mnist", tmp_path)


def test_read_idx_returns_a_writable_array(tmp_path):
    (tmp_path / "x").write_bytes(_idx(np.arange(6, dtype=np.uint8).reshape(2, 3)))
    a = read_idx(tmp_path / "x", 2)
    assert a.flags.writeable and a.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_missing_folder_says_what_to_do(tmp_path):
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path / "nope")
    with pytest.raises(DatasetError, match="nope' does not exist.*train-images-idx3-ubyte"):
        load_dataset("idx", tmp_path / "nope")


@pytest.mark.skipif(
    not Path(FASHION_MNIST_PATH).is_dir(),
    reason=f"Debian's dataset-fashion-mnist is not installed ({FASHION_MNIST_PATH})",
)
def test_real_fashion_mnist():
    ds = load_dataset("fashion-mnist", None, train_limit=1000, test_limit=100)
    assert ds.train_images.shape == (1000, 1, 28, 28) and ds.test_images.shape == (100, 1, 28, 28)
    assert (
        torch.bincount(ds.train_labels).tolist() == [100] * 10
        and torch.bincount(ds.test_labels).tolist() == [10] * 10
    )
    assert ds.classes == FASHION_MNIST_CLASSES
    assert 40 < ds.train_images.float().mean() < 110  # Fashion-MNIST's mean pixel is about 73
