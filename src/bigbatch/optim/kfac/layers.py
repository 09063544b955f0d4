"""Per-layer K-FAC math: the two Kronecker factors of one Linear or Conv2d layer, and its gradient.

Scale convention (one place for it; tests check it against brute force):

    A = E_n[ mean_t  a_{n,t} a_{n,t}^T ]   a = layer input (im2col patch for conv), with a 1
                                           appended when the layer has a bias (the homogeneous
                                           coordinate)
    G = E_n[ sum_t   g_{n,t} g_{n,t}^T ]   g = gradient of example n's OWN loss with respect to the
                                           layer's pre-activation output at location t

E_n is the mean over the examples that contribute statistics; t runs over the spatial locations of a
conv layer's output (one location for Linear). The Fisher block of the layer's flattened
[weight | bias] gradient (row-major: output unit major) is approximated by kron(G, A): exact for one
example at one location, and for conv layers it is the KFC approximation of Grosse & Martens (2016),
F ~ |T| * Omega (x) Gamma, with A = Omega and G = |T| * Gamma. Both factors are means over examples,
so they do not depend on the batch size, and the same damping means the same thing at batch 128 and
at batch 2048.

The backpropagated loss is the MEAN over the N examples that passed through the model since the last
K-FAC step (the trainer weights each micro-batch's mean loss by n_mb / N), so the output gradient
seen by a hook is g / N: the hooks accumulate raw sums and the preconditioner multiplies G by N^2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Sampled slices of micro-batches (stats_fraction < 1) are held until this many rows are pending,
# then reduced in one product: the fixed cost of each product would otherwise repeat for every small
# slice. Whole micro-batches are reduced at once, so a sum over micro-batches adds the same terms
# in the same way as the sum over data-parallel ranks.
MIN_ROWS_PER_PRODUCT = 256
# Rows per block of a Gram matrix's sum (see gram()).
GRAM_BLOCK_ROWS = 1024


def autocast_off(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """A region where autocast is off; no context at all where it was not on (the common case)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """K-FAC's own arithmetic: autocast off and float32 products in full precision (no TF32,
    which keeps 10 mantissa bits: too few for factors and their solves), the user's matmul
    precision restored after."""
    previous = torch.get_float32_matmul_precision()
    if previous != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        with autocast_off(device_type):
            yield
    finally:
        if previous != "highest":
            torch.set_float32_matmul_precision(previous)


