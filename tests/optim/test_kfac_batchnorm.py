"""BatchNorm curvature (optim/kfac/batchnorm.py): each channel's 2x2 block against the brute-force
per-example Fisher of (gamma, beta) with the normalized activations held fixed, the damped solve
against a dense one, and a ResNet-8 that trains with it."""

import pytest
import torch
import torch.nn.functional as F
from kfac_oracles import D, make_kfac, step_once
from torch import nn

from bigbatch.optim.kfac import KFACPreconditioner


def _bn_model(channels=3, batchnorm1d=False):
    torch.manual_seed(0)
    if batchnorm1d:
        layers = [nn.Linear(5, channels), nn.BatchNorm1d(channels), nn.Tanh()]
        layers.append(nn.Linear(channels, 4))
    else:
        layers = [nn.Conv2d(2, channels, 3), nn.BatchNorm2d(channels), nn.Tanh(), nn.Flatten()]
        layers.append(nn.Linear(channels * 4 * 4, 4))
    model = nn.Sequential(*layers).to(D)
    with torch.no_grad():  # away from the (1, 0) initialization, so gamma's role is visible
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def _batch(batchnorm1d, n=12):
    torch.manual_seed(1)
    x = torch.randn(n, 5, dtype=D) if batchnorm1d else torch.randn(n, 2, 6, 6, dtype=D)
    return x, torch.randint(0, 4, (n,))


def _brute_force_blocks(model, x, y):
    """F_c = mean_n [dgamma_nc, dbeta_nc]^T [dgamma_nc, dbeta_nc] from each example's own loss, the
    layer's output rebuilt as gamma * xhat + beta with xhat (the batch's normalization) fixed."""
    bn = model[1]
    pre = model[0](x).detach()
    dims = [0, *range(2, pre.dim())]
    ghost = getattr(bn, "ghost_batch_size", 0) or len(x)  # ghost BN: each slice on its own
    slices = []
    for piece in pre.split(ghost):
        mean, var = piece.mean(dims, keepdim=True), piece.var(dims, keepdim=True, unbiased=False)
        slices.append((piece - mean) / torch.sqrt(var + bn.eps))
    xhat = torch.cat(slices)
    shape = [1, -1] + [1] * (pre.dim() - 2)
    out = bn.weight.view(shape) * xhat + bn.bias.view(shape)
    logits = nn.Sequential(*list(model)[2:])(out)
    grads = []
    for n in range(x.shape[0]):
        dg, db = torch.autograd.grad(
            F.cross_entropy(logits[n : n + 1], y[n : n + 1]),
            [bn.weight, bn.bias],
            retain_graph=True,
        )
        grads.append(torch.stack([dg, db], 1))  # [C, 2]
    per_example = torch.stack(grads)  # [N, C, 2]
    return torch.einsum("nci,ncj->cij", per_example, per_example) / x.shape[0]


@pytest.mark.parametrize("batchnorm1d", [False, True])
@pytest.mark.parametrize("fisher_type", ["empirical"])
def test_each_block_equals_the_per_example_fisher(batchnorm1d, fisher_type):
    model = _bn_model(batchnorm1d=batchnorm1d)
    x, y = _batch(batchnorm1d)
    kfac = make_kfac(model, fisher_type=fisher_type)
    expected = _brute_force_blocks(model, x, y)
    step_once(model, kfac, x, y)
    state = kfac.layers["1"]
    torch.testing.assert_close(state.blocks(), expected, rtol=1e-10, atol=1e-14)
    assert expected[:, 0, 1].abs().max() > 1e-4  # the off-diagonal terms are not trivially 0


def test_ghost_batchnorm_blocks_use_each_slices_normalization():
    from bigbatch.models.ghost_bn import GhostBatchNorm2d

    model = _bn_model()
    ghost = GhostBatchNorm2d(3, ghost_batch_size=4).to(D)
    ghost.load_state_dict(model[1].state_dict())
    model[1] = ghost
    x, y = _batch(False)
    kfac = make_kfac(model)
    expected = _brute_force_blocks(model, x, y)
    step_once(model, kfac, x, y)
    torch.testing.assert_close(kfac.layers["1"].blocks(), expected, rtol=1e-10, atol=1e-14)


