"""The K-FAC preconditioner (optim/kfac/preconditioner.py): solves against the dense system,
damping, KL clipping, health counters, resume, the MC Fisher and training speed, in float64.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from kfac_oracles import D, linear_model, make_kfac, per_example_grads, step_once
from torch import nn

from bigbatch.optim.kfac import KFACPreconditioner


# -- preconditioning -------------------------------------------------------------------------------
def _one_layer(n=40):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3)).to(D)
    return model, torch.randn(n, 4, dtype=D), torch.randint(0, 3, (n,))


def _mse_step(model, x, target):
    model.zero_grad()
    F.mse_loss(model(x), target, reduction="none").sum(1).mean().backward()
    return torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1).flatten()


@pytest.mark.parametrize(
    "method, pi", [("eigen", False), ("eigen", True), ("inverse", False), ("inverse", True)]
)
@pytest.mark.parametrize("damping", [1e-12, 0.3])
def test_preconditioned_gradient_solves_the_dense_system(method, pi, damping):
    # A squared-error loss keeps G full rank (cross-entropy's G has the all-ones null vector).
    model, x, _ = _one_layer()
    target = torch.randn(x.shape[0], 3, dtype=D)
    kfac = make_kfac(model, damping=damping, inverse_method=method, pi_damping=pi)
    grad = _mse_step(model, x, target)
    kfac.step(lr=0.1)
    A, G = kfac.layers["0"].A, kfac.layers["0"].G
    n_a, n_g = A.shape[0], G.shape[0]
    if method == "eigen" and not pi:
        dense = torch.kron(G, A) + damping * torch.eye(n_a * n_g, dtype=D)
    else:
        # Martens & Grosse (2015), eq. of sec 6.3: (A + pi sqrt(lambda) I) (x) (G + sqrt(lambda)/pi
        # I) with pi^2 = (tr A / dim A) / (tr G / dim G); kron(G, A) in the row-major flattening.
        pi_mg = float(((A.trace() / n_a) / (G.trace() / n_g)).sqrt()) if pi else 1.0
        damped_a = A + pi_mg * math.sqrt(damping) * torch.eye(n_a, dtype=D)
        damped_g = G + math.sqrt(damping) / pi_mg * torch.eye(n_g, dtype=D)
        dense = torch.kron(damped_g, damped_a)
    expected = torch.linalg.solve(dense, grad)
    got = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1).flatten()
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)


@pytest.mark.filterwarnings("ignore:inverse_interval")  # decomposing unchanged factors is the point
@pytest.mark.parametrize("method, pi", [("eigen", False), ("eigen", True), ("inverse", True)])
def test_update_is_invariant_to_rescaling_the_factors(method, pi):
    # kron(G / c, A * c) = kron(G, A): exact Tikhonov and the pi split must give the same update
    # (a split with the roles of A and G exchanged would not; a fixed one, pi = 1, is not meant to).
    model, x, _ = _one_layer()
    target = torch.randn(x.shape[0], 3, dtype=D)
    updates = []
    for c in (1.0, 50.0):
        # Statistics on step 0 only; step 1 decomposes the (rescaled) loaded factors.
        kfac = make_kfac(
            model, damping=0.05, inverse_method=method, pi_damping=pi, factor_interval=2
        )
        _mse_step(model, x, target)
        kfac.step(lr=0.1)
        state = kfac.state_dict()
        state["layers"]["0"]["A"] *= c
        state["layers"]["0"]["G"] /= c
        kfac.load_state_dict(state)
        _mse_step(model, x, target)
        kfac.step(lr=0.1)
        updates.append(torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1))
        kfac.remove()
    assert updates[1].abs().max() > 0
    torch.testing.assert_close(updates[1], updates[0], rtol=1e-9, atol=1e-12)


def test_kl_clip_scales_the_update():
    model, x, y = _one_layer()
    kfac = make_kfac(model, damping=1e-3, kl_clip=1e-6)
    step_once(model, kfac, x, y)  # lr = 0.1
    g = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1)
    model2, _, _ = _one_layer()
    kfac2 = make_kfac(model2, damping=1e-3)
    step_once(model2, kfac2, x, y)
    unclipped = torch.cat([model2[0].weight.grad, model2[0].bias.grad[:, None]], 1)
    model2.zero_grad()
    F.cross_entropy(model2(x), y).backward()
    raw = torch.cat([model2[0].weight.grad, model2[0].bias.grad[:, None]], 1)
    nu = min(1.0, math.sqrt(1e-6 / (0.1**2 * float((unclipped * raw).sum()))))
    assert nu < 1
    torch.testing.assert_close(g, unclipped * nu)


def test_mc_fisher_uses_sampled_labels():
    model = linear_model()
    x, y = torch.randn(12, 5, dtype=D), torch.randint(0, 3, (12,))
    kfac = make_kfac(model, fisher_type="mc", seed=4)
    step_once(model, kfac, x, y)
    with torch.no_grad():
        probs = torch.softmax(model(x).float(), 1)
    sampled = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(4)).squeeze(1)
    _, gs = per_example_grads(model, model[2], x, sampled, lambda g: g)
    G = sum(torch.outer(g, g) for g in gs) / 12
    torch.testing.assert_close(kfac.layers["2"].G, G, rtol=1e-8, atol=1e-12)
    # The parameter gradients are the training loss's, untouched by the extra backward.
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    raw = model[2].weight.grad.clone()
    model.zero_grad()
    logits = model(x)
    kfac2 = make_kfac(model, fisher_type="mc", inverse_interval=10**6)
    kfac2.accumulate_mc_fisher(logits)
    F.cross_entropy(logits, y).backward()
    torch.testing.assert_close(model[2].weight.grad, raw)
    kfac2.remove()


# -- batch-size invariance -------------------------------------------------------------------------
def test_factors_and_damping_are_batch_size_invariant():
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    ).to(D)
    teacher = torch.randn(10, 3 * 8 * 8, dtype=D)

    def sample(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 3, 8, 8, generator=g, dtype=D)
        return x, (x.flatten(1) @ teacher.t()).argmax(1)

    results = {}
    for n in (128, 2048):
        kfac = make_kfac(model, damping=1e-2, inverse_interval=10**6)
        step_once(model, kfac, *sample(n, n), micro=256)
        results[n] = {k: (s.A.clone(), s.G.clone()) for k, s in kfac.layers.items()}
        kfac.remove()
    for name in results[128]:
        for small, large in zip(results[128][name], results[2048][name]):
            rel = float((small - large).norm() / large.norm())
            # Sampling error only: a batch-size factor would give ~16x.
            assert rel < 0.3, (
                name,
                rel,
            )
        # Traces (the scale damping is compared with) agree closely.
        for small, large in zip(results[128][name], results[2048][name]):
            assert float(small.trace() / large.trace()) == pytest.approx(1.0, abs=0.15)
    # The same damping has the same effect: precondition one fixed gradient with both sets of
    # factors (the conv layer, whose factors 128 examples x 64 locations estimate well).
    v = torch.randn(4, 3 * 9 + 1, dtype=D)
    outs = []
    for n in (128, 2048):
        kfac = make_kfac(model, damping=1e-2)
        s = kfac.layers["0"]
        s.A, s.G = results[n]["0"]
        outs.append(kfac.solve("0", v))
        kfac.remove()
    assert float((outs[0] - outs[1]).norm() / outs[1].norm()) < 0.2


# -- robustness, state, layers ---------------------------------------------------------------------
@pytest.mark.parametrize("failure", ["raise", "nan"])
def test_failed_eigendecomposition_is_retried_and_counted(monkeypatch, failure):
    model, x, y = _one_layer()
    kfac = make_kfac(model, damping=1e-3)
    real = torch.linalg.eigh
    calls = {"n": 0}

    def flaky(m, *a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            if failure == "raise":
                raise torch.linalg.LinAlgError("injected failure")
            d, q = real(m, *a, **k)
            q[0, 0] = float("nan")  # one non-finite entry in the eigenbasis
            return d, q
        return real(m, *a, **k)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    step_once(model, kfac, x, y)
    assert kfac.health["eigh_retries"] == 1 and kfac.layers["0"].decomposition is not None
    assert torch.isfinite(model[0].weight.grad).all()


def test_nonfinite_factor_never_crashes():
    model, x, y = _one_layer()
    kfac = make_kfac(model, damping=1e-3, factor_decay=0.5)
    step_once(model, kfac, x, y)
    before = kfac.layers["0"].decomposition
    # A non-finite statistic (e.g. an overflow) is skipped and counted.
    bad = x.clone()
    bad[0, 0] = float("inf")
    model.zero_grad()
    logits = model(bad)
    F.cross_entropy(logits[1:], y[1:]).backward()
    kfac.step(lr=0.1)
    assert kfac.health["nonfinite_factors"] >= 1
    assert torch.isfinite(kfac.layers["0"].A).all()
    # A factor that is non-finite when decomposed keeps the last good eigenbasis.
    kfac.layers["0"].A = torch.full_like(kfac.layers["0"].A, float("nan"))
    kfac.decompose(kfac.layers["0"])
    assert kfac.health["eigh_failures"] == 1
    assert all(torch.equal(a, b) for a, b in zip(kfac.layers["0"].decomposition, before))


def test_nonfinite_update_keeps_the_raw_gradient_and_is_counted():
    model, x, y = _one_layer()
    kfac = make_kfac(model, damping=1e-3, inverse_interval=100)
    step_once(model, kfac, x, y)
    kfac.layers["0"].scale[0, 0] = float("inf")  # as if a damped eigenvalue had underflowed to zero
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    raw = model[0].weight.grad.clone()
    kfac.step(lr=0.1)
    assert kfac.health["nonfinite_updates"] == 1
    assert torch.equal(model[0].weight.grad, raw)


def test_nonfinite_cholesky_inverse_falls_back_to_lu_and_is_counted(monkeypatch):
    model, x, y = _one_layer()
    kfac = make_kfac(model, damping=1e-3, inverse_method="inverse")
    step_once(model, kfac, x, y)
    state = kfac.layers["0"]
    real = torch.cholesky_inverse
    calls = {"n": 0}

    def flaky(chol, *a, **k):
        calls["n"] += 1
        inv = real(chol, *a, **k)
        if calls["n"] == 1:
            inv[-1, 0] = float("inf")
        return inv

    monkeypatch.setattr(torch, "cholesky_inverse", flaky)
    kfac.decompose(state)
    assert kfac.health["eigh_retries"] == 1
    a_inv, _ = state.decomposition
    torch.testing.assert_close(
        a_inv, torch.linalg.inv(state.A + math.sqrt(1e-3) * torch.eye(state.A.shape[0], dtype=D))
    )


def test_inverse_falls_back_to_lu_when_cholesky_fails():
    model, x, y = _one_layer()
    kfac = make_kfac(model, damping=1e-3, inverse_method="inverse")
    step_once(model, kfac, x, y)
    state = kfac.layers["0"]
    # Indefinite: no Cholesky factor, still invertible.
    state.A = -torch.eye(state.A.shape[0], dtype=D)
    kfac.decompose(state)
    assert kfac.health["eigh_retries"] == 1
    a_inv, _ = state.decomposition
    torch.testing.assert_close(
        a_inv, torch.linalg.inv(state.A + math.sqrt(1e-3) * torch.eye(state.A.shape[0], dtype=D))
    )


@pytest.mark.parametrize(
    "options",
    [
        dict(fisher_type="mc"),
        dict(fisher_type="mc", pi_damping=True),
        dict(inverse_method="inverse", pi_damping=True),
    ],
)
def test_state_dict_resume_is_bit_exact(options):
    def run(first, last, state=None):
        torch.manual_seed(0)
        model = linear_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        kfac = KFACPreconditioner(
            model, factor_interval=2, inverse_interval=3, seed=1, factor_dtype=D, **options
        )
        if state:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            kfac.load_state_dict(state["kfac"])
        for step in range(first, last):
            g = torch.Generator().manual_seed(100 + step)  # batch `step` is the same in both runs
            x, y = torch.randn(16, 5, generator=g, dtype=D), torch.randint(0, 3, (16,), generator=g)
            opt.zero_grad()
            logits = model(x)
            kfac.accumulate_mc_fisher(logits)
            F.cross_entropy(logits, y).backward()
            kfac.step(lr=0.1)
            opt.step()
        return model, {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "kfac": kfac.state_dict(),
        }

    # Stopped after step 4 (statistics at 4 changed A and G since the eigenbasis of step 3), then
    # resumed in fresh objects from a deep copy of the state, against one uninterrupted run of
    # 9 steps.
    _, mid = run(0, 5)
    resumed, _ = run(5, 9, copy.deepcopy(mid))
    straight, _ = run(0, 9)
    for a, b in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(a, b)


def test_skip_layers_and_unused_layer_warning():
    model = nn.ModuleDict(
        {"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2), "other": nn.Linear(2, 2)}
    ).to(D)
    kfac = KFACPreconditioner(model, skip_layers=["oth.*"])
    assert set(kfac.layers) == {"used", "unused"}
    x = torch.randn(4, 3, dtype=D)
    model["used"].train()
    out = model["used"](x)
    # ModuleDict has no forward: drive the layer directly and count examples by hand.
    kfac.examples_seen = 4
    out.pow(2).mean().backward()
    with pytest.warns(UserWarning, match="unused"):
        kfac.step(lr=0.1)
    with pytest.raises(ValueError, match="damping"):
        KFACPreconditioner(model, damping=0)


# -- training speed --------------------------------------------------------------------------------
def test_kfac_trains_faster_per_step_than_sgd():
    """An ill-conditioned problem (features on very different scales): curvature matters."""
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(-2, 1, 20)
    x = torch.randn(2048, 20, generator=g) * scales
    y = (x / scales) @ torch.randn(20, 5, generator=g)
    y = y.argmax(1)

    def train(use_kfac):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        kfac = (
            KFACPreconditioner(model, damping=1e-3, factor_interval=1, inverse_interval=5)
            if use_kfac
            else None
        )
        for step in range(60):
            idx = torch.randint(0, 2048, (256,), generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            if kfac:
                kfac.step(lr=0.05)
            opt.step()
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))

    sgd, kfac = train(False), train(True)
    assert kfac < 0.7 * sgd, (kfac, sgd)


@pytest.mark.data
@pytest.mark.slow
def test_kfac_lowers_cifar_loss_faster_per_step_than_sgd(tmp_path, cifar_zip):
    from bigbatch.config import load_config
    from bigbatch.train.trainer import Trainer

    losses = {}
    for name in ("sgd", "kfac"):
        cfg = load_config(
            None,
            [
                f"data.path={cifar_zip}",
                "data.train_limit=2560",
                "data.test_limit=500",
                f"runtime.output_dir={tmp_path}",
                f"run.name={name}",
                "run.epochs=3",
                "train.batch_size=128",
                "optimizer.lr=0.005",
                f"optimizer.name={name}",
                "runtime.progress=off",
                "kfac.factor_interval=1",
                "kfac.inverse_interval=10",
            ],
        )
        losses[name] = [r["train_loss"] for r in Trainer(cfg).fit()]
    # Same data order, same LR schedule, same number of steps (60): K-FAC ends lower.
    assert losses["kfac"][-1] < losses["sgd"][-1] - 0.05, losses


def _stepped_kfac(model, steps=2):
    kfac = make_kfac(model)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 5, generator=g, dtype=D), torch.randint(0, 3, (8,), generator=g)
        step_once(model, kfac, x, y)
    return kfac


def test_state_dict_and_load_state_dict_copy_their_tensors():
    model = linear_model()
    kfac = _stepped_kfac(model)
    saved = kfac.state_dict()
    before = saved["layers"]["0"]["A"].clone()
    step_once(model, kfac, torch.randn(8, 5, dtype=D), torch.randint(0, 3, (8,)))
    assert torch.equal(saved["layers"]["0"]["A"], before)  # the step did not reach the saved state
    other = make_kfac(linear_model())
    other.load_state_dict(saved)
    saved["layers"]["0"]["A"].add_(1.0)
    saved["layers"]["0"]["decomposition"][0].add_(1.0)
    assert torch.equal(other.layers["0"].A, before)  # nor does a change to the state afterwards
    assert not torch.equal(
        other.layers["0"].decomposition[0], saved["layers"]["0"]["decomposition"][0]
    )


@pytest.mark.cuda
def test_a_cpu_state_resumes_on_the_gpu_and_back():
    cpu_kfac = _stepped_kfac(linear_model())
    gpu_kfac = make_kfac(linear_model().cuda())
    gpu_kfac.load_state_dict(cpu_kfac.state_dict())
    state = gpu_kfac.layers["0"]
    assert state.A.is_cuda and state.G.is_cuda and all(t.is_cuda for t in state.decomposition)
    back = make_kfac(linear_model())
    back.load_state_dict(gpu_kfac.state_dict())
    torch.testing.assert_close(back.layers["0"].A, cpu_kfac.layers["0"].A, rtol=0, atol=0)
