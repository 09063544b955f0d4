import gzip
import io
import pickle
import struct
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bigbatch.data import DatasetError, load_dataset
from bigbatch.data.batches import BatchLoader, channel_stats, crop_flip
from bigbatch.data.cifar10 import download_cifar10

CIFAR_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.zip"


# -- CIFAR-10 python batches ---------------------------------------------------------------------
def _cifar_batch(n, offset):
    rng = np.random.default_rng(offset)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [(i + offset) % 10 for i in range(n)]}


def _make_cifar_dir(root: Path) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {f"data_batch_{i}": _cifar_batch(4, i) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(3, 9)
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"x"] * 10}))
    return batches


def test_cifar10_folder_and_targz(tmp_path):
    batches = _make_cifar_dir(tmp_path / "d")
    ds = load_dataset("cifar10", tmp_path / "d")
    assert ds.train_images.shape == (20, 3, 32, 32) and ds.test_images.shape == (3, 3, 32, 32)
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert torch.equal(ds.train_images[0].flatten(), torch.from_numpy(batches["data_batch_1"][b"data"][0]))
    assert ds.train_labels[:4].tolist() == [1, 2, 3, 4]
    assert ds.classes[0] == "airplane" and ds.num_classes == 10
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "d" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    from_tar = load_dataset("auto", archive)
    assert torch.equal(from_tar.train_images, ds.train_images) and torch.equal(from_tar.test_labels, ds.test_labels)
    assert torch.equal(load_dataset("auto", tmp_path).train_images, ds.train_images)  # parent dir holding the archive


def test_cifar10_corrupt_batch_is_named(tmp_path):
    _make_cifar_dir(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_missing_and_offline_download_fail_fast(tmp_path):
    with pytest.raises(DatasetError, match="data.download=true"):
        load_dataset("cifar10", tmp_path / "nowhere")
    start = time.perf_counter()
    with pytest.raises(DatasetError, match="could not download CIFAR-10"):
        download_cifar10(tmp_path, url="http://127.0.0.1:9/cifar-10-python.tar.gz", timeout_s=5)
    assert time.perf_counter() - start < 10
    assert not list(tmp_path.glob("*.part")) and not (tmp_path / "cifar-10-python.tar.gz").exists()


def test_cifar10_download_checks_md5(tmp_path):
    source = tmp_path / "served.tar.gz"
    source.write_bytes(b"not the archive")
    with pytest.raises(DatasetError, match="MD5"):
        download_cifar10(tmp_path / "dest", url=source.as_uri())
    assert not (tmp_path / "dest" / "cifar-10-python.tar.gz").exists()


# -- image folders --------------------------------------------------------------------------------
def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _folder_arrays(mode: str, size=(20, 24)):
    rng = np.random.default_rng(0)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    return {
        (split, cls, i): rng.integers(0, 256, shape, dtype=np.uint8)
        for split, n in (("train", 3), ("test", 2)) for cls in ("dog", "cat") for i in range(n)
    }


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("as_zip", [False, True])
def test_image_folder_roundtrip(tmp_path, mode, as_zip):
    arrays = _folder_arrays(mode)
    if as_zip:
        path = tmp_path / "imgs.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for (split, cls, i), a in arrays.items():
                zf.writestr(f"wrapped/{split}/{cls}/{i:03d}.png", _png(a))
    else:
        path = tmp_path / "imgs"
        for (split, cls, i), a in arrays.items():
            (path / split / cls).mkdir(parents=True, exist_ok=True)
            (path / split / cls / f"{i:03d}.png").write_bytes(_png(a))
    ds = load_dataset("auto", path)
    channels = 1 if mode == "L" else 3
    assert ds.train_images.shape == (6, channels, 24, 20) and ds.test_images.shape == (4, channels, 24, 20)
    assert ds.classes == ["cat", "dog"]
    assert sorted(ds.train_labels.tolist()) == [0, 0, 0, 1, 1, 1]  # stored in a fixed shuffled order
    assert torch.equal(load_dataset("auto", path).train_labels, ds.train_labels)
    for (split, cls, i), expected in arrays.items():  # every image is there, pixel-exact (PNG is lossless)
        images, labels = (ds.train_images, ds.train_labels) if split == "train" else (ds.test_images, ds.test_labels)
        want = torch.from_numpy(expected).reshape(24, 20, channels).permute(2, 0, 1)
        hits = [j for j in range(len(labels)) if torch.equal(images[j], want)]
        assert len(hits) == 1 and labels[hits[0]] == ds.classes.index(cls)


def test_image_folder_corrupt_and_mismatched_files_are_named(tmp_path):
    arrays = _folder_arrays("RGB")
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for (split, cls, i), a in arrays.items():
            zf.writestr(f"{split}/{cls}/{i:03d}.png", b"garbage" if (split, cls, i) == ("train", "dog", 2) else _png(a))
    with pytest.raises(DatasetError, match=r"train/dog/002.png.*bad.zip"):
        load_dataset("image-folder", path)
    folder = tmp_path / "sizes"
    for (split, cls, i), a in arrays.items():
        (folder / split / cls).mkdir(parents=True, exist_ok=True)
        odd = (split, cls, i) == ("train", "dog", 2)
        (folder / split / cls / f"{i}.png").write_bytes(_png(a[:10] if odd else a))
    with pytest.raises(DatasetError, match="dog/2.png' is 20x10 but the dataset's images are 20x24"):
        load_dataset("image-folder", folder)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("auto", tmp_path / "missing.zip")
    (tmp_path / "notzip.zip").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="not a readable .zip"):
        load_dataset("image-folder", tmp_path / "notzip.zip")


