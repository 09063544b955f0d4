"""CIFAR ResNets (He et al. 2016, section 4.2): 6n+2 layers, 16/32/64 channels, option-A
shortcuts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bigbatch.models.ghost_bn import GhostBatchNorm2d


def batch_norm(channels: int, ghost_batch_size: int = 0) -> nn.BatchNorm2d:
    """Plain BatchNorm, or ghost BatchNorm over slices of ``ghost_batch_size`` (0: off)."""
    if ghost_batch_size:
        return GhostBatchNorm2d(channels, ghost_batch_size)
    return nn.BatchNorm2d(channels)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, ghost_batch_size: int = 0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = batch_norm(planes, ghost_batch_size)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = batch_norm(planes, ghost_batch_size)
        self.stride = stride
        self.extra_channels = planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        # Option A: subsample and zero-pad channels, so the shortcut has no parameters.
        if self.stride == 1 and self.extra_channels == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        pad = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, pad, self.extra_channels - pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(
        self,
        depth: int = 20,
        in_channels: int = 3,
        num_classes: int = 10,
        ghost_batch_size: int = 0,
    ):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = batch_norm(16, ghost_batch_size)
        layers: list[nn.Module] = []
        in_planes = 16
        for stage, planes in enumerate((16, 32, 64)):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride, ghost_batch_size))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)
