"""LeNet-5 exactly as in the seed's Table 1, sized for any channel count and image size."""

from __future__ import annotations

import torch
from torch import nn

from bigbatch.models.phase_conv import PhaseConv2d, max_over_phases, phase_output_fits
from bigbatch.models.pooling import MaxPool2x2


def _after_conv_pool(size: int) -> int:
    # A 5x5 convolution without padding removes 4 pixels; a 2x2 max-pool halves (floor).
    return (size - 4) // 2


class LeNet5(nn.Module):
    """conv5x5-6, maxpool2, conv5x5-16, maxpool2, fc120, fc84, fc10 with ReLU activations."""

    # forward branches on shapes and module types only, never on tensor values: a trace for one input
    # shape is exact (the loss landscape runs it as TorchScript).
    trace_safe = True

    def __init__(
        self, in_channels: int = 3, image_size: tuple[int, int] = (32, 32), num_classes: int = 10, phases: bool = True
    ):
        super().__init__()
        h, w = image_size
        out_h, out_w = _after_conv_pool(_after_conv_pool(h)), _after_conv_pool(_after_conv_pool(w))
        if out_h < 1 or out_w < 1:
            raise ValueError(f"LeNet-5 needs images of at least 16x16 pixels, got {h}x{w}")
        # conv1 and the pool after it as one stride-2 convolution and three maxima (same values, faster);
        # the plain pair where conv1's output has an odd side, or with phases=False (for tools that
        # expect an ordinary conv output, e.g. other K-FAC libraries in benchmarks/).
        use_phases = phases and phase_output_fits(h, w, 5)
        self.conv1 = PhaseConv2d(in_channels, 6, 5) if use_phases else nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * out_h * out_w, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.pool = MaxPool2x2()  # nn.MaxPool2d(2), with a faster inference pass
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pool before ReLU: max and ReLU commute (same values and, ties included, the same gradient as
        # the seed's conv-ReLU-pool), and ReLU then touches a quarter of the activations.
        x = self.conv1(x)
        x = self.act(max_over_phases(x) if isinstance(self.conv1, PhaseConv2d) else self.pool(x))
        x = self.act(self.pool(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        return self.fc3(x)
