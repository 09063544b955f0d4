"""forward_backward (train/steps.py): micro-batched gradients equal the full batch's."""

import pytest
import torch

from bigbatch.augment.mixup import MixedTargets
from bigbatch.models import build_model
from bigbatch.train.steps import forward_backward


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("micro", [1, 7, 64, 100])
def test_micro_batched_gradients_equal_full_batch(micro):
    torch.manual_seed(0)
    model = build_model("lenet5", 3, (32, 32), 10).double()
    x = torch.randn(100, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (100,))
    targets = MixedTargets(y, y.flip(0), 0.3)
    model.zero_grad()
    full_loss, full_hits = forward_backward(model, x, targets, micro=100)
    full = _grads(model)
    model.zero_grad()
    loss, hits = forward_backward(model, x, targets, micro=micro)
    assert float(loss) == pytest.approx(float(full_loss), rel=1e-12)
    assert float(hits) == pytest.approx(float(full_hits))
    for a, b in zip(_grads(model), full):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_micro_batched_gradients_float32_close():
    torch.manual_seed(0)
    model = build_model("lenet5", 3, (32, 32), 10)
    x, y = torch.randn(512, 3, 32, 32), torch.randint(0, 10, (512,))
    t = MixedTargets(y, y, 1.0)
    model.zero_grad()
    forward_backward(model, x, t, micro=512)
    full = _grads(model)
    model.zero_grad()
    forward_backward(model, x, t, micro=128)
    for a, b in zip(_grads(model), full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_channels_last_auto_follows_the_device_and_precision():
    from torch import nn

    from bigbatch.config import load_config
    from bigbatch.train.steps import use_channels_last

    conv, mlp = nn.Sequential(nn.Conv2d(3, 4, 3)), nn.Sequential(nn.Linear(3, 4))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")

    def cfg(*sets):
        return load_config(None, list(sets))

    assert use_channels_last(cfg(), cpu, conv)
    assert use_channels_last(cfg("train.precision=bf16"), cuda, conv)
    assert not use_channels_last(cfg(), cuda, conv)  # "auto" keeps NCHW for fp32 on a GPU
    assert not use_channels_last(cfg("train.precision=bf16"), cuda, mlp)
    assert not use_channels_last(cfg("runtime.channels_last=off"), cpu, conv)
    assert use_channels_last(cfg("runtime.channels_last=on"), cuda, mlp)
