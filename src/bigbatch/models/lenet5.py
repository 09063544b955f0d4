"""LeNet-5 exactly as in the paper's Table 1, sized for any channel count and image size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _after_conv_pool(size: int) -> int:
    # A 5x5 convolution without padding removes 4 pixels; a 2x2 max-pool halves (floor).
    return (size - 4) // 2


class LeNet5(nn.Module):
    """conv5x5-6, maxpool2, conv5x5-16, maxpool2, fc120, fc84, fc10 with ReLU activations."""

    def __init__(
        self, in_channels: int = 3, image_size: tuple[int, int] = (32, 32), num_classes: int = 10
    ):
        super().__init__()
        h, w = image_size
        out_h, out_w = _after_conv_pool(_after_conv_pool(h)), _after_conv_pool(_after_conv_pool(w))
        if out_h < 1 or out_w < 1:
            raise ValueError(f"LeNet-5 needs images of at least 16x16 pixels, got {h}x{w}")
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * out_h * out_w, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pool before ReLU: max and ReLU commute, so this is the paper's conv-ReLU-pool (values and
        # gradients, ties included) with ReLU on a quarter of the activations.
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)
