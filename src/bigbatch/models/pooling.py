"""2x2 max-pooling (stride 2) whose inference pass is two element-wise maxima of strided views.

This torch build's max_pool2d kernel is slow on small feature maps: ~18 us (NCHW) or ~10 us (NHWC)
per LeNet-5 conv1 map of 6x28x28, more than conv2 itself, while two element-wise maxima (of row
pairs, then of column pairs) take ~1 us. Evaluation and loss landscapes are forward passes only, so they take the
maxima (same values: max is exact); when a gradient is needed, F.max_pool2d runs, because its fused
backward is faster than anything built from element-wise ops here, so training is bit-for-bit what
nn.MaxPool2d(2) gives. Odd heights and widths also go to F.max_pool2d.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4 or x.shape[-2] % 2 or x.shape[-1] % 2 or (x.requires_grad and torch.is_grad_enabled()):
        return F.max_pool2d(x, 2)
    n, c, h, w = x.shape
    ho, wo = h // 2, w // 2
    # Two maxima: of row pairs (contiguous runs of whole rows), then of column pairs.
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        rows = x.permute(0, 2, 3, 1).view(n, ho, 2, w * c)  # NHWC memory
        pairs = torch.maximum(rows[:, :, 0], rows[:, :, 1]).view(n, ho, wo, 2, c)
        return torch.maximum(pairs[:, :, :, 0], pairs[:, :, :, 1]).permute(0, 3, 1, 2)  # channels_last, as max_pool2d
    rows = x.contiguous().view(n, c, ho, 2, w)
    pairs = torch.maximum(rows[:, :, :, 0], rows[:, :, :, 1]).view(n, c, ho, wo, 2)
    return torch.maximum(pairs[..., 0], pairs[..., 1])


class MaxPool2x2(nn.Module):
    """Drop-in for nn.MaxPool2d(2) on [N, C, H, W] inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool_2x2(x)
