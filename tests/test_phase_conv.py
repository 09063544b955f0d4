"""PhaseConv2d + max_over_phases against nn.Conv2d + max_pool2d: values, gradients, K-FAC factors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bigbatch.models import LeNet5
from bigbatch.models.phase_conv import PhaseConv2d, max_over_phases
from bigbatch.optim.kfac.layers import make_layer_factors


def _to_phases(y: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, 4C, H/2, W/2], channel p*C + c = pixel (2i + p//2, 2j + p%2) of channel c."""
    n, c, h, w = y.shape
    return y.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(n, 4 * c, h // 2, w // 2)


def _pair(padding=0, bias=True):
    g = torch.Generator().manual_seed(0)
    phase = PhaseConv2d(3, 5, 5, padding=padding, bias=bias).double()
    plain = nn.Conv2d(3, 5, 5, padding=padding, bias=bias).double()
    with torch.no_grad():
        phase.weight.copy_(torch.randn(phase.weight.shape, generator=g, dtype=torch.float64))
        plain.weight.copy_(phase.weight)
        if bias:
            phase.bias.copy_(torch.randn(5, generator=g, dtype=torch.float64))
            plain.bias.copy_(phase.bias)
    return phase, plain


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("padding, bias, size", [(0, True, (16, 12)), (1, False, (14, 18)), (2, True, (10, 12))])
def test_phase_conv_is_the_convolution_in_phase_layout(memory_format, padding, bias, size):
    phase, plain = _pair(padding, bias)
    x = torch.randn(4, 3, *size, dtype=torch.float64).contiguous(memory_format=memory_format)
    y = phase(x)
    torch.testing.assert_close(y, _to_phases(plain(x)), rtol=1e-12, atol=1e-12)
    # Same parameter gradients for the same upstream gradient.
    up = torch.randn(y.shape, dtype=torch.float64)
    grads = torch.autograd.grad(y, list(phase.parameters()), up)
    ref = torch.autograd.grad(plain(x), list(plain.parameters()), _from_phases(up))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _from_phases(t: torch.Tensor) -> torch.Tensor:
    n, c4, h, w = t.shape
    c = c4 // 4
    return t.reshape(n, 2, 2, c, h, w).permute(0, 3, 4, 1, 5, 2).reshape(n, c, 2 * h, 2 * w)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_max_over_phases_is_max_pool2d_ties_included(memory_format):
    g = torch.Generator().manual_seed(1)
    # Small integers: most windows hold ties, which max_pool2d resolves to the first in scan order.
    y = torch.randint(-2, 3, (3, 6, 10, 12), generator=g).double()
    phases = _to_phases(y).contiguous(memory_format=memory_format)
    with torch.inference_mode():
        assert torch.equal(max_over_phases(phases), F.max_pool2d(y, 2))
    p = phases.clone().requires_grad_()
    yy = y.clone().requires_grad_()
    out = max_over_phases(p)
    assert torch.equal(out.detach(), F.max_pool2d(y, 2))
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, p, up)
    (ref,) = torch.autograd.grad(F.max_pool2d(yy, 2), yy, up)
    assert torch.equal(grad, _to_phases(ref))
    # Its backward is differentiable in the upstream gradient (Hessian-vector products need that).
    up2 = up.clone().requires_grad_()
    v = torch.randn(phases.shape, generator=g, dtype=torch.float64)
    (first,) = torch.autograd.grad(max_over_phases(p), p, up2, create_graph=True)
    (ref_first,) = torch.autograd.grad(F.max_pool2d(yy, 2), yy, up2, create_graph=True)
    (second,) = torch.autograd.grad((first * v).sum(), up2)
    (ref_second,) = torch.autograd.grad((ref_first * _from_phases(v)).sum(), up2)
    torch.testing.assert_close(second, ref_second, rtol=1e-12, atol=1e-12)  # same up to rounding of v0 + (v1 - v0)


def test_lenet5_uses_phases_only_where_conv1_output_is_even():
    assert isinstance(LeNet5(3, (32, 32)).conv1, PhaseConv2d)
    assert type(LeNet5(3, (32, 32), phases=False).conv1) is nn.Conv2d
    odd = LeNet5(3, (33, 32))
    assert type(odd.conv1) is nn.Conv2d
    assert odd(torch.randn(2, 3, 33, 32)).shape == (2, 10)


def test_kfac_factors_of_a_phase_conv_equal_the_plain_conv():
    phase, plain = _pair(padding=1)
    x = torch.randn(6, 3, 12, 10, dtype=torch.float64)
    up = torch.randn(phase(x).shape, dtype=torch.float64)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        fp, fq = make_layer_factors("phase", phase), make_layer_factors("plain", plain)
        torch.testing.assert_close(fp.a_contribution(x), fq.a_contribution(x))
        grad = up.contiguous(memory_format=memory_format)
        torch.testing.assert_close(fp.g_contribution(grad), fq.g_contribution(_from_phases(grad)), rtol=1e-12, atol=1e-12)
