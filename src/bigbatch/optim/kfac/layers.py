"""Per-layer K-FAC math: the two Kronecker factors of one Linear or Conv2d layer, and its gradient.

Scale convention (one place for it; tests check it against brute force):

    A = E_n[ mean_t  a_{n,t} a_{n,t}^T ]        a = layer input (im2col patch for conv), with a 1 appended
                                                when the layer has a bias (bias = homogeneous coordinate)
    G = E_n[ sum_t   g_{n,t} g_{n,t}^T ]        g = gradient of example n's OWN loss with respect to the
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

import torch
import torch.nn.functional as F
from torch import nn

from bigbatch import fastmm

# Examples per im2col chunk: keeps the patch matrix of a LeNet-size layer within a few MB of cache.
IM2COL_CHUNK = 32
# Inputs and output gradients are held until this many rows are pending, then reduced in one go: with
# statistics from a slice of each micro-batch (stats_fraction) the per-call costs of the factor
# products (LeNet-5's conv1: ~2 ms of small ops) otherwise repeat for every 64-row slice.
MIN_ROWS_PER_PRODUCT = 256
# From this many examples at once, conv row products run as oneDNN GEMMs over an examples-innermost
# copy of the input (see Conv2dFactors._row_pair_gram). LeNet-5 on 2 threads, current / examples-inner:
# conv1 0.91-0.96 at 768 rows, 0.98-1.04 at 1024, 1.05-1.18 at 1536, 1.33-1.40 at 2048; conv2 1.1-1.2
# at 768-1024, 1.6-1.7 at 2048.
EXAMPLES_INNER_MIN_ROWS = 1024
# Floats of row products held per kernel-row offset, at most (else im2col in chunks).
MAX_ROW_PRODUCTS = 4_000_000


class LayerFactors:
    """Accumulates raw factor sums of one layer between K-FAC steps and maps its gradient to a matrix."""

    def __init__(self, name: str, module: nn.Module):
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
        return self.module.weight.shape[0]

    def add_input(self, x: torch.Tensor) -> None:
        self.count += x.shape[0]
        self._hold("a", x.detach())

    def add_output_grad(self, grad_output: torch.Tensor) -> None:
        self._hold("g", grad_output.detach())

    def _hold(self, side: str, rows: torch.Tensor) -> None:
        pending = self._pending[side]
        pending.append(rows)
        if sum(t.shape[0] for t in pending) >= MIN_ROWS_PER_PRODUCT:
            self._reduce(side)

    def _reduce(self, side: str) -> None:
        pending = self._pending[side]
        if not pending:
            return
        rows = pending[0] if len(pending) == 1 else torch.cat(pending)
        pending.clear()
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
    def grad_matrix(self) -> torch.Tensor:
        w = self.module.weight.grad.reshape(self.g_dim, -1)
        if self.has_bias:
            w = torch.cat([w, self.module.bias.grad.reshape(-1, 1)], dim=1)
        return w

    def set_grad_matrix(self, m: torch.Tensor) -> None:
        weight = self.module.weight
        if self.has_bias:
            self.module.bias.grad.copy_(m[:, -1])
            m = m[:, :-1]
        weight.grad.copy_(m.reshape(weight.shape))

    def has_grad(self) -> bool:
        return self.module.weight.grad is not None and (not self.has_bias or self.module.bias.grad is not None)


def _homogeneous_outer(rows: torch.Tensor, with_ones: bool, transposed: bool = False) -> torch.Tensor:
    """sum_i [r_i; 1][r_i; 1]^T for the rows r_i of ``rows`` (its columns if ``transposed``),
    without materializing the ones column."""
    cols = rows if transposed else rows.t()
    top = fastmm.matmul(cols, cols.t())  # oneDNN for large ones: LeNet-5's fc1 at 128 rows 0.20 -> 0.13 ms
    return _with_ones(top, cols.sum(1), cols.shape[1]) if with_ones else top


def _with_ones(gram: torch.Tensor, sums: torch.Tensor, count: int) -> torch.Tensor:
    """[[sum a a^T, sum a], [sum a^T, count]]: a Gram matrix bordered by the ones coordinate."""
    d = gram.shape[0]
    out = gram.new_empty(d + 1, d + 1)
    out[:d, :d] = gram
    out[:d, d] = sums
    out[d, :d] = sums
    out[d, d] = count
    return out


class LinearFactors(LayerFactors):
    @property
    def a_dim(self) -> int:
        return self.module.in_features + int(self.has_bias)

    def a_contribution(self, x: torch.Tensor) -> torch.Tensor:
        return _homogeneous_outer(x.reshape(-1, x.shape[-1]), self.has_bias)

    def g_contribution(self, grad_output: torch.Tensor) -> torch.Tensor:
        g = grad_output.reshape(-1, grad_output.shape[-1])
        return g.t() @ g


class Conv2dFactors(LayerFactors):
    def __init__(self, name: str, module: nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"K-FAC supports Conv2d with groups=1 only; skip layer '{name}' with skip_layers")
        if module.padding_mode != "zeros" or module.padding == "same":
            # Reflect/circular padding and 'same' change the patches that unfold would see.
            raise ValueError(f"K-FAC needs numeric zero padding on Conv2d '{name}'; skip it with skip_layers")
        super().__init__(name, module)

    @property
    def a_dim(self) -> int:
        m = self.module
        return m.in_channels * m.kernel_size[0] * m.kernel_size[1] + int(self.has_bias)

    def a_contribution(self, x: torch.Tensor) -> torch.Tensor:
        x = self._padded(x)
        ho, wo = self._output_size(x)
        patch_cost = ho * wo * (self.a_dim - int(self.has_bias)) ** 2  # multiply-adds per example of im2col's Gram
        if self._prefers_examples_inner(x, patch_cost):
            out = self._row_pair_gram(x, ho, wo, examples_inner=True)
        elif self._row_pair_cost(x) < patch_cost:
            out = self._row_pair_gram(x, ho, wo)
        else:
            out = None
            for start in range(0, x.shape[0], IM2COL_CHUNK):
                part = _homogeneous_outer(self._patches(x[start : start + IM2COL_CHUNK]), self.has_bias, transposed=True)
                out = part if out is None else out.add_(part)
            assert out is not None
        return out.div_(ho * wo)  # mean over locations, sum over examples

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = (0, 0) if self.module.padding == "valid" else self.module.padding
        if not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous()  # NHWC stays NHWC (one copy less)
        return F.pad(x, (pw, pw, ph, ph)) if ph or pw else x

    def _output_size(self, x: torch.Tensor) -> tuple[int, int]:
        m = self.module
        (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
        return (x.shape[2] - dh * (kh - 1) - 1) // sh + 1, (x.shape[3] - dw * (kw - 1) - 1) // sw + 1

    def _row_pair_cost(self, x: torch.Tensor) -> float:
        """Multiply-adds per example of _row_pair_gram, or infinity when its row products would not fit."""
        _, c, h, w = x.shape
        row_products = h * c * c * self._column_pairs(w, self._column_block(w))
        if row_products > MAX_ROW_PRODUCTS:
            return float("inf")
        return self.module.kernel_size[0] * row_products

    def _band(self) -> int:
        """Input columns between two pixels of one receptive field, at most."""
        return (self.module.kernel_size[1] - 1) * self.module.dilation[1]

    def _column_block(self, w: int) -> int:
        """Columns per block of the banded row products (see _row_pair_gram), or 0 for whole rows.

        A block of b columns meets the b + 2 * band columns around it, so banding saves multiply-adds
        on wide rows only; under 8 columns the batched GEMMs get too small to run at full speed.
        """
        best, best_cost = 0, 0.75 * w * w  # must save a quarter: its GEMMs are smaller, more and strided
        block = 8
        while 2 * block <= w:
            cost = self._column_pairs(w, block)
            if cost < best_cost:
                best, best_cost = block, cost
            block *= 2
        return best

    def _column_pairs(self, w: int, block: int) -> int:
        """Column pairs one row product multiplies out: all of them, or each block's with its neighbourhood."""
        return w * w if not block else _ceil_div(w, block) * block * (block + 2 * self._band())

    def _row_pair_gram(self, x: torch.Tensor, ho: int, wo: int, block: int | None = None,
                       examples_inner: bool = False) -> torch.Tensor:
        """The patch Gram matrix sum_{n,t} a a^T (with the ones coordinate if biased), without im2col.

        Every entry pairs two input pixels that lie kernel-row offsets i, i' and column offsets j, j'
        apart inside one receptive field. Grouping by input rows: for each row offset r = i' - i, every
        input row (all columns and channels, summed over examples) is multiplied with the row r below
        it; the entries for (i, i') are then sums of those row products over the output rows, and those
        for (j, j') sums along diagonals of the column pairs. For 5x5 kernels on small images this is
        3-5x fewer multiply-adds than the Gram of the patch matrix, and the patch matrix (kh*kw times
        the input) is never built.

        The row products are computed one of three ways:
        * ``examples_inner``: the input is transposed once so that examples are the innermost dim, and
          each row is multiplied with the kh rows from it downwards in one oneDNN GEMM (fastmm): whole
          rows, but at about twice MKL's speed on large batches;
        * otherwise batched MKL GEMMs per row offset, of whole rows or, on wide rows (``block`` > 0),
          of blocks of ``block`` columns with the band of columns on either side that can share a
          receptive field (LeNet-5's conv1 at 32 columns: half the multiply-adds of whole rows).
        """
        m = self.module
        (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
        n, c, h, w = x.shape
        block = 0 if examples_inner else self._column_block(w) if block is None else block  # 0: whole rows
        total = None  # the input summed over examples, for the bias coordinate
        if examples_inner:
            rows_t = self._examples_inner_rows(x)
            if self.has_bias:  # summed while the copy is in cache: x.sum(0) re-reads the input (2.6 ms at 2048)
                total = rows_t.sum(-1).view(h, w, c).permute(2, 0, 1)
            products = self._products_per_row(rows_t)  # [h, wc, span, wc]
        elif block:
            rows = self._padded_rows(x, block)
        else:
            # Row-major [row, example, (column, channel)], copied: the batched products run ~20% faster
            # on contiguous rows than on NHWC's strided view of them, copy included.
            rows = x.permute(2, 0, 3, 1).reshape(h, n, w * c).contiguous()
        block_out = x.new_empty(c, kh, kw, c, kh, kw)  # every entry is written below
        for r in range(kh):  # row offset between the two pixels, in kernel rows
            partners = kh - r  # kernel rows i that have a partner i + r
            if examples_inner:
                pairs = self._whole_row_pairs(products[:, :, r * dh], partners, ho, wo, c)
            elif block:
                upper, lower = rows[: h - r * dh], rows[r * dh :]
                pairs = self._banded_row_pairs(upper, lower, partners, ho, wo, c, block)
            else:
                upper, lower = rows[: h - r * dh], rows[r * dh :]
                pairs = self._whole_row_pairs(torch.bmm(upper.transpose(1, 2), lower), partners, ho, wo, c)
            # block[c, i, j, c', i + r, j'] and, mirrored, block[c', i + r, j', c, i, j].
            torch.diagonal(block_out, offset=r, dim1=1, dim2=4).copy_(pairs.permute(1, 3, 2, 4, 0))
            if r:
                torch.diagonal(block_out, offset=-r, dim1=1, dim2=4).copy_(pairs.permute(2, 4, 1, 3, 0))
        d = c * kh * kw
        gram = block_out.view(d, d)
        if not self.has_bias:
            return gram
        if total is None:  # [c, h, w]; summed in memory order (over NHWC's outer dim, x.sum(0) runs ~10x slower)
            total = x.permute(0, 2, 3, 1).sum(0).permute(2, 0, 1) if _is_nhwc(x) else x.sum(0)
        total = total.contiguous()
        # sums[c, i, j] = total summed over the receptive-field positions (i, j) takes at every output.
        sums = total.as_strided((c, kh, kw, ho, wo), (h * w, dh * w, dw, sh * w, sw)).sum((3, 4)).reshape(d)
        return _with_ones(gram, sums, n * ho * wo)

    def _prefers_examples_inner(self, x: torch.Tensor, patch_cost: float) -> bool:
        """Whether to take oneDNN's whole-row products (about twice MKL's GEMM speed, from a thousand
        examples at once): for float32 CPU input, where they fit and multiply at most twice what the
        cheaper of the other two ways does (LeNet-5's conv1: exactly twice its banded products)."""
        n, c, h, w = x.shape
        whole_rows = h * (w * c) ** 2
        return (
            n >= EXAMPLES_INNER_MIN_ROWS
            and whole_rows <= MAX_ROW_PRODUCTS
            and self._span() * whole_rows <= 2 * min(self._row_pair_cost(x), patch_cost)
            and fastmm.usable(x)
        )

    def _span(self) -> int:
        """Input rows one receptive field spans."""
        return (self.module.kernel_size[0] - 1) * self.module.dilation[0] + 1

    def _examples_inner_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The input as [h, (column, channel), n]: examples innermost, so that every run of rows is one
        dense matrix for the GEMM. From NHWC one 2-D transpose; from NCHW a 2-D transpose to
        [c, h, w, n] and a copy of whole example runs (a direct 4-D permute is ~3x slower)."""
        n, c, h, w = x.shape
        if _is_nhwc(x):
            return x.permute(0, 2, 3, 1).reshape(n, -1).t().contiguous().view(h, w * c, n)
        by_channel = x.contiguous().view(n, -1).t().contiguous().view(c, h, w, n)
        return by_channel.permute(1, 2, 0, 3).reshape(h, w * c, n)

    def _products_per_row(self, rows: torch.Tensor) -> torch.Tensor:
        """products[i, u, s, v] = sum_n rows[i, u, n] rows[i + s, v, n] for s < span (the rows a
        receptive field spans), from one GEMM per row; rows without a partner s are left unwritten."""
        span = self._span()
        h, wc, n = rows.shape
        products = rows.new_empty(h, wc, span, wc)
        for i in range(h):
            k = min(span, h - i)
            below = rows[i : i + k].view(k * wc, n)
            products[i, :, :k] = fastmm.matmul(rows[i], below.t()).view(wc, k, wc)
        return products

    def _whole_row_pairs(self, products: torch.Tensor, partners: int, ho: int, wo: int, c: int):
        """pairs[i, c, c', j, j'] = sum over output pixels of the products of (row i, column j, channel c)
        with (row i + r, column j', channel c') of their receptive field, from whole-row products
        ``products[row] = rows[row]^T rows[row + r]`` ([rows, wc, wc], any strides)."""
        (_, kw), (sh, sw), (dh, dw) = self.module.kernel_size, self.module.stride, self.module.dilation
        wc = products.shape[2]
        s_row, s_u, s_v = products.stride()
        # For each i, the sum over output rows p of the products of input rows i*dh + p*sh and the
        # row r below: one strided view of all (i, p) pairs, summed over p.
        row_sums = products.as_strided(
            (partners, ho, wc, wc), (dh * s_row, sh * s_row, s_u, s_v), products.storage_offset()
        ).sum(1)
        # Sum over output columns q of the column pairs (j*dw + q*sw, j'*dw + q*sw): their offsets
        # are linear in j, j' and q, so all pairs are one strided view too: [i, c, c', j, j'].
        col, col2 = c * wc, c  # strides of a column step in row_sums' [i, (col, c), (col', c')]
        return row_sums.as_strided(
            (partners, c, c, kw, kw, wo), (wc * wc, wc, 1, dw * col, dw * col2, sw * (col + col2))
        ).sum(5)

    def _padded_rows(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """The input as rows [h, n, columns * c], with band zero columns before and after them and up to
        whole blocks: every block's neighbourhood is then one slice of its row."""
        n, c, h, w = x.shape
        band, blocks = self._band(), _ceil_div(w, block)
        # NHWC rows are contiguous runs to copy from; NCHW is converted first (torch's NHWC conversion
        # beats a direct permuting copy 1.3-1.6x).
        rows = x.contiguous(memory_format=torch.channels_last).permute(2, 0, 3, 1)  # [h, n, column, c]
        return F.pad(rows, (0, 0, band, blocks * block + band - w)).reshape(h, n, -1)

    def _banded_row_pairs(self, upper: torch.Tensor, lower: torch.Tensor, partners: int, ho: int, wo: int, c: int,
                          block: int):
        """As _whole_row_pairs, from the products of each column block with its neighbourhood."""
        (_, kw), (sh, sw), (dh, dw) = self.module.kernel_size, self.module.stride, self.module.dilation
        band = self._band()
        rows, blocks = upper.shape[0], (upper.shape[2] // c - 2 * band) // block
        bc, rc = block * c, (block + 2 * band) * c
        # Per block, strided slices of the rows straight into a batched GEMM (no copies of the operands:
        # at 2048 examples those cost more than the GEMM's slower strided reads).
        products = upper.new_empty(blocks, rows, bc, rc)
        for b in range(blocks):
            left = upper[:, :, (band + b * block) * c : (band + b * block) * c + bc]
            torch.bmm(left.transpose(1, 2), lower[:, :, b * bc : b * bc + rc], out=products[b])
        # products[b, row, u, c, u + s, c'] pairs column b*block + u with the column s - band away.
        # Summed over output rows, as whole-row products are, into [i, column, c, s, c']:
        mat, diagonals = bc * rc, 2 * band + 1
        row_sums = products.as_strided(
            (partners, ho, blocks, block, c, diagonals, c),
            (dh * mat, sh * mat, rows * mat, c * rc + c, rc, c, 1),
        ).sum(1)
        step = diagonals * c * c  # one column in row_sums
        return row_sums.as_strided(
            (partners, c, c, kw, kw, wo),
            (blocks * block * step, diagonals * c, 1, dw * (step - c), dw * c, sw * step),
            band * c,
        ).sum(5)

    def patch_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """im2col as [C*kh*kw, n*Ho*Wo], rows in the weight's (c, i, j) order.

        Built by stacking one strided view of the padded input per (c, i, j): a single copy straight
        into the layout the Gram matrix wants, about twice as fast as F.unfold plus a transpose.
        """
        return self._patches(self._padded(x))

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
        ho, wo = self._output_size(x)
        views = [
            x[:, c, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
            for c in range(x.shape[1])
            for i in range(kh)
            for j in range(kw)
        ]
        return torch.stack(views).reshape(len(views), -1)

    def g_contribution(self, grad_output: torch.Tensor) -> torch.Tensor:
        # sum over examples n and locations t of g_{n,t} g_{n,t}^T, without copying the gradient. The
        # channel dim may hold several blocks of the layer's c channels, each for other locations
        # (PhaseConv2d's 2x2 phases): blocks count as locations.
        c = self.g_dim
        if grad_output.is_contiguous():  # NCHW: one [c, hw] matrix per example and block
            g = grad_output.reshape(-1, c, grad_output.shape[2] * grad_output.shape[3])
            return torch.bmm(g, g.transpose(1, 2)).sum(0)
        g = grad_output.permute(0, 2, 3, 1).reshape(-1, c)  # NHWC: free view as rows
        return g.t() @ g


def _is_nhwc(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def make_layer_factors(name: str, module: nn.Module) -> LayerFactors | None:
    if isinstance(module, nn.Linear):
        return LinearFactors(name, module)
    if isinstance(module, nn.Conv2d):
        return Conv2dFactors(name, module)
    return None
