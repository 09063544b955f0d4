"""LARS, LAMB and Muon (optim/lars.py, lamb.py, muon.py, optimizers.py): the first steps against
the papers' formulas computed by hand in float64."""

import io
import math

import pytest
import torch
from torch import nn

from bigbatch.config.schema import OptimizerConfig
from bigbatch.models import LeNet5
from bigbatch.optim.lamb import LAMB
from bigbatch.optim.lars import LARS
from bigbatch.optim.muon import CombinedOptimizer, MatrixMuon
from bigbatch.optim.optimizers import build_optimizer, group_lr, muon_split


def _tiny():
    torch.manual_seed(0)
    return nn.Linear(4, 3).double()


def _set_grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    return [p.grad.clone() for p in model.parameters()]


def _norm(t):
    return math.sqrt(float((t * t).sum()))


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_two_steps_follow_you_et_al(nesterov):
    model = _tiny()
    eta, decay, momentum = 0.02, 1e-2, 0.9
    opt = LARS(model.parameters(), 1.0, momentum, decay, trust_coefficient=eta, nesterov=nesterov)
    w, b = (p.detach().clone() for p in model.parameters())
    buf_w, buf_b = torch.zeros_like(w), torch.zeros_like(b)
    # The rate changes between the steps: the paper's buffer holds rate-scaled steps.
    for seed, lr in ((1, 0.5), (2, 0.2)):
        gw, gb = _set_grads(model, seed)
        opt.param_groups[0]["lr"] = lr
        opt.step()
        local = eta * _norm(w) / (_norm(gw) + decay * _norm(w))
        step_w = lr * local * (gw + decay * w)
        buf_w = momentum * buf_w + step_w
        step_b = lr * gb  # 1-D: plain momentum SGD, no trust ratio, no weight decay
        buf_b = momentum * buf_b + step_b
        w = w - (step_w + momentum * buf_w if nesterov else buf_w)
        b = b - (step_b + momentum * buf_b if nesterov else buf_b)
        torch.testing.assert_close(model.weight.detach(), w, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(model.bias.detach(), b, rtol=1e-12, atol=1e-14)


def test_lars_adapts_1d_parameters_when_asked():
    model = _tiny()
    opt = LARS(model.parameters(), 1.0, 0.0, 0.1, trust_coefficient=0.01, exclude_1d=False)
    b = model.bias.detach().clone()
    _, gb = _set_grads(model, 3)
    opt.step()
    local = 0.01 * _norm(b) / (_norm(gb) + 0.1 * _norm(b))
    torch.testing.assert_close(model.bias.detach(), b - local * (gb + 0.1 * b))


def test_lars_zero_weights_take_the_plain_rate():
    model = _tiny()
    with torch.no_grad():
        model.weight.zero_()
    opt = LARS(model.parameters(), 0.1, 0.0, 0.0)
    gw, _ = _set_grads(model, 4)
    opt.step()
    torch.testing.assert_close(model.weight.detach(), -0.1 * gw)


def test_lamb_two_steps_follow_you_et_al():
    model = _tiny()
    lr, b1, b2, eps, decay = 0.1, 0.8, 0.95, 1e-6, 0.05
    opt = LAMB(model.parameters(), lr, (b1, b2), eps, decay)
    w, b = (p.detach().clone() for p in model.parameters())
    mw, vw, mb, vb = (torch.zeros_like(t) for t in (w, w, b, b))
    for t, seed in ((1, 5), (2, 6)):
        gw, gb = _set_grads(model, seed)
        opt.step()
        mw, vw = b1 * mw + (1 - b1) * gw, b2 * vw + (1 - b2) * gw**2
        mb, vb = b1 * mb + (1 - b1) * gb, b2 * vb + (1 - b2) * gb**2
        rw = (mw / (1 - b1**t)) / ((vw / (1 - b2**t)).sqrt() + eps)
        rb = (mb / (1 - b1**t)) / ((vb / (1 - b2**t)).sqrt() + eps)
        u = rw + decay * w
        w = w - lr * _norm(w) / _norm(u) * u
        b = b - lr * rb  # 1-D: Adam's step, no trust ratio, no weight decay
        torch.testing.assert_close(model.weight.detach(), w, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(model.bias.detach(), b, rtol=1e-12, atol=1e-14)


def test_lamb_first_step_has_norm_lr_times_weight_norm():
    # The trust ratio makes every layer's step lr * |w| long, whatever the gradient's size.
    model = _tiny()
    w = model.weight.detach().clone()
    _set_grads(model, 7)
    LAMB(model.parameters(), 0.1, weight_decay=0.0).step()
    assert _norm(model.weight.detach() - w) == pytest.approx(0.1 * _norm(w), rel=1e-9)


def _newton_schulz(g, steps=5, a=3.4445, b=-4.7750, c=2.0315):
    """Muon's quintic iteration in float64, written from its definition."""
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / _norm(x)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.shape[0] > g.shape[1] else x


@pytest.mark.parametrize("shape", [(8, 5), (5, 8), (6, 2, 3, 3)])
def test_muon_first_step_is_the_orthogonalized_gradient(shape):
    torch.manual_seed(1)
    weight = nn.Parameter(torch.randn(shape))
    w0 = weight.detach().clone().double()
    lr, decay = 0.02, 0.1
    opt = MatrixMuon([weight], lr=lr, momentum=0.95, nesterov=True, weight_decay=decay)
    weight.grad = torch.randn(shape)
    g = weight.grad.double().reshape(shape[0], -1)  # conv: its (out, in * kh * kw) matrix
    opt.step()
    rows, cols = g.shape
    adjusted = lr * math.sqrt(max(1.0, rows / cols))  # torch.optim.Muon's "original" scaling
    # w1 = (1 - lr * decay) w0 - adjusted * NS(momentum), the momentum a multiple of g at step 1.
    update = ((1 - lr * decay) * w0 - weight.detach().double()).reshape(rows, cols) / adjusted
    # torch iterates in bfloat16 (8 significant bits): about 1-4% over five iterations.
    expected = _newton_schulz(g)
    assert _norm(update - expected) / _norm(expected) < 0.05
    # The quintic gives U S' V^T, S' in (0.5, 1.5) (Jordan et al.), not exactly U V^T.
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    core = u.T @ update @ vh.T
    diagonal = torch.diagonal(core)
    assert bool(((diagonal > 0.5) & (diagonal < 1.5)).all()), diagonal
    assert float((core - torch.diag(diagonal)).abs().max()) < 0.03
    assert _norm(update - u @ vh) / _norm(u @ vh) < 0.3


def test_muon_on_a_conv_weight_equals_torch_muon_on_its_matrix():
    torch.manual_seed(2)
    conv = nn.Parameter(torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last))
    matrix = nn.Parameter(conv.detach().reshape(4, -1).clone())
    ours = MatrixMuon([conv], lr=0.05, momentum=0.9, nesterov=False, weight_decay=0.01)
    ref = torch.optim.Muon([matrix], lr=0.05, momentum=0.9, nesterov=False, weight_decay=0.01)
    for _ in range(3):
        g = torch.randn(4, 3, 3, 3)
        conv.grad, matrix.grad = g.clone(), g.reshape(4, -1).clone()
        ours.step()
        ref.step()
    assert torch.equal(conv.detach().reshape(4, -1), matrix.detach())
    assert conv.is_contiguous(memory_format=torch.channels_last)


def test_muon_takes_hidden_weights_and_leaves_biases_and_the_head():
    model = LeNet5(3, (32, 32), 10)
    matrices, rest = muon_split(model)
    assert {id(p) for p in matrices} == {
        id(model.conv1.weight),
        id(model.conv2.weight),
        id(model.fc1.weight),
        id(model.fc2.weight),
    }
    assert id(model.fc3.weight) in {id(p) for p in rest}
    assert len(matrices) + len(rest) == len(list(model.parameters()))


@pytest.mark.parametrize("rest", ["sgd", "adamw"])
def test_muon_companion_follows_the_schedule_at_its_own_rate(rest):
    model = LeNet5(3, (32, 32), 10)
    cfg = OptimizerConfig(name="muon", lr=0.02, muon_rest=rest, muon_rest_lr=0.004)
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, CombinedOptimizer)
    muon, companion = opt.parts
    assert isinstance(muon, MatrixMuon)
    assert isinstance(companion, torch.optim.AdamW if rest == "adamw" else torch.optim.SGD)
    for group in opt.param_groups:  # the schedule halves the rate: both halve
        group["lr"] = group_lr(group, 0.01)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.01)
    assert companion.param_groups[0]["lr"] == pytest.approx(0.002)


def test_combined_state_round_trips():
    torch.manual_seed(3)
    model = LeNet5(3, (32, 32), 10)
    cfg = OptimizerConfig(name="muon", muon_rest="adamw")
    opt = build_optimizer(cfg, model)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    twin = LeNet5(3, (32, 32), 10)
    twin.load_state_dict(model.state_dict())
    twin_opt = build_optimizer(cfg, twin)
    saved = io.BytesIO()  # as a checkpoint does: no tensor shared with the original
    torch.save(opt.state_dict(), saved)
    twin_opt.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    for m in (model, twin):
        m.zero_grad()
        m(torch.ones(2, 3, 32, 32)).sum().backward()
    opt.step()
    twin_opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
