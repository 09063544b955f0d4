"""The gradient noise scale (train/noise_scale.py) against a problem with a known gradient
covariance, and in the trainer against gradients recomputed part by part."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bigbatch.augment.mixup import MixedTargets
from bigbatch.config import load_config
from bigbatch.train.noise_scale import (
    NOISE_SCALE_KEYS,
    NoiseScaleEstimator,
    NoiseScaleProbe,
    split_keeps_the_maths,
)
from bigbatch.train.steps import forward_backward
from bigbatch.train.trainer import Trainer

DIM = 6
# Sigma = Q diag(EIGENVALUES) Q^T: tr(Sigma) = 32; |G|^2 = 0.5, so B_simple = 64.
EIGENVALUES = torch.tensor([16.0, 8.0, 4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
NORM_SQ = 0.5
STEPS = 16000


def _known_problem(parts: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """STEPS steps of per-example gradients G + Sigma^(1/2) z (z standard normal), cut into
    ``parts``: returns (sum_j b_j |g_j|^2, |G_B|^2) per step."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen, dtype=torch.float64))
    root = q * EIGENVALUES.sqrt()
    mean = torch.randn(DIM, generator=gen, dtype=torch.float64)
    mean *= (NORM_SQ / mean.square().sum()).sqrt()
    z = torch.randn(STEPS, sum(parts), DIM, generator=gen, dtype=torch.float64)
    examples = mean + z @ root.T
    part_means = [p.mean(1) for p in examples.split(parts, dim=1)]
    parts_sum = sum(b * g.square().sum(1) for b, g in zip(parts, part_means))
    return parts_sum, examples.mean(1).square().sum(1)


# Tolerances: about 4 standard errors of the STEPS-step means (relative standard errors, measured
# once: |G|^2 1%, tr(Sigma) 0.4-0.7%, B_simple 1.2%). A wrong formula misses by far more: without
# the 1 / (k - 1), tr(Sigma) x2 and x3 (3 and 4 parts); the unequal parts unweighted by size, +60%;
# the sign of S / B in |G|^2 flipped, x3; B_small and B_big swapped, a negative tr(Sigma); the mean
# of per-step ratios instead of the ratio of the means, 11, -34 and -126 for 64.
@pytest.mark.parametrize("parts", [[16, 16, 16, 16], [32, 32], [8, 24, 32]])
def test_estimates_converge_to_the_known_norm_and_trace(parts):
    parts_sum, full = _known_problem(parts)
    estimator = NoiseScaleEstimator()
    for s, f in zip(parts_sum, full):
        estimator.add(s, f, float(sum(parts)), len(parts))
    result = estimator.result()
    assert result["noise_scale_steps"] == STEPS
    assert result["grad_norm_sq"] == pytest.approx(NORM_SQ, rel=0.04)
    assert result["grad_trace_sigma"] == pytest.approx(float(EIGENVALUES.sum()), rel=0.025)
    assert result["grad_noise_scale"] == pytest.approx(64.0, rel=0.05)


def test_equal_parts_give_the_papers_two_batch_size_estimates():
    # McCandlish et al. appendix A.1 with B_small = 16 (the mean of |g|^2 over the 4 parts).
    parts_sum, full = _known_problem([16] * 4)
    small, big = parts_sum / 16 / 4, 64
    paper_norm = (big * full - 16 * small) / (big - 16)
    paper_trace = (small - full) / (1 / 16 - 1 / big)
    estimator = NoiseScaleEstimator()
    for s, f in zip(parts_sum[:50], full[:50]):
        estimator.add(s, f, 64.0, 4)
    result = estimator.result()
    assert result["grad_norm_sq"] == pytest.approx(float(paper_norm[:50].mean()), rel=1e-12)
    assert result["grad_trace_sigma"] == pytest.approx(float(paper_trace[:50].mean()), rel=1e-12)


