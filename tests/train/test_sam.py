"""SAM (train/sam.py): the two-gradient step of Foret et al. by hand, BatchNorm statistics kept
from the first pass only, and an fp16 overflow left for the gradient scaler."""

import math

import pytest
import torch
from torch import nn

from bigbatch.augment.mixup import MixedTargets
from bigbatch.config.schema import OptimizerConfig
from bigbatch.optim.optimizers import build_optimizer
from bigbatch.train.sam import SAM
from bigbatch.train.steps import forward_backward


def _least_squares():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(6, generator=gen, dtype=torch.float64)
    return x, y


def _hand_gradient(x, y, w, b):
    """d/d(w, b) of mean((x w + b - y)^2)."""
    r = x @ w + b - y
    return 2 * x.T @ r / len(y), 2 * r.mean()


def test_sam_step_equals_the_two_gradient_hand_computation():
    x, y = _least_squares()
    torch.manual_seed(1)
    model = nn.Linear(4, 1).double()
    w0, b0 = model.weight.detach()[0].clone(), model.bias.detach()[0].clone()

    def backward():
        ((model(x)[:, 0] - y) ** 2).mean().backward()

    rho, lr, decay = 0.3, 0.1, 0.01
    optimizer = build_optimizer(
        OptimizerConfig(name="sgd", lr=lr, momentum=0.0, weight_decay=decay), model
    )
    backward()
    calls = []
    SAM(model, rho).replace_gradient(backward, lambda: calls.append("reduce"))
    assert calls == ["reduce"]  # the second gradient is reduced over ranks too

    gw, gb = _hand_gradient(x, y, w0, b0)
    norm = math.sqrt(float((gw**2).sum() + gb**2))  # one norm over all parameters
    ew, eb = rho * gw / norm, rho * gb / norm
    gw2, gb2 = _hand_gradient(x, y, w0 + ew, b0 + eb)
    assert torch.equal(model.weight.detach()[0], w0) and torch.equal(model.bias.detach()[0], b0)
    torch.testing.assert_close(model.weight.grad[0], gw2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model.bias.grad[0], gb2, rtol=1e-12, atol=1e-14)
    optimizer.step()  # from w, with the gradient of the ascent point (and w's weight decay)
    torch.testing.assert_close(model.weight.detach()[0], w0 - lr * (gw2 + decay * w0))


def _bn_model():
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)
    ).double()


def test_second_pass_uses_batch_statistics_but_leaves_running_statistics():
    model = _bn_model()
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (8,))
    targets = MixedTargets(y, y, 1.0)
    forward_backward(model, x, targets, micro=8)
    after_first = {k: v.clone() for k, v in model.state_dict().items()}
    # By hand: the model moved to the ascent point, in training mode, a fresh gradient.
    twin = _bn_model()
    twin.load_state_dict(after_first)
    grads = [p.grad for p in model.parameters()]
    norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
    with torch.no_grad():
        for q, g in zip(twin.parameters(), grads):
            q.add_(0.05 * g / norm)
    forward_backward(twin, x, targets, micro=8)

    SAM(model, 0.05).replace_gradient(lambda: forward_backward(model, x, targets, 8), lambda: None)
    for key, value in model.state_dict().items():  # weights and BN buffers as after pass one
        assert torch.equal(value, after_first[key]), key
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


def test_an_overflowed_first_gradient_is_left_for_the_scaler():
    model = nn.Linear(3, 2)
    model.weight.grad = torch.full((2, 3), float("inf"))
    model.bias.grad = torch.ones(2)
    before = [p.detach().clone() for p in model.parameters()]

    def never():
        raise AssertionError("no second pass after an overflow")

    SAM(model, 0.05).replace_gradient(never, never, skip_overflow=True)
    assert torch.isinf(model.weight.grad).all()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_rho_must_be_positive():
    with pytest.raises(ValueError, match="rho"):
        SAM(nn.Linear(2, 2), 0.0)
