"""Ghost BatchNorm (models/ghost_bn.py) against per-slice BatchNorm and Hoffer et al.'s formulas,
in float64, and micro-batches of whole ghost batches (train/steps.py)."""

import copy

import pytest
import torch
from torch import nn

from bigbatch.augment.mixup import MixedTargets
from bigbatch.config import load_config
from bigbatch.models import GhostBatchNorm2d, build_model, micro_batch_unit
from bigbatch.train.steps import forward_backward, micro_batch_size


def _ghost(channels=3, ghost=4, momentum=0.1):
    torch.manual_seed(0)
    bn = GhostBatchNorm2d(channels, ghost, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


def test_training_output_and_statistics_follow_hoffer_et_al():
    bn = _ghost()
    x = torch.randn(10, 3, 5, 5, dtype=torch.float64) * 2 + 1  # slices of 4, 4 and 2
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    out = bn(x)
    eta, mean, var = 0.1, mean0, var0
    for start, stop in ((0, 4), (4, 8), (8, 10)):
        piece = x[start:stop]
        n = piece.numel() / 3
        mu = piece.mean(dim=(0, 2, 3))
        biased = ((piece - mu.view(1, 3, 1, 1)) ** 2).mean(dim=(0, 2, 3))
        expected = (piece - mu.view(1, 3, 1, 1)) / (biased.view(1, 3, 1, 1) + bn.eps).sqrt()
        expected = expected * bn.weight.view(1, 3, 1, 1) + bn.bias.view(1, 3, 1, 1)
        torch.testing.assert_close(out[start:stop], expected, rtol=1e-12, atol=1e-12)
        mean = (1 - eta) * mean + eta * mu
        var = (1 - eta) * var + eta * biased * n / (n - 1)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-14)
    assert int(bn.num_batches_tracked) == 3


def test_equals_batchnorm_applied_slice_by_slice_values_and_gradients():
    ghost = _ghost(ghost=3)
    plain = nn.BatchNorm2d(3).double()
    plain.load_state_dict(ghost.state_dict())
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    weights = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    (ghost(x) * weights).sum().backward()
    reference = torch.cat([plain(piece) for piece in x_ref.split(3)])
    (reference * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(ghost.weight.grad, plain.weight.grad)
    torch.testing.assert_close(ghost.bias.grad, plain.bias.grad)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(ghost.state_dict()[key], value)


def test_evaluation_is_plain_batchnorm():
    ghost = _ghost()
    plain = nn.BatchNorm2d(3).double()
    plain.load_state_dict(ghost.state_dict())
    ghost.eval()
    plain.eval()
    x = torch.randn(9, 3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(ghost(x), plain(x))


def test_a_batch_no_larger_than_the_ghost_batch_is_plain_batchnorm():
    ghost = _ghost(ghost=16)
    plain = copy.deepcopy(ghost)
    x = torch.randn(16, 3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(ghost(x), nn.BatchNorm2d.forward(plain, x))


def _resnet(ghost):
    torch.manual_seed(0)
    return build_model("resnet20", 3, (16, 16), 10, ghost_batch_size=ghost).double()


def test_resnet_norms_are_ghost_batchnorm_and_keep_their_names():
    model = _resnet(8)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert names and all(isinstance(model.get_submodule(n), GhostBatchNorm2d) for n in names)
    assert set(model.state_dict()) == set(_resnet(0).state_dict())
    assert micro_batch_unit(model) == 8 and micro_batch_unit(_resnet(0)) == 0


@pytest.mark.parametrize("micro", [8, 16])
def test_micro_batches_of_whole_ghost_batches_change_nothing(micro):
    full, split = _resnet(8), _resnet(8)
    x = torch.randn(32, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (32,))
    targets = MixedTargets(y, y, 1.0)
    loss_full, _ = forward_backward(full, x, targets, micro=32)
    loss_split, _ = forward_backward(split, x, targets, micro=micro)
    assert float(loss_split) == pytest.approx(float(loss_full), rel=1e-12)
    for a, b in zip(split.parameters(), full.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)
    for (key, a), b in zip(split.state_dict().items(), full.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=key)


def test_micro_batch_size_picks_whole_ghost_batches(tmp_path):
    cpu = torch.device("cpu")
    cfg = load_config(None, ['model.name="resnet20"'])
    assert micro_batch_size(cfg, _resnet(0), cpu, 1024) == 1024  # plain BN: never split
    assert micro_batch_size(cfg, _resnet(24), cpu, 1024) == 240  # 256 rounded down to 24s
    assert micro_batch_size(cfg, _resnet(300), cpu, 1024) == 300
    assert micro_batch_size(cfg, _resnet(24), cpu, 100) == 100


def test_lenet5_has_no_batchnorm_for_a_ghost_batch_size():
    with pytest.raises(ValueError, match="no BatchNorm"):
        build_model("lenet5", 3, (32, 32), 10, ghost_batch_size=4)
