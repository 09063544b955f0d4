"""CIFAR-10 python batches: folder, tar.gz, corrupt and hostile files, offline download."""

import hashlib
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bigbatch.data import DatasetError, cifar10, load_dataset
from bigbatch.data.cifar10 import CLASSES, download_cifar10, load_cifar10

BATCH_SIZES = {
    "data_batch_1": 5,
    "data_batch_2": 4,
    "data_batch_3": 4,
    "data_batch_4": 3,
    "data_batch_5": 4,
    "test_batch": 6,
}


def _batches(str_keys: bool = False) -> dict[str, dict]:
    """Batches with the official key layout: data uint8 [N, 3072] (R, G, B planes), labels a
    list."""
    out = {}
    for k, (name, n) in enumerate(BATCH_SIZES.items()):
        rng = np.random.default_rng(k)
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [(3 * k + i) % 10 for i in range(n)]
        out[name] = (
            {"data": data, "labels": labels}
            if str_keys
            else {b"batch_label": b"x", b"data": data, b"labels": labels}
        )
    return out


def _write_folder(root: Path, batches: dict[str, dict], protocol: int = 2) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    (folder / "batches.meta").write_bytes(
        pickle.dumps({b"label_names": [c.encode() for c in CLASSES]})
    )
    (folder / "readme.html").write_text("<html></html>")
    return folder


def _write_targz(folder: Path, archive: Path) -> Path:
    # The official archive's members are not in name order; reading must not depend on it.
    with tarfile.open(archive, "w:gz") as tar:
        for name in [
            "data_batch_4",
            "readme.html",
            "test_batch",
            "data_batch_3",
            "batches.meta",
            "data_batch_2",
            "data_batch_5",
            "data_batch_1",
        ]:
            tar.add(folder / name, arcname=f"cifar-10-batches-py/{name}")
    return archive


def _expected(batches):
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    key = b"data" if b"data" in train[0] else "data"
    lkey = b"labels" if b"labels" in train[0] else "labels"
    train_x = np.concatenate([b[key] for b in train])
    train_y = [label for b in train for label in b[lkey]]
    return train_x, train_y, batches["test_batch"][key], list(batches["test_batch"][lkey])


def test_folder_and_archive_load_the_same_tensors(tmp_path):
    batches = _batches()
    folder = _write_folder(tmp_path / "d", batches)
    train_x, train_y, test_x, test_y = _expected(batches)
    ds = load_dataset("cifar10", folder)
    assert ds.train_images.shape == (20, 3, 32, 32) and ds.test_images.shape == (6, 3, 32, 32)
    assert (
        ds.train_images.dtype == torch.uint8
        and ds.train_labels.dtype == torch.int64
        and ds.train_images.is_contiguous()
    )
    assert ds.train_labels.tolist() == train_y and ds.test_labels.tolist() == test_y
    assert (
        ds.classes == CLASSES
        and ds.name == "cifar10"
        and ds.image_size == (32, 32)
        and ds.channels == 3
    )
    # Row layout: the first 1024 bytes are the red plane, row-major.
    assert torch.equal(ds.train_images.reshape(20, -1), torch.from_numpy(train_x))
    assert (
        ds.train_images[7, 0, 1, 2] == train_x[7, 32 + 2]
        and ds.train_images[7, 2, 0, 0] == train_x[7, 2048]
    )
    assert torch.equal(ds.test_images.reshape(6, -1), torch.from_numpy(test_x))

    archive = _write_targz(folder, tmp_path / "cifar-10-python.tar.gz")
    for path in (archive, tmp_path, tmp_path / "d"):  # the archive, its folder, the batches' parent
        other = load_dataset("auto", path)
        assert torch.equal(other.train_images, ds.train_images) and torch.equal(
            other.test_labels, ds.test_labels
        )


def test_str_keys_and_default_protocol_pickles_load(tmp_path):
    batches = _batches(str_keys=True)
    folder = _write_folder(tmp_path, batches, protocol=pickle.HIGHEST_PROTOCOL)
    ds = load_cifar10(folder)
    assert ds.train_labels.tolist() == _expected(batches)[1]


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"not a pickle", "corrupt"),
        (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), r"\[N, 3072\]"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), r"\[N, 3072\]"),
        (
            pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}),
            "outside 0..9",
        ),
        (pickle.dumps({b"labels": [0]}), "corrupt"),
    ],
)
def test_bad_batch_names_the_file(tmp_path, payload, message):
    folder = _write_folder(tmp_path, _batches())
    (folder / "data_batch_3").write_bytes(payload)
    with pytest.raises(DatasetError, match=f"data_batch_3.*{message}|{message}.*data_batch_3"):
        load_dataset("cifar10", tmp_path)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    folder = _write_folder(tmp_path, _batches())
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}))
    with pytest.raises(DatasetError, match="test_batch.*corrupt.*refusing"):
        load_cifar10(folder)
    assert not (tmp_path / "pwned").exists()