@pytest.mark.skipif(not CIFAR_ZIP.exists(), reason="shared CIFAR-10 zip not present")
def test_shared_cifar10_zip_subset():
    ds = load_dataset("auto", CIFAR_ZIP, train_limit=300, test_limit=100)
    assert ds.train_images.shape == (300, 3, 32, 32) and ds.test_images.shape == (100, 3, 32, 32)
    assert ds.classes[:3] == ["airplane", "automobile", "bird"]
    assert torch.bincount(ds.train_labels).tolist() == [30] * 10
    assert 80 < ds.train_images.float().mean() < 180


# -- IDX --------------------------------------------------------------------------------------------
def _idx(array: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _make_idx(root: Path, gz: bool):
    rng = np.random.default_rng(1)
    data = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(12) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(5) % 10).astype(np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in data.items():
        raw = _idx(array)
        (root / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(raw) if gz else raw)
    return data


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    data = _make_idx(tmp_path, gz)
    ds = load_dataset("auto", tmp_path)
    assert ds.train_images.shape == (12, 1, 28, 28) and ds.test_images.shape == (5, 1, 28, 28)
    assert np.array_equal(ds.train_images[3, 0].numpy(), data["train-images-idx3-ubyte"][3])
    assert ds.test_labels.tolist() == [0, 1, 2, 3, 4]
    fashion = load_dataset("fashion-mnist", tmp_path)
    assert fashion.classes[0] == "T-shirt/top" and fashion.name == "fashion-mnist"


def test_idx_truncated_and_bad_header(tmp_path):
    _make_idx(tmp_path, gz=False)
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.*truncated"):
        load_dataset("idx", tmp_path)
    f.write_bytes(struct.pack(">HBB", 0, 0x0D, 3) + b"\0" * 20)
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.*bad header"):
        load_dataset("idx", tmp_path)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").exists(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    ds = load_dataset("fashion-mnist", None, train_limit=100, test_limit=50)
    assert ds.train_images.shape == (100, 1, 28, 28) and ds.num_classes == 10


# -- limits, cache, unknown format ----------------------------------------------------------------
def test_limits_are_class_balanced_and_cache_roundtrips(tmp_path):
    _make_cifar_dir(tmp_path / "d")
    ds = load_dataset("cifar10", tmp_path / "d", train_limit=8, cache_dir=tmp_path / "cache")
    assert torch.bincount(ds.train_labels, minlength=10).tolist() == [0] + [1] * 8 + [0]  # classes 1-8 exist
    cached_files = list((tmp_path / "cache").glob("*.pt"))
    assert len(cached_files) == 1
    again = load_dataset("cifar10", tmp_path / "d", train_limit=8, cache_dir=tmp_path / "cache")
    assert torch.equal(again.train_images, ds.train_images) and again.classes == ds.classes
    cached_files[0].write_bytes(b"damaged")  # a damaged cache is rebuilt, not fatal
    rebuilt = load_dataset("cifar10", tmp_path / "d", train_limit=8, cache_dir=tmp_path / "cache")
    assert torch.equal(rebuilt.train_images, ds.train_images)
    with pytest.raises(DatasetError, match="unknown dataset format 'imagenet'"):
        load_dataset("imagenet", tmp_path / "d")


# -- batches --------------------------------------------------------------------------------------
def _loader_data(n=103):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8), torch.arange(n)


