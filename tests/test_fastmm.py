"""oneDNN products agree with torch's own (float32 rounding), and fall back where they do not apply."""

import pytest
import torch
import torch.nn.functional as F

from bigbatch import fastmm


@pytest.mark.parametrize("transpose_a, transpose_b", [(False, False), (True, False), (False, True)])
def test_matmul_equals_torch_for_large_products_and_transposed_views(transpose_a, transpose_b):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(401, 120, generator=g).t() if transpose_a else torch.randn(120, 401, generator=g)
    b = torch.randn(401, 401, generator=g)
    b = b.t() if transpose_b else b
    assert 120 * 401 * 401 >= fastmm.MIN_MULTIPLY_ADDS
    torch.testing.assert_close(fastmm.matmul(a, b), a @ b, rtol=1e-4, atol=1e-3)


def test_linear_equals_f_linear_with_and_without_bias():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(128, 400, generator=g), torch.randn(120, 400, generator=g), torch.randn(120, generator=g)
    torch.testing.assert_close(fastmm.linear(x, w, b), F.linear(x, w, b), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(fastmm.linear(x, w), F.linear(x, w), rtol=1e-4, atol=1e-3)


def test_float64_small_and_autograd_products_are_torch_exactly():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(200, 300, generator=g, dtype=torch.float64), torch.randn(300, 100, generator=g, dtype=torch.float64)
    assert torch.equal(fastmm.matmul(a, b), a @ b)
    small_a, small_b = torch.randn(6, 76, generator=g), torch.randn(76, 76, generator=g)
    assert torch.equal(fastmm.matmul(small_a, small_b), small_a @ small_b)
    w = torch.randn(120, 400, requires_grad=True)
    out = fastmm.linear(torch.randn(128, 400), w)
    out.sum().backward()  # F.linear path: gradients flow
    assert w.grad is not None


def test_parameters_take_the_onednn_path_only_when_autograd_is_not_recording(monkeypatch):
    if not fastmm._check_usable():
        pytest.skip("oneDNN's linear op is not usable in this torch build")
    calls = []
    real = fastmm._onednn
    monkeypatch.setattr(fastmm, "_onednn", lambda *args: calls.append(1) or real(*args))
    layer = torch.nn.Linear(400, 120)  # parameters require grad
    x = torch.randn(128, 400)
    with torch.no_grad():
        fast = fastmm.linear(x, layer.weight, layer.bias)
    assert calls == [1]
    recorded = fastmm.linear(x, layer.weight, layer.bias)
    assert calls == [1] and recorded.requires_grad  # F.linear, so gradients flow
    torch.testing.assert_close(fast, recorded.detach(), rtol=1e-4, atol=1e-3)


def test_strided_operands_stay_on_torch(monkeypatch):
    # Rows further apart than their length (column slices): oneDNN ran such a product ~2000x slower.
    calls = []
    real = fastmm._onednn
    monkeypatch.setattr(fastmm, "_onednn", lambda *args: calls.append(1) or real(*args))
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(2048, 1000, generator=g)
    a, b = wide[:, :96].t(), wide[:, 200:680]  # [96, 2048] and [2048, 480], neither dense
    dense_a, dense_b = a.contiguous(), b.contiguous()
    for left, right in ((a, dense_b), (dense_a, b)):  # either operand strided
        torch.testing.assert_close(fastmm.matmul(left, right), dense_a @ dense_b)
    assert calls == []
    if fastmm.usable(dense_a, dense_b):
        torch.testing.assert_close(fastmm.matmul(dense_a, dense_b), dense_a @ dense_b, rtol=1e-4, atol=1e-3)
        assert calls == [1]