def test_non_finite_steps_are_not_counted_and_no_step_gives_nulls():
    estimator = NoiseScaleEstimator()
    assert estimator.result() == {**dict.fromkeys(NOISE_SCALE_KEYS[:3]), "noise_scale_steps": 0}
    estimator.add(torch.tensor(float("inf")), torch.tensor(1.0), 64.0, 2)
    estimator.add(torch.tensor(3.0), torch.tensor(1.0), 4.0, 2)  # S = -1, |G|^2 = 1.25
    result = estimator.result()
    assert result["noise_scale_steps"] == 1
    assert result["grad_trace_sigma"] == pytest.approx(-1.0)
    assert result["grad_norm_sq"] == pytest.approx(1.25)
    assert result["grad_noise_scale"] is None  # a negative trace has no usable ratio


def _probe_metrics(scaler: torch.amp.GradScaler, micro: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x, y = torch.randn(40, 3, 2, 2), torch.randint(0, 5, (40,))
    probe = NoiseScaleProbe(1, model, 1, can_split=True, device=torch.device("cpu"))
    for index in range(3):
        model.zero_grad(set_to_none=True)
        size, callback = probe.begin_step(index, 40, micro)
        forward_backward(model, x, MixedTargets(y, y, 1.0), size, scaler=scaler,
                         after_backward=callback)  # fmt: skip
        probe.end_step([], torch.tensor(40.0, dtype=torch.float64), scaler)
    return probe.epoch_metrics()


@pytest.mark.parametrize("micro", [40, 10])
def test_a_loss_scale_is_divided_out(micro):
    plain = _probe_metrics(torch.amp.GradScaler("cpu", enabled=False), micro)
    scaled = _probe_metrics(torch.amp.GradScaler("cpu", init_scale=2.0**12), micro)
    assert plain["noise_scale_steps"] == 3
    for key in NOISE_SCALE_KEYS:
        assert scaled[key] == pytest.approx(plain[key], rel=1e-6), key


def test_splitting_is_refused_where_it_changes_the_maths():
    lenet = torch.nn.Sequential(nn.Linear(2, 2))
    bn = torch.nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    assert split_keeps_the_maths(load_config(None, []), lenet)
    assert not split_keeps_the_maths(load_config(None, []), bn)
    kfac = ["optimizer.name=kfac"]
    assert split_keeps_the_maths(load_config(None, kfac), lenet)
    assert not split_keeps_the_maths(load_config(None, [*kfac, "kfac.fisher_type=mc"]), lenet)
    assert not split_keeps_the_maths(load_config(None, [*kfac, "kfac.stats_fraction=0.5"]), lenet)


# -- in the trainer -------------------------------------------------------------------------------


def _cfg(tmp_path, *overrides):
    return load_config(
        None,
        [
            "data.format=synthetic",
            f"runtime.output_dir={tmp_path}",
            "run.name=t",
            "run.epochs=1",
            "train.batch_size=64",
            "runtime.progress=off",
            "train.train_eval_examples=0",
            "train.noise_scale_split_every=1",
            *overrides,
        ],
    )


def _subset(ds, n):
    return dataclasses.replace(
        ds, train_images=ds.train_images[:n], train_labels=ds.train_labels[:n]
    )


def _flat_grad(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()


# micro 0 (64 on the CPU): one micro-batch, split in two on measured steps; 16: four micro-batches.
# 520 examples end with a short batch of 8: one micro-batch either way, split into 4 + 4.
@pytest.mark.parametrize("micro", [0, 16])
def test_trainer_metrics_equal_the_papers_estimates_from_recomputed_gradients(
    tmp_path, synthetic, micro
):
    # A learning rate far below float32 resolution: every step sees the initial weights, so the
    # gradients can be recomputed afterwards.
    cfg = _cfg(tmp_path, "optimizer.lr=1e-12", f"runtime.micro_batch_size={micro}")
    trainer = Trainer(cfg, _subset(synthetic, 520))
    initial = copy.deepcopy(trainer.model)
    row = trainer.fit()[0]
    for a, b in zip(trainer.model.parameters(), initial.parameters()):
        assert torch.equal(a, b)
    norms, traces = [], []
    trainer.train_loader.set_epoch(0)
    for x, y in trainer.train_loader:
        x = x.contiguous(memory_format=trainer.memory_format)
        big = x.shape[0]
        k = 2 if micro == 0 or big <= micro else big // micro
        small = big // k
        full = _flat_grad(initial, x, y).square().sum()
        small_sq = torch.stack(
            [_flat_grad(initial, xp, yp).square().sum() for xp, yp in zip(x.split(small),
                                                                          y.split(small))]
        ).mean()  # fmt: skip
        norms.append((big * full - small * small_sq) / (big - small))
        traces.append((small_sq - full) / (1 / small - 1 / big))
    assert row["noise_scale_steps"] == len(norms) == 9
    norm, trace = float(torch.stack(norms).mean()), float(torch.stack(traces).mean())
    assert row["grad_norm_sq"] == pytest.approx(norm, rel=1e-4)
    assert row["grad_trace_sigma"] == pytest.approx(trace, rel=1e-4)
    # At the initial weights the mean gradient is small next to the noise of 64 examples.
    assert norm < 0 and row["grad_noise_scale"] is None


@pytest.mark.parametrize("micro", [0, 16])
def test_measuring_leaves_training_unchanged(tmp_path, synthetic, micro):
    data = _subset(synthetic, 576)  # 9 steps of 64: no short batch
    runs = {}
    for every in (None, 1, 3):
        cfg = _cfg(
            tmp_path / str(every),
            "run.epochs=2",
            "optimizer.lr=0.05",
            f"train.noise_scale={every is not None}".lower(),
            f"train.noise_scale_split_every={every or 0}",
            f"runtime.micro_batch_size={micro}",
        )
        trainer = Trainer(cfg, data)
        rows = trainer.fit()
        runs[every] = (rows, [p.detach().clone() for p in trainer.model.parameters()])
    off_rows, off_params = runs[None]
    assert [r["noise_scale_steps"] for r in off_rows] == [0, 0]
    assert off_rows[0]["grad_noise_scale"] is None
    # Split: steps 0, 3, 6 of 9; in micro-batches already: every step.
    assert [r["noise_scale_steps"] for r in runs[3][0]] == ([9, 9] if micro else [3, 3])
    for every in (1, 3):
        rows, params = runs[every]
        assert all(r["grad_trace_sigma"] > 0 for r in rows)
        for a, b in zip(params, off_params):
            if micro:  # the micro-batches are read, not changed: the same bits
                assert torch.equal(a, b)
            else:  # the split changes only float rounding
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_split_leaves_a_kfac_step_unchanged(tmp_path, synthetic):
    # Three steps: later, K-FAC amplifies float rounding (max-pooling near-ties) as it does for
    # any other change of micro-batches.
    params = []
    for on in ("false", "true"):
        cfg = _cfg(
            tmp_path / on,
            f"train.noise_scale={on}",
            "optimizer.name=kfac",
            "kfac.factor_interval=1",
            "kfac.inverse_interval=2",
        )
        trainer = Trainer(cfg, _subset(synthetic, 192))
        assert trainer.fit()[0]["noise_scale_steps"] == (3 if on == "true" else 0)
        params.append([p.detach().clone() for p in trainer.model.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "overrides", [["model.name=resnet20"], ["train.noise_scale_split_every=0"]]
)
def test_a_batch_in_one_piece_is_not_split_for_batchnorm_or_when_told(
    tmp_path, synthetic, overrides
):
    row = Trainer(_cfg(tmp_path, *overrides), _subset(synthetic, 128)).fit()[0]
    assert row["noise_scale_steps"] == 0 and row["grad_noise_scale"] is None
