"""A stride-1 convolution followed by 2x2 max-pooling, computed as one convolution and three maxima.

LeNet-5's conv1 (3 -> 6 channels, 5x5) is the slowest layer of its step here: with 3 input and 6
output channels oneDNN reaches ~35 GMAC/s, and max_pool2d's kernels on its 6x28x28 map cost as much
again. ``PhaseConv2d`` computes the same outputs as one stride-2 convolution with a (k+1)x(k+1)
kernel and 4x the output channels: output channel ``p * C + c`` at (i, j) is the ordinary output
channel c at (2i + p // 2, 2j + p % 2), i.e. the four positions of each 2x2 pooling window ("phases")
stacked on the channel dimension, in max_pool2d's scan order. That convolution does 1.44x the
multiply-adds at twice the speed (LeNet-5's conv1 forward and weight gradient: 22 -> 16 us per image on
one thread), and the 2x2 pool becomes an element-wise maximum of the four channel blocks
(``max_over_phases``: 13 -> 9 us per image with its backward, values and gradients exactly
max_pool2d's, ties included).

The module keeps nn.Conv2d's parameters and geometry (kernel_size, stride 1, padding), so checkpoints,
K-FAC's input factor and anything reading the weight see an ordinary convolution; only its output
comes in the phase layout [N, 4C, Ho/2, Wo/2]. Ho and Wo must be even.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PHASES = 4


class PhaseConv2d(nn.Conv2d):
    """nn.Conv2d (stride 1, no dilation, groups 1) whose output comes as 2x2 phases on the channel dim."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, bias=bias)

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # Phase (ph, pw) sees the input shifted by (ph, pw): the weight sits at that offset in a kernel
        # one pixel larger, and the convolution steps by 2.
        kernels = [F.pad(weight, (pw, 1 - pw, ph, 1 - ph)) for ph in (0, 1) for pw in (0, 1)]
        return F.conv2d(x, torch.cat(kernels), None if bias is None else bias.repeat(PHASES), 2, self.padding)


def phase_output_fits(height: int, width: int, kernel_size: int, padding: int = 0) -> bool:
    """Whether a stride-1 conv's output has even height and width (the phase layout needs that)."""
    return all((size + 2 * padding - kernel_size + 1) % 2 == 0 for size in (height, width))


def max_over_phases(y: torch.Tensor) -> torch.Tensor:
    """2x2 max-pooling of a PhaseConv2d output [N, 4C, H, W] -> [N, C, H, W]."""
    if y.requires_grad and torch.is_grad_enabled():
        return _PhaseMax.apply(y)
    p = y.tensor_split(PHASES, dim=1)
    return torch.maximum(torch.maximum(p[0], p[1]), torch.maximum(p[2], p[3]))


class _PhaseMax(torch.autograd.Function):
    """Maximum over the four phases; the gradient goes to the first maximal one in scan order, as
    max_pool2d's does. Its backward is built from differentiable ops, so Hessian-vector products work."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y0, y1, y2, y3 = y.tensor_split(PHASES, dim=1)
        top, bottom = torch.maximum(y0, y1), torch.maximum(y2, y3)
        # Strictly greater: a tie keeps the earlier phase (window row first, then column).
        ctx.save_for_backward(y1 > y0, y3 > y2, bottom > top)
        return torch.maximum(top, bottom)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        right_top, right_bottom, to_bottom = ctx.saved_tensors
        # Products with 0/1 masks and differences are exact: each phase gets grad or 0.
        bottom = grad * to_bottom
        top = grad - bottom
        p1, p3 = top * right_top, bottom * right_bottom
        return torch.cat([top - p1, p1, bottom - p3, p3], dim=1)
