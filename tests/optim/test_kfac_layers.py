"""K-FAC factor statistics (optim/kfac/layers.py) against brute-force definitions, in float64."""

import pytest
import torch
import torch.nn.functional as F
from kfac_oracles import D, linear_model, make_kfac, per_example_grads, step_once
from torch import nn

from bigbatch.optim.kfac.layers import Conv2dFactors, make_layer_factors


# -- Linear ----------------------------------------------------------------------------------------
def test_linear_one_example_kron_equals_exact_fisher_block():
    model = linear_model()
    layer = model[0]
    x, y = torch.randn(1, 5, dtype=D), torch.tensor([2])
    flat, _ = per_example_grads(model, layer, x, y, lambda g: g)
    kfac = make_kfac(model)
    step_once(model, kfac, x, y)
    state = kfac.layers["0"]
    torch.testing.assert_close(
        torch.kron(state.G, state.A), torch.outer(flat[0], flat[0]), rtol=1e-10, atol=1e-14
    )


@pytest.mark.parametrize("micro", [None, 7])
def test_linear_factors_equal_brute_force(micro):
    model = linear_model()
    x, y = torch.randn(20, 5, dtype=D), torch.randint(0, 3, (20,))
    kfac = make_kfac(model)
    step_once(model, kfac, x, y, micro)
    for name, layer, inputs in (
        ("0", model[0], x),
        ("2", model[2], torch.tanh(model[0](x)).detach()),
    ):
        _, gs = per_example_grads(model, layer, x, y, lambda g: g)
        a_bar = torch.cat([inputs, torch.ones(20, 1, dtype=D)], 1)
        A = a_bar.t() @ a_bar / 20
        G = (
            sum(torch.outer(g[0] if g.dim() > 1 else g, g[0] if g.dim() > 1 else g) for g in gs)
            / 20
        )
        torch.testing.assert_close(kfac.layers[name].A, A, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(kfac.layers[name].G, G, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "n, micro",
    [
        (32, None),  # 8 sampled rows: held until the step
        (32, 8),  # slices of 2 from four micro-batches: all held until the step
        (2000, 400),  # slices of 100: reduced mid-batch once 256 are held, the rest at the step
    ],
)
def test_stats_fraction_factors_equal_brute_force_over_the_sampled_rows(n, micro):
    # Each micro-batch contributes its first quarter of rows.
    model = linear_model()
    x, y = torch.randn(n, 5, dtype=D), torch.randint(0, 3, (n,))
    kfac = make_kfac(model, stats_fraction=0.25)
    step_once(model, kfac, x, y, micro)
    size = micro or n
    rows = torch.cat([torch.arange(s, s + size // 4) for s in range(0, n, size)])
    _, gs = per_example_grads(model, model[0], x[rows], y[rows], lambda g: g)
    a_bar = torch.cat([x[rows], torch.ones(len(rows), 1, dtype=D)], 1)
    torch.testing.assert_close(
        kfac.layers["0"].A, a_bar.t() @ a_bar / len(rows), rtol=1e-10, atol=1e-14
    )
    torch.testing.assert_close(
        kfac.layers["0"].G, sum(torch.outer(g, g) for g in gs) / len(rows), rtol=1e-10, atol=1e-14
    )


# -- Conv2d ----------------------------------------------------------------------------------------
class ConvNet(nn.Module):
    def __init__(self, in_ch=2, out_ch=3, k=3, stride=2, padding=1, dilation=1, hw=6):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=padding, dilation=dilation)
        with torch.no_grad():
            h = self.conv(torch.zeros(1, in_ch, hw, hw)).shape
        self.fc = nn.Linear(h[1] * h[2] * h[3], 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _explicit_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """im2col by definition: [c*kh*kw, n*locations], each entry read pixel by pixel (zero
    outside)."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ph, pw = conv.padding
    n, c, h, w = x.shape
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = torch.zeros(c, kh, kw, n, ho, wo, dtype=x.dtype)
    for ci in range(c):
        for i in range(kh):
            for j in range(kw):
                for p in range(ho):
                    for q in range(wo):
                        r, s = p * sh + i * dh - ph, q * sw + j * dw - pw
                        if 0 <= r < h and 0 <= s < w:
                            out[ci, i, j, :, p, q] = x[:, ci, r, s]
    return out.reshape(c * kh * kw, -1)


def test_conv_one_example_one_location_kron_equals_exact_fisher_block():
    torch.manual_seed(1)
    # A 3x3 input and kernel: one output location.
    model = ConvNet(k=3, stride=1, padding=0, hw=3).to(D)
    x, y = torch.randn(1, 2, 3, 3, dtype=D), torch.tensor([1])
    flat, _ = per_example_grads(model, model.conv, x, y, lambda g: g)
    kfac = make_kfac(model)
    step_once(model, kfac, x, y)
    s = kfac.layers["conv"]
    torch.testing.assert_close(
        torch.kron(s.G, s.A), torch.outer(flat[0], flat[0]), rtol=1e-10, atol=1e-14
    )


@pytest.mark.parametrize("stride, padding, dilation", [(2, 1, 1), (1, 0, 2), (1, 2, 1)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_conv_factors_equal_brute_force_over_locations(stride, padding, dilation, memory_format):
    # Autograd hands the hooks NCHW or NHWC tensors: check both layouts against brute force.
    torch.manual_seed(2)
    model = ConvNet(stride=stride, padding=padding, dilation=dilation, hw=7).to(D)
    n = 6
    x, y = torch.randn(n, 2, 7, 7, dtype=D), torch.randint(0, 4, (n,))
    kfac = make_kfac(model)
    model.to(memory_format=memory_format)
    step_once(model, kfac, x.contiguous(memory_format=memory_format), y, micro=4)
    conv = model.conv
    A = torch.zeros(2 * 9 + 1, 2 * 9 + 1, dtype=D)
    for i in range(n):  # explicit loops over examples and locations
        patches = _explicit_patches(conv, x[i : i + 1])
        T = patches.shape[1]
        for t in range(T):
            a = torch.cat([patches[:, t], torch.ones(1, dtype=D)])
            A += torch.outer(a, a) / T / n
    _, gs = per_example_grads(model, conv, x, y, lambda g: g)
    G = torch.zeros(3, 3, dtype=D)
    for g in gs:  # g: [c_out, h, w]; sum over locations, mean over examples
        rows = g.flatten(1).t()
        G += rows.t() @ rows / n
    torch.testing.assert_close(kfac.layers["conv"].A, A, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(kfac.layers["conv"].G, G, rtol=1e-10, atol=1e-13)


GEOMETRIES = [  # in channels, kernel, stride, padding, dilation, bias, image size
    (3, 5, 1, 0, 1, True, (12, 12)),
    (2, (3, 2), 2, 1, 1, True, (9, 11)),
    (3, 3, 1, 2, 2, False, (10, 8)),
    (4, (2, 3), (2, 1), (1, 0), (1, 2), True, (7, 12)),
    (2, 3, (2, 1), 0, (3, 1), True, (11, 7)),
    (3, 1, 1, 0, 1, True, (5, 17)),
    (3, 5, 1, 0, 1, True, (9, 32)),
]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_conv_input_factor_is_the_patch_gram_for_uneven_kernels_strides_and_images(memory_format):
    torch.manual_seed(5)
    for cin, k, stride, pad, dil, bias, hw in GEOMETRIES:
        conv = nn.Conv2d(cin, 5, k, stride=stride, padding=pad, dilation=dil, bias=bias).to(D)
        factors = Conv2dFactors("c", conv)
        x = torch.randn(5, cin, *hw, dtype=D)
        patches = _explicit_patches(conv, x)
        locations = patches.shape[1] // x.shape[0]
        if bias:
            patches = torch.cat([patches, torch.ones(1, patches.shape[1], dtype=D)])
        expected = patches @ patches.t() / locations  # sum over examples, mean over locations
        got = factors.a_contribution(x.contiguous(memory_format=memory_format))
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_conv_patch_rows_are_f_unfold(memory_format):
    # torch's own im2col as a second oracle, for the uneven geometries above.
    torch.manual_seed(6)
    for cin, k, stride, pad, dil, hw in [
        (3, 5, 1, 0, 1, (12, 12)),
        (2, (3, 2), 2, 1, 1, (9, 11)),
        (4, (2, 3), (2, 1), (1, 0), (1, 2), (7, 12)),
        (2, 3, (2, 1), 0, (3, 1), (11, 7)),
    ]:
        conv = nn.Conv2d(cin, 5, k, stride=stride, padding=pad, dilation=dil).to(D)
        x = torch.randn(3, cin, *hw, dtype=D).contiguous(memory_format=memory_format)
        unfolded = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        expected = unfolded.transpose(1, 2).reshape(-1, unfolded.shape[1])
        (ph, pw) = conv.padding
        padded = F.pad(x, (pw, pw, ph, ph))  # patch_rows reads an input already padded
        assert torch.equal(Conv2dFactors("c", conv).patch_rows(padded), expected)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_both_computations_of_conv_a_are_the_patch_gram(memory_format):
    # Whole-row products and im2col + GEMM, each against the Gram of explicitly read patches.
    torch.manual_seed(7)
    for cin, k, stride, pad, dil, bias, hw in GEOMETRIES:
        conv = nn.Conv2d(cin, 5, k, stride=stride, padding=pad, dilation=dil, bias=bias).to(D)
        x = torch.randn(4, cin, *hw, dtype=D)
        patches = _explicit_patches(conv, x)
        if bias:
            patches = torch.cat([patches, torch.ones(1, patches.shape[1], dtype=D)])
        expected = patches @ patches.t()
        (ph, pw) = conv.padding
        padded = F.pad(x, (pw, pw, ph, ph)).contiguous(memory_format=memory_format)
        factors = Conv2dFactors("c", conv)
        rows = factors.patch_rows(padded)
        if bias:
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=D)], 1)
        torch.testing.assert_close(rows.t() @ rows, expected, rtol=1e-12, atol=1e-12)
        got = factors.row_product_gram(padded)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        assert torch.equal(got, got.t())  # exactly: ranks all-reduce only the upper triangle


def test_the_rule_between_the_two_computations():
    # On the CPU, whole rows where they take fewer multiply-adds (LeNet-5's 5x5 convolutions: 3-5x
    # fewer); not for 1x1 convolutions or ResNet's first layers; never off the CPU.
    conv1, conv2 = Conv2dFactors("c1", nn.Conv2d(3, 6, 5)), Conv2dFactors("c2", nn.Conv2d(6, 16, 5))
    assert conv1.uses_row_products(torch.empty(8, 3, 32, 32))
    assert conv2.uses_row_products(torch.empty(8, 6, 14, 14))
    assert not Conv2dFactors("p", nn.Conv2d(8, 8, 1)).uses_row_products(torch.empty(8, 8, 12, 12))
    resnet_first = Conv2dFactors("r", nn.Conv2d(16, 16, 3, padding=1))
    assert not resnet_first.uses_row_products(torch.empty(8, 16, 34, 34))
    assert not conv1.uses_row_products(torch.empty(8, 3, 32, 32, device="meta"))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_conv_g_over_millions_of_rows_keeps_float32_precision(memory_format):
    # 2048 examples x 28 x 28 locations = 1.6M rows in one batch: one float32 GEMM along them
    # was 4e-7 off here; summed in blocks it stays near float32's own resolution.
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 5)
    factors = make_layer_factors("c", conv)
    g64 = torch.randn(2048, 6, 28, 28, dtype=torch.float64) * 1e-3 + 1e-3
    rows = g64.movedim(1, -1).reshape(-1, 6)
    expected = rows.t() @ rows
    got = factors.g_contribution(g64.float().contiguous(memory_format=memory_format))
    assert float((got.double() - expected).norm() / expected.norm()) < 2e-7