def test_incomplete_or_damaged_archive_names_it(tmp_path):
    folder = _write_folder(tmp_path / "d", _batches())
    (folder / "data_batch_5").unlink()
    with pytest.raises(DatasetError, match="has no data_batch_5"):
        load_cifar10(folder)
    archive = _write_targz(
        _write_folder(tmp_path / "e", _batches()), tmp_path / "cifar-10-python.tar.gz"
    )
    archive.write_bytes(archive.read_bytes()[:300])
    with pytest.raises(DatasetError, match="cifar-10-python.tar.gz.*not a readable tar"):
        load_cifar10(archive)


def test_missing_path_says_how_to_get_it(tmp_path):
    with pytest.raises(
        DatasetError,
        match=r"nowhere.*does not exist.*runtime\.download=true.*cifar-10-python\.tar\.gz",
    ):
        load_dataset("cifar10", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="holds neither cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path)


def test_offline_download_fails_fast_and_leaves_nothing(tmp_path, monkeypatch):
    # Discard port: refused.
    monkeypatch.setattr(cifar10, "CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    start = time.perf_counter()
    with pytest.raises(
        DatasetError,
        match=r"could not download CIFAR-10 from http://127\.0\.0\.1:9/.*: "
        r".*download it by hand to .*data.path",
    ):
        load_dataset("cifar10", tmp_path / "data", download=True)
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "data").exists()  # the folder it created for the download is gone again
    (tmp_path / "keep").mkdir()
    with pytest.raises(DatasetError, match="could not download"):
        download_cifar10(tmp_path / "keep", timeout_s=2)
    assert list((tmp_path / "keep").iterdir()) == []  # no .part file left behind


def test_download_verifies_md5_then_loads(tmp_path, monkeypatch):
    archive = _write_targz(_write_folder(tmp_path / "src", _batches()), tmp_path / "served.tar.gz")
    monkeypatch.setattr(cifar10, "CIFAR10_URL", archive.as_uri())
    with pytest.raises(DatasetError, match="MD5"):
        load_dataset("cifar10", tmp_path / "bad", download=True)
    assert not (tmp_path / "bad").exists()
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    ds = load_dataset("cifar10", tmp_path / "data", download=True)
    assert (tmp_path / "data" / "cifar-10-python.tar.gz").read_bytes() == archive.read_bytes()
    assert ds.num_train == 20
    # A path naming the archive itself downloads to exactly that file.
    load_dataset("auto", tmp_path / "other" / "cifar-10-python.tar.gz", download=True)
    assert (tmp_path / "other" / "cifar-10-python.tar.gz").is_file()
    # With a local copy present, download=True does not fetch again.
    monkeypatch.setattr(cifar10, "CIFAR10_URL", "http://127.0.0.1:9/x")
    assert load_dataset("cifar10", tmp_path / "data", download=True).num_train == 20


def test_limits_take_first_examples_of_each_class(tmp_path):
    batches = _batches()
    _write_folder(tmp_path, batches)
    full = load_dataset("cifar10", tmp_path)
    ds = load_dataset("cifar10", tmp_path, train_limit=10, test_limit=3)
    present = torch.unique(full.train_labels)
    counts = torch.bincount(ds.train_labels, minlength=10)
    assert (
        int(counts.sum()) == 10
        and int(counts[present].min()) >= 1
        and int(counts.max()) - int(counts[present].min()) <= 1
    )
    for c in present.tolist():  # the first examples of each class, in file order
        k = int(counts[c])
        assert torch.equal(
            ds.train_images[ds.train_labels == c], full.train_images[full.train_labels == c][:k]
        )
    assert ds.num_test == 3 and len(set(ds.test_labels.tolist())) == 3


def test_archive_with_members_read_once(tmp_path, monkeypatch):
    """Each wanted member is extracted once, in archive order (no backward seeks in the gzip
    stream)."""
    archive = _write_targz(_write_folder(tmp_path, _batches()), tmp_path / "c.tar.gz")
    calls = []
    real = tarfile.TarFile.extractfile

    def spy(self, member):
        calls.append(member.name)
        return real(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    load_cifar10(archive)
    assert calls == [
        f"cifar-10-batches-py/{n}"
        for n in [
            "data_batch_4",
            "test_batch",
            "data_batch_3",
            "data_batch_2",
            "data_batch_5",
            "data_batch_1",
        ]
    ]
