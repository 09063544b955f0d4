"""Levenberg-Marquardt damping (optim/kfac/adaptive.py, Martens & Grosse 2015 section 6.5): the
reduction ratio against a hand computation on an exactly quadratic loss, the direction of the
damping's moves, bounds, resume, and that the analysis leaves BatchNorm's statistics alone."""

import pytest
import torch
import torch.nn.functional as F
from kfac_oracles import D, linear_model, make_kfac
from torch import nn


def _quadratic(n=32):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 3)).to(D)
    x, target = torch.randn(n, 4, dtype=D), torch.randn(n, 3, dtype=D)

    def loss_of_rows(z, start, size):  # mean over rows of 1/2 |z - t|^2: quadratic in theta
        return 0.5 * (z - target[start : start + size]).pow(2).sum(1).mean()

    return model, x, loss_of_rows


def _objective(model, x, loss_of_rows, weight_decay):
    with torch.no_grad():
        l2 = sum(p.pow(2).sum() for p in model.parameters())
        return float(loss_of_rows(model(x), 0, x.shape[0]) + weight_decay / 2 * l2)


def _step(model, kfac, x, loss_of_rows, lr, weight_decay, momentum=0.0):
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    model.zero_grad()
    loss_of_rows(model(x), 0, x.shape[0]).backward()
    before = kfac.adaptive.capture(model)
    kfac.step(lr=lr)
    optimizer.step()
    return before


@pytest.mark.parametrize("damping", [1e-10, 0.3])
def test_reduction_ratio_on_a_quadratic_is_the_exact_one(damping):
    # For a quadratic h the model M is exact except for the damping term it carries (M&G's
    # M(delta) = grad^T delta + 1/2 delta^T (F + (lambda + eta) I) delta): so rho equals
    # actual / (actual + lambda/2 |delta|^2), and 1 as lambda -> 0.
    model, x, loss_of_rows = _quadratic()
    weight_decay = 0.05
    kfac = make_kfac(
        model, damping=damping, adaptive_damping=True, adaptive_interval=1, min_damping=1e-12
    )
    h_before = _objective(model, x, loss_of_rows, weight_decay)
    theta = [p.detach().clone() for p in model.parameters()]
    before = _step(model, kfac, x, loss_of_rows, lr=0.3, weight_decay=weight_decay)
    actual = _objective(model, x, loss_of_rows, weight_decay) - h_before
    step_sq = sum(float((p.detach() - t).pow(2).sum()) for p, t in zip(model.parameters(), theta))
    rho = kfac.adaptive.reduction_ratio(
        model, x, loss_of_rows, before, damping, weight_decay, micro=x.shape[0]
    )
    assert actual < 0
    assert rho == pytest.approx(actual / (actual + damping / 2 * step_sq), rel=1e-10)
    if damping < 1e-6:
        assert rho == pytest.approx(1.0, abs=1e-6)
    # Micro-batches of the analysis add up to the same numbers.
    rho_micro = kfac.adaptive.reduction_ratio(
        model, x, loss_of_rows, before, damping, weight_decay, micro=5
    )
    assert rho_micro == pytest.approx(rho, rel=1e-10)


def _cross_entropy_problem():
    model = linear_model()
    torch.manual_seed(2)
    x, y = torch.randn(64, 5, dtype=D), torch.randint(0, 3, (64,))

    def loss_of_rows(z, start, size):
        return F.cross_entropy(z, y[start : start + size])

    return model, x, loss_of_rows


@pytest.mark.parametrize("lr, moves", [(1e-3, "down"), (1.0, "up")])
def test_damping_falls_when_the_model_predicts_well_and_rises_when_it_overpredicts(lr, moves):
    model, x, loss_of_rows = _cross_entropy_problem()
    kfac = make_kfac(model, damping=1e-2, adaptive_damping=True, adaptive_interval=3)
    before = _step(model, kfac, x, loss_of_rows, lr=lr, weight_decay=0.0)
    rho = kfac.adaptive.reduction_ratio(model, x, loss_of_rows, before, 1e-2, 0.0, micro=64)
    omega = (19 / 20) ** 3
    kfac.adapt_damping(model, x, loss_of_rows, before, weight_decay=0.0, micro=64)
    if moves == "down":
        assert rho > 0.75 and kfac.damping == pytest.approx(1e-2 * omega, rel=1e-12)
    else:  # a step far too long: the quadratic model promised much more than it got
        assert 0 < rho < 0.25 and kfac.damping == pytest.approx(1e-2 / omega, rel=1e-12)
    assert kfac.metrics()["kfac_damping"] == kfac.damping
    assert kfac.metrics()["kfac_reduction_ratio"] == pytest.approx(rho, rel=1e-12)


def test_damping_stays_within_its_bounds():
    model, x, loss_of_rows = _cross_entropy_problem()
    kfac = make_kfac(
        model, damping=1e-2, adaptive_damping=True, adaptive_interval=1, max_damping=1.005e-2
    )
    before = _step(model, kfac, x, loss_of_rows, lr=300.0, weight_decay=0.0)
    kfac.adapt_damping(model, x, loss_of_rows, before, weight_decay=0.0, micro=64)
    assert kfac.damping == 1.005e-2


def test_a_changed_damping_applies_at_the_next_solve():
    model, x, loss_of_rows = _cross_entropy_problem()
    kfac = make_kfac(model, damping=1e-2, inverse_interval=100)
    model.zero_grad()
    loss_of_rows(model(x), 0, 64).backward()
    kfac.step(lr=0.1)  # decomposes with damping 1e-2
    kfac.set_damping(0.5)
    state = kfac.layers["2"]
    v = torch.randn(state.factors.g_dim, state.factors.a_dim, dtype=D)
    dense = torch.kron(state.G, state.A) + 0.5 * torch.eye(v.numel(), dtype=D)
    expected = torch.linalg.solve(dense, v.flatten()).view_as(v)
    torch.testing.assert_close(kfac.solve("2", v), expected, rtol=1e-8, atol=1e-12)


def test_resume_carries_the_adapted_damping():
    model, x, loss_of_rows = _cross_entropy_problem()
    kfac = make_kfac(model, damping=1e-2, adaptive_damping=True, adaptive_interval=1)
    for _ in range(3):
        before = _step(model, kfac, x, loss_of_rows, lr=1e-3, weight_decay=0.0)
        kfac.adapt_damping(model, x, loss_of_rows, before, weight_decay=0.0, micro=64)
    assert kfac.damping < 1e-2
    other = make_kfac(linear_model(), damping=1e-2, adaptive_damping=True, adaptive_interval=1)
    other.load_state_dict(kfac.state_dict())
    assert other.damping == kfac.damping


def test_the_analysis_leaves_batchnorm_running_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(D)
    x, y = torch.randn(32, 5, dtype=D), torch.randint(0, 3, (32,))
    kfac = make_kfac(model, damping=1e-2, adaptive_damping=True, adaptive_interval=1)

    def loss_of_rows(z, start, size):
        return F.cross_entropy(z, y[start : start + size])

    before = _step(model, kfac, x, loss_of_rows, lr=0.01, weight_decay=0.0)
    mean, var = model[1].running_mean.clone(), model[1].running_var.clone()
    kfac.adapt_damping(model, x, loss_of_rows, before, weight_decay=0.0, micro=32)
    assert torch.equal(model[1].running_mean, mean) and torch.equal(model[1].running_var, var)