def test_sampled_statistics_normalize_with_the_whole_micro_batch():
    # stats_fraction keeps the first half of the examples, but their xhat uses the batch's mean.
    model = _bn_model()
    x, y = _batch(False, n=16)
    kfac = make_kfac(model, stats_fraction=0.5)
    step_once(model, kfac, x, y)
    full = _bn_model()
    per_example_half = _brute_force_blocks(full, x, y)  # over all 16, for the scale below
    got = kfac.layers["1"].blocks()
    # Brute force over the first 8 examples of the same 16-example normalization:
    bn = full[1]
    pre = full[0](x).detach()
    mean, var = pre.mean([0, 2, 3], keepdim=True), pre.var([0, 2, 3], keepdim=True, unbiased=False)
    xhat = (pre - mean) / torch.sqrt(var + bn.eps)
    out = bn.weight.view(1, -1, 1, 1) * xhat + bn.bias.view(1, -1, 1, 1)
    logits = nn.Sequential(*list(full)[2:])(out)
    rows = []
    for n in range(8):
        dg, db = torch.autograd.grad(
            F.cross_entropy(logits[n : n + 1], y[n : n + 1]),
            [bn.weight, bn.bias],
            retain_graph=True,
        )
        rows.append(torch.stack([dg, db], 1))
    g = torch.stack(rows)
    expected = torch.einsum("nci,ncj->cij", g, g) / 8
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)
    assert not torch.allclose(expected, per_example_half)


@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_batchnorm_gradient_is_the_damped_block_solve(damping):
    model = _bn_model()
    x, y = _batch(False)
    blocks = _brute_force_blocks(model, x, y)
    kfac = make_kfac(model, damping=damping)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    raw = torch.stack([model[1].weight.grad, model[1].bias.grad], 1).clone()
    kfac.step(lr=0.1)
    damped = blocks + damping * torch.eye(2, dtype=D)
    expected = torch.linalg.solve(damped, raw.unsqueeze(-1)).squeeze(-1)
    got = torch.stack([model[1].weight.grad, model[1].bias.grad], 1)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-12)


def test_batchnorm_none_leaves_the_raw_gradient():
    model = _bn_model()
    x, y = _batch(False)
    kfac = make_kfac(model, batchnorm="none")
    assert "1" not in kfac.layers
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    raw = model[1].weight.grad.clone()
    kfac.step(lr=0.1)
    assert torch.equal(model[1].weight.grad, raw)


def test_resumed_batchnorm_state_continues_exactly():
    model, x, y = _bn_model(), *_batch(False)
    kfac = make_kfac(model, factor_decay=0.9, inverse_interval=2)
    step_once(model, kfac, x, y)
    other_model = _bn_model()
    other_model.load_state_dict(model.state_dict())
    other = make_kfac(other_model, factor_decay=0.9, inverse_interval=2)
    other.load_state_dict(kfac.state_dict())
    for m, k in ((model, kfac), (other_model, other)):
        step_once(m, k, x.flip(0), y.flip(0))
    assert torch.equal(other.layers["1"].F, kfac.layers["1"].F)
    assert torch.equal(other_model[1].weight.grad, model[1].weight.grad)


@pytest.mark.slow
def test_resnet8_trains_with_batchnorm_curvature(synthetic):
    from bigbatch.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet8", synthetic.channels, synthetic.image_size, synthetic.num_classes)
    kfac = KFACPreconditioner(model, factor_interval=1, inverse_interval=20, damping=1e-2)
    assert sum(isinstance(s.factors.module, nn.BatchNorm2d) for s in kfac.layers.values()) == 7
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = synthetic.train_images[:64, :, :16, :16].float() / 255  # small images keep it quick
    y = synthetic.train_labels[:64]
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        kfac.step(lr=0.05)
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0]
    assert kfac.health["nonfinite_updates"] == 0 and kfac.health["eigh_failures"] == 0
