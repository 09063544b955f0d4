"""On a CUDA GPU (skipped without one): the same guarantees as on the CPU. benchmarks/gpu_check.py
runs these and measures the speed claims."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from bigbatch.config import load_config
from bigbatch.models import build_model
from bigbatch.optim.kfac import KFACPreconditioner
from bigbatch.optim.kfac.distributed import DistributedKFACPreconditioner
from bigbatch.train.trainer import Trainer

pytestmark = pytest.mark.cuda

KFAC = ['optimizer.name="kfac"', "kfac.factor_interval=2", "kfac.inverse_interval=3"]


def _cfg(tmp_path, device, *sets):
    return load_config(
        None,
        [
            "data.format=synthetic",
            f'runtime.output_dir="{tmp_path}"',
            'run.name="t"',
            "run.epochs=2",
            "train.batch_size=64",
            'runtime.progress="off"',
            f'runtime.device="{device}"',
            'kfac.fisher_type="mc"',
            *KFAC,
            *sets,
        ],
    )


def _rows(rows):
    return [
        {k: v for k, v in r.items() if "time" not in k and "per_sec" not in k and "rss" not in k}
        for r in rows
    ]


@pytest.mark.parametrize("model", ["lenet5", "resnet20"])
def test_resume_equals_uninterrupted_on_the_gpu(tmp_path, synthetic, model):
    sets = [f'model.name="{model}"']
    full = Trainer(_cfg(tmp_path / "full", "cuda", *sets), synthetic).fit()
    Trainer(_cfg(tmp_path / "part", "cuda", "run.epochs=1", *sets), synthetic).fit()
    resumed = Trainer(_cfg(tmp_path / "part", "cuda", *sets), synthetic).fit(resume=True)
    assert _rows(resumed) == _rows(full)


def test_a_cpu_checkpoint_resumes_on_the_gpu(tmp_path, synthetic):
    Trainer(_cfg(tmp_path, "cpu", "run.epochs=1"), synthetic).fit()
    trainer = Trainer(_cfg(tmp_path, "cuda"), synthetic)
    rows = trainer.fit(resume=True)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(s.A.is_cuda and s.G.is_cuda for s in trainer.kfac.layers.values())


def _kfac_step(device, kind=KFACPreconditioner, **options):
    torch.manual_seed(0)
    model = build_model("lenet5", 3, (32, 32), 10).double().to(device)
    x = torch.randn(32, 3, 32, 32, dtype=torch.float64).to(device)
    y = torch.randint(0, 10, (32,)).to(device)
    kfac = kind(model, factor_dtype=torch.float64, factor_interval=1, **options)
    F.cross_entropy(model(x), y).backward()
    kfac.step(lr=0.1)
    return [p.grad.detach().cpu() for p in model.parameters()]


def test_kfac_step_on_the_gpu_equals_the_cpu_in_float64():
    for got, expected in zip(_kfac_step("cuda"), _kfac_step("cpu"), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("upper_triangle", [True, False])
def test_distributed_kfac_on_a_one_rank_nccl_group(upper_triangle):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        device_id=torch.device("cuda", 0),
    )
    try:
        got = _kfac_step("cuda", DistributedKFACPreconditioner, upper_triangle=upper_triangle)
    finally:
        dist.destroy_process_group()
    for a, b in zip(got, _kfac_step("cuda"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_a_dataset_that_fits_lives_on_the_gpu(tmp_path, synthetic):
    trainer = Trainer(_cfg(tmp_path, "cuda", "augment.crop_flip=true"), synthetic)
    assert trainer.train_loader.images.is_cuda and trainer.test_loader.labels.is_cuda
    x, y = next(iter(trainer.train_loader))
    assert x.is_cuda and y.is_cuda


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_noise_scale_on_the_gpu_equals_the_cpu(tmp_path, synthetic, precision):
    # lr far below float32 resolution: both see the initial weights at every step, so the GPU's
    # estimates differ from the CPU's by kernel rounding (and fp16's forward) only.
    sets = ['optimizer.name="sgd"', "optimizer.lr=1e-12", "run.epochs=1"]
    sets += ["train.noise_scale_split_every=1", f'train.precision="{precision}"']
    cpu = Trainer(_cfg(tmp_path / "cpu", "cpu", *sets[:-1]), synthetic).fit()[0]
    gpu = Trainer(_cfg(tmp_path / "gpu", "cuda", *sets), synthetic).fit()[0]
    assert cpu["noise_scale_steps"] == 10  # 600 / 64
    # An fp16 step whose scaled gradients overflow is skipped, and not counted.
    assert gpu["noise_scale_steps"] >= (10 if precision == "fp32" else 8)
    rel = 5e-3 if precision == "fp32" else 5e-2
    assert gpu["grad_trace_sigma"] == pytest.approx(cpu["grad_trace_sigma"], rel=rel)
    # |G|^2 is a small difference of squared norms of size E|G_B|^2 (near zero at initial weights).
    size = cpu["grad_norm_sq"] + cpu["grad_trace_sigma"] / 64
    assert gpu["grad_norm_sq"] == pytest.approx(cpu["grad_norm_sq"], abs=rel * size)