class LayerFactors:
    """Accumulates raw factor sums of one layer between K-FAC steps and maps its gradient to a
    matrix."""

    module: nn.Linear | nn.Conv2d

    def __init__(self, name: str, module: nn.Linear | nn.Conv2d):
        self.name = name
        self.module = module
        self.has_bias = module.bias is not None
        self.a_sum: torch.Tensor | None = None
        self.g_sum: torch.Tensor | None = None
        self.count = 0  # examples that contributed statistics since the last step
        self._pending: dict[str, list[torch.Tensor]] = {"a": [], "g": []}

    # -- statistics (subclasses) -----------------------------------------------------------------
    def a_contribution(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def g_contribution(self, grad_output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def a_dim(self) -> int:
        raise NotImplementedError

    @property
    def g_dim(self) -> int:
        return int(self.module.weight.shape[0])

    def add_input(self, x: torch.Tensor, rows: int) -> None:
        """Statistics of the first ``rows`` examples of a micro-batch's inputs (fewer than all:
        a sampled slice, held for later)."""
        self.count += rows
        self._hold("a", x.detach()[:rows], rows < x.shape[0])

    def add_output_grad(self, grad_output: torch.Tensor, rows: int) -> None:
        self._hold("g", grad_output.detach()[:rows], rows < grad_output.shape[0])

    def _hold(self, side: str, rows: torch.Tensor, sampled: bool) -> None:
        pending = self._pending[side]
        pending.append(rows)
        if not sampled or sum(t.shape[0] for t in pending) >= MIN_ROWS_PER_PRODUCT:
            self._reduce(side)

    def _reduce(self, side: str) -> None:
        pending = self._pending[side]
        if not pending:
            return
        rows = pending[0] if len(pending) == 1 else torch.cat(pending)
        pending.clear()
        # Under mixed precision the rows are bf16/fp16: the statistics are summed in float32 at
        # least (an fp16 Gram overflows), with autocast off so the products stay in that dtype.
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
        with full_precision(rows.device.type):
            self._add(side, rows)

    def _add(self, side: str, rows: torch.Tensor) -> None:
        if side == "a":
            a = self.a_contribution(rows)
            self.a_sum = a if self.a_sum is None else self.a_sum.add_(a)
        else:
            g = self.g_contribution(rows)
            self.g_sum = g if self.g_sum is None else self.g_sum.add_(g)

    def finish(self) -> None:
        """Reduce whatever rows are still held; call before reading ``a_sum`` and ``g_sum``."""
        self._reduce("a")
        self._reduce("g")

    def reset(self) -> None:
        self.a_sum, self.g_sum, self.count = None, None, 0
        self._pending = {"a": [], "g": []}

    # -- gradient as a matrix [g_dim, a_dim] -----------------------------------------------------
    def _grads(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = self.module.weight, self.module.bias
        assert weight.grad is not None, "call only where has_grad() holds"
        return weight.grad, None if bias is None else bias.grad

    def grad_matrix(self) -> torch.Tensor:
        weight_grad, bias_grad = self._grads()
        w = weight_grad.reshape(self.g_dim, -1)
        if bias_grad is not None:
            w = torch.cat([w, bias_grad.reshape(-1, 1)], dim=1)
        return w

    def grad_parts(self, m: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(gradient tensor, the view of m that goes into it) for each of the layer's parameters;
        the views copy nothing, so one foreach copy can write every layer's gradients."""
        weight_grad, bias_grad = self._grads()
        parts = []
        if bias_grad is not None:
            parts.append((bias_grad, m[:, -1]))
            m = m[:, :-1]
        return [(weight_grad, m.reshape(weight_grad.shape)), *parts]

    def has_grad(self) -> bool:
        bias = self.module.bias
        return self.module.weight.grad is not None and (bias is None or bias.grad is not None)


def gram(rows: torch.Tensor) -> torch.Tensor:
    """sum_i r_i r_i^T, summed in blocks of rows (one batched product, then a pairwise sum): a
    single GEMM over N*H*W rows accumulates float32 rounding along the whole length."""
    n, d = rows.shape
    block = max(GRAM_BLOCK_ROWS, d)  # the blocks' products take no more memory than the rows
    m = n // block
    if m < 2:
        return rows.t() @ rows
    head = rows[: m * block].reshape(m, block, d)
    out = torch.bmm(head.transpose(1, 2), head).sum(0)
    tail = rows[m * block :]
    return out.addmm_(tail.t(), tail) if tail.shape[0] else out


def _homogeneous_outer(rows: torch.Tensor, with_ones: bool) -> torch.Tensor:
    """sum_i [r_i; 1][r_i; 1]^T over the rows r_i of ``rows``, without materializing the ones
    column."""
    gram_matrix = gram(rows)
    return _with_ones(gram_matrix, rows.sum(0), rows.shape[0]) if with_ones else gram_matrix


def _with_ones(products: torch.Tensor, sums: torch.Tensor, count: int) -> torch.Tensor:
    """[[sum a a^T, sum a], [sum a^T, count]]: a Gram matrix bordered by the ones coordinate."""
    d = products.shape[0]
    out = products.new_empty(d + 1, d + 1)
    out[:d, :d] = products
    out[:d, d] = sums
    out[d, :d] = sums
    out[d, d] = count
    return out


class LinearFactors(LayerFactors):
    module: nn.Linear

    @property
    def a_dim(self) -> int:
        return self.module.in_features + int(self.has_bias)

    def a_contribution(self, x: torch.Tensor) -> torch.Tensor:
        return _homogeneous_outer(x.reshape(-1, x.shape[-1]), self.has_bias)

    def g_contribution(self, grad_output: torch.Tensor) -> torch.Tensor:
        return gram(grad_output.reshape(-1, grad_output.shape[-1]))


class Conv2dFactors(LayerFactors):
    module: nn.Conv2d

    def __init__(self, name: str, module: nn.Conv2d):
        if module.groups != 1:
            raise ValueError(
                f"K-FAC supports Conv2d with groups=1 only; skip layer '{name}' with skip_layers"
            )
        if module.padding_mode != "zeros" or module.padding == "same":
            # Reflect/circular padding and 'same' change the patches that unfold would see.
            raise ValueError(
                f"K-FAC needs numeric zero padding on Conv2d '{name}'; skip it with skip_layers"
            )
        super().__init__(name, module)

    @property
    def a_dim(self) -> int:
        m = self.module
        return m.in_channels * m.kernel_size[0] * m.kernel_size[1] + int(self.has_bias)

    def a_contribution(self, x: torch.Tensor) -> torch.Tensor:
        x = self._padded(x)
        ho, wo = self._output_size(x)
        if self.uses_row_products(x):
            a = self.row_product_gram(x)
        else:
            a = _homogeneous_outer(self.patch_rows(x), self.has_bias)
        return a.div_(ho * wo)  # mean over locations, sum over examples

    def uses_row_products(self, x: torch.Tensor) -> bool:
        """The rule between A's two exact computations, for a padded input: on the CPU, whole-row
        products wherever they need fewer multiply-adds than the Gram of the im2col patches; on
        every other device, and otherwise, im2col and one GEMM."""
        m = self.module
        _, c, h, w = x.shape
        ho, wo = self._output_size(x)
        patch_gram = ho * wo * (c * m.kernel_size[0] * m.kernel_size[1]) ** 2
        row_products = m.kernel_size[0] * h * (w * c) ** 2
        return x.device.type == "cpu" and row_products < patch_gram

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        # "same" is refused in __init__, so a string here is "valid".
        ph, pw = (0, 0) if isinstance(self.module.padding, str) else self.module.padding
        return F.pad(x, (pw, pw, ph, ph)) if ph or pw else x

    def _output_size(self, x: torch.Tensor) -> tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw) = (
            self.module.kernel_size,
            self.module.stride,
            self.module.dilation,
        )
        return (x.shape[2] - dh * (kh - 1) - 1) // sh + 1, (
            x.shape[3] - dw * (kw - 1) - 1
        ) // sw + 1

    def patch_rows(self, x: torch.Tensor) -> torch.Tensor:
        """im2col of a padded input as rows [n * locations, c*kh*kw] in the weight's (c, i, j)
        order: F.unfold's matrix, read through a strided view and copied once (F.unfold's CPU
        kernel runs tens of times slower than that copy; BENCHMARKS.md)."""
        (kh, kw), (sh, sw), (dh, dw) = (
            self.module.kernel_size,
            self.module.stride,
            self.module.dilation,
        )
        # [n, c, ho, wo, span_h, span_w] windows, then every dilation-th pixel of each.
        windows = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
        windows = windows[..., ::dh, ::dw]
        return windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * kh * kw)

    def row_product_gram(self, x: torch.Tensor) -> torch.Tensor:
        """The patch Gram sum_{n,t} a a^T of a padded input (bordered by the ones coordinate if
        biased) from products of whole input rows, without im2col.

        An entry pairs pixels (c, i, j) and (c', i', j') of one receptive field. For each kernel-row
        offset r = i' - i, every input row [examples, (column, channel)] is multiplied with the row
        r * dilation below it (one batched GEMM over rows, summed over examples); the entries are
        then sums of those products over output rows (strided by the stride) and, for the columns,
        along diagonals of the column pairs: two strided views and two sums.
        """
        m = self.module
        (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
        n, c, h, w = x.shape
        ho, wo = self._output_size(x)
        wc = w * c
        rows = x.permute(2, 0, 3, 1).reshape(h, n, wc)  # [row, example, (column, channel)]
        gram = x.new_empty(c, kh, kw, c, kh, kw)  # every entry is written below
        for r in range(kh):
            # [row, wc, wc]: each row with the one r kernel rows below it, summed over examples.
            products = torch.bmm(rows[: h - r * dh].transpose(1, 2), rows[r * dh :])
            # Sum over output rows p of the products of input rows i*dh + p*sh and the row below.
            partners = kh - r  # kernel rows i that have a partner i + r
            by_row = products.as_strided(
                (partners, ho, wc, wc), (dh * wc * wc, sh * wc * wc, wc, 1)
            ).sum(1)
            # Sum over output columns q of columns (j*dw + q*sw, j'*dw + q*sw): [i, c, c', j, j'].
            column = (c * wc, c)  # a column step's strides in by_row's two (column, channel) axes
            pairs = by_row.as_strided(
                (partners, c, c, kw, kw, wo),
                (wc * wc, wc, 1, dw * column[0], dw * column[1], sw * (column[0] + column[1])),
            ).sum(5)
            # gram[c, i, j, c', i + r, j'] and, mirrored, gram[c', i + r, j', c, i, j].
            torch.diagonal(gram, offset=r, dim1=1, dim2=4).copy_(pairs.permute(1, 3, 2, 4, 0))
            if r:
                torch.diagonal(gram, offset=-r, dim1=1, dim2=4).copy_(pairs.permute(2, 4, 1, 3, 0))
        d = c * kh * kw
        square = gram.view(d, d)
        # A GEMM's R^T R is symmetric only up to rounding: make it exact, as the patch Gram is, so
        # that every rank's upper triangle (the all-reduce packs only that) means the same matrix.
        square = (square + square.t()).div_(2)
        if not self.has_bias:
            return square
        # Bias column: each patch entry summed over examples and the positions it takes.
        total = x.sum(0).contiguous()  # [c, h, w]
        sums = total.as_strided((c, kh, kw, ho, wo), (h * w, dh * w, dw, sh * w, sw)).sum((3, 4))
        return _with_ones(square, sums.reshape(d), n * ho * wo)

    def g_contribution(self, grad_output: torch.Tensor) -> torch.Tensor:
        # Sum over examples and locations: one row per (example, location).
        return gram(grad_output.movedim(1, -1).reshape(-1, self.g_dim))


def make_layer_factors(name: str, module: nn.Module) -> LayerFactors | None:
    """Kronecker factors for a Linear or Conv2d layer; None for any other module."""
    if isinstance(module, nn.Linear):
        return LinearFactors(name, module)
    if isinstance(module, nn.Conv2d):
        return Conv2dFactors(name, module)
    return None
