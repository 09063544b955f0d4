"""Shared fixtures and markers: the shared CIFAR-10 copy (named once), a synthetic dataset, a
trained run.

Markers: ``slow`` (more than a few seconds), ``dist`` (several processes in a torch.distributed
group), ``data`` (needs a real dataset on disk; skipped when it is absent), ``cuda`` (needs a GPU).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# The shared CIFAR-10 JPEG copy beside the checkout; BIGBATCH_CIFAR10 points elsewhere.
CIFAR_ZIP = Path(
    os.environ.get(
        "BIGBATCH_CIFAR10", Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.zip"
    )
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def cifar_zip() -> Path:
    if not CIFAR_ZIP.exists():
        pytest.skip(f"shared CIFAR-10 JPEG zip not at {CIFAR_ZIP} (set BIGBATCH_CIFAR10)")
    return CIFAR_ZIP


@pytest.fixture(scope="session")
def synthetic():
    from bigbatch.data import load_dataset

    return load_dataset("synthetic", None, train_limit=600, test_limit=200, seed=0)


@pytest.fixture(scope="session")
def _trained_synthetic_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bigbatch.cli import main

    out = tmp_path_factory.mktemp("runs")
    code = main(
        [
            "train",
            "--set",
            "data.format=synthetic",
            "--set",
            "data.train_limit=256",
            "--set",
            "data.test_limit=128",
            "--set",
            "run.epochs=1",
            "--set",
            "train.batch_size=64",
            "--set",
            "runtime.progress=off",
            "--set",
            f"runtime.output_dir={out}",
            "--set",
            "run.name=r",
        ]
    )
    assert code == 0
    return out / "r"


@pytest.fixture
def synthetic_run(_trained_synthetic_run: Path, tmp_path: Path) -> Path:
    """A finished one-epoch run directory on synthetic data, a fresh copy for each test."""
    run = tmp_path / "runs" / "r"
    shutil.copytree(_trained_synthetic_run, run)
    return run
