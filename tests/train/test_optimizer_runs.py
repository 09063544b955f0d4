"""The Trainer with LARS, LAMB, Muon, SAM and ghost BatchNorm: short synthetic runs train (the
loss falls) and resume exactly."""

import pytest
import torch

from bigbatch.config import load_config
from bigbatch.train.trainer import Trainer

pytestmark = pytest.mark.slow

COMMON = [
    "data.format=synthetic",
    "run.name=t",
    "run.epochs=3",
    "train.batch_size=64",
    "runtime.progress=off",
    "train.train_eval_examples=0",
]

RUNS = {
    "lars": ["optimizer.name=lars", "optimizer.lr=1.0", "optimizer.lars_trust=0.01"],
    "lamb": ["optimizer.name=lamb", "optimizer.lr=0.01"],
    "muon-sgd": ["optimizer.name=muon", "optimizer.lr=0.02", "optimizer.muon_rest_lr=0.05"],
    "muon-adamw": [
        "optimizer.name=muon",
        "optimizer.lr=0.02",
        "optimizer.nesterov=true",
        'optimizer.muon_rest="adamw"',
        "optimizer.muon_rest_lr=0.002",
        "schedule.decay_epochs=[2]",
    ],
    "sam-sgd": ["optimizer.lr=0.1", "optimizer.sam_rho=0.05", "augment.mixup_alpha=0.5"],
    # Loss-scaled gradients: the ascent direction g / |g| is the same, the scaler's state resumes.
    "sam-lamb-fp16": [
        "optimizer.name=lamb",
        "optimizer.lr=0.01",
        "optimizer.sam_rho=0.05",
        'train.precision="fp16"',
    ],
}
# SAM with LARS around a ResNet whose BatchNorm is ghost BatchNorm, in micro-batches of 2 ghosts
# (as small as it goes: a ResNet step is slow on a CPU).
GHOST_RESNET = [
    'model.name="resnet20"',
    "model.ghost_batch_size=4",
    "runtime.micro_batch_size=8",
    "train.batch_size=16",
    "run.epochs=2",
    "optimizer.name=lars",
    "optimizer.lr=1.0",
    "optimizer.lars_trust=0.01",
    "optimizer.sam_rho=0.05",
]


@pytest.fixture(scope="module")
def small():
    from bigbatch.data import load_dataset

    return load_dataset("synthetic", None, train_limit=256, test_limit=64, seed=0)


@pytest.fixture(scope="module")
def tiny():
    from bigbatch.data import load_dataset

    return load_dataset("synthetic", None, train_limit=16, test_limit=16, seed=0)


def _cfg(tmp_path, sets, *extra):
    return load_config(None, [*COMMON, f"runtime.output_dir={tmp_path}", *sets, *extra])


def _strip_times(rows):
    return [
        {k: v for k, v in r.items() if "time" not in k and "per_sec" not in k and "rss" not in k}
        for r in rows
    ]


def _trains_and_resumes_exactly(tmp_path, dataset, sets):
    full = Trainer(_cfg(tmp_path / "full", sets), dataset)
    rows = full.fit()
    assert rows[-1]["train_loss"] < rows[0]["train_loss"], [r["train_loss"] for r in rows]
    Trainer(_cfg(tmp_path / "part", sets, "run.epochs=1"), dataset).fit()
    resumed = Trainer(_cfg(tmp_path / "part", sets), dataset)
    assert _strip_times(resumed.fit(resume=True)) == _strip_times(rows)
    for a, b in zip(resumed.model.parameters(), full.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(resumed.model.buffers(), full.model.buffers()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(RUNS))
def test_trains_and_resumes_exactly(tmp_path, small, name):
    _trains_and_resumes_exactly(tmp_path, small, RUNS[name])


def test_sam_lars_ghost_batchnorm_resnet_trains_and_resumes_exactly(tmp_path, tiny):
    _trains_and_resumes_exactly(tmp_path, tiny, GHOST_RESNET)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["muon-adamw", "sam-lamb-fp16", "ghost-resnet"])
def test_trains_and_resumes_exactly_on_the_gpu(tmp_path, small, tiny, name):
    sets = GHOST_RESNET if name == "ghost-resnet" else RUNS[name]
    dataset = tiny if name == "ghost-resnet" else small
    _trains_and_resumes_exactly(tmp_path, dataset, [*sets, 'runtime.device="cuda"'])