def test_every_example_once_per_epoch_and_seeded_order():
    images, labels = _loader_data()
    mean, std = channel_stats(images)
    loader = BatchLoader(images, labels, 10, mean=mean, std=std, shuffle=True, seed=3)
    assert len(loader) == 11
    loader.set_epoch(0)
    seen = torch.cat([y for _, y in loader])
    assert sorted(seen.tolist()) == list(range(103))
    again = torch.cat([y for _, y in loader])
    assert torch.equal(seen, again)
    loader.set_epoch(1)
    assert not torch.equal(torch.cat([y for _, y in loader]), seen)
    assert len(BatchLoader(images, labels, 10, mean=mean, std=std, shuffle=True, drop_last=True)) == 10
    with pytest.raises(ValueError, match="between 1 and the number of examples"):
        BatchLoader(images, labels, 104, mean=mean, std=std, shuffle=True)


def test_normalization_gives_zero_mean_unit_std():
    images, labels = _loader_data(500)
    mean, std = channel_stats(images)
    x = torch.cat([x for x, _ in BatchLoader(images, labels, 128, mean=mean, std=std, shuffle=False)])
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)
    ref = (images.double() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(x.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("augment", [False, True])
def test_rank_shards_concatenate_to_the_single_process_batch(augment):
    images, labels = _loader_data()
    mean, std = channel_stats(images)
    kw = dict(mean=mean, std=std, shuffle=True, seed=5, augment=augment, crop_padding=2)
    single = BatchLoader(images, labels, 16, **kw)
    ranks = [BatchLoader(images, labels, 16, rank=r, world_size=3, **kw) for r in range(3)]
    for epoch in (0, 4):
        for loader in (single, *ranks):
            loader.set_epoch(epoch)
        for (x, y), *parts in zip(single, *ranks):
            assert torch.equal(torch.cat([p[1] for p in parts]), y)
            assert torch.equal(torch.cat([p[0] for p in parts]), x)


def test_crop_flip_by_hand():
    img = torch.arange(1, 10, dtype=torch.uint8).view(1, 1, 3, 3)  # 1..9
    same = crop_flip(img, 1, torch.tensor([[1, 1]]), torch.tensor([False]))
    assert torch.equal(same, img)
    shifted = crop_flip(img, 1, torch.tensor([[0, 0]]), torch.tensor([False]))  # window starts in the padding
    assert shifted[0, 0].tolist() == [[0, 0, 0], [0, 1, 2], [0, 4, 5]]
    flipped = crop_flip(img, 1, torch.tensor([[1, 1]]), torch.tensor([True]))
    assert flipped[0, 0].tolist() == [[3, 2, 1], [6, 5, 4], [9, 8, 7]]
    both = crop_flip(img, 1, torch.tensor([[2, 2]]), torch.tensor([True]))
    assert both[0, 0].tolist() == [[0, 6, 5], [0, 9, 8], [0, 0, 0]]
