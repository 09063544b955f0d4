"""Model factory: one name per architecture, sized from the dataset."""

from __future__ import annotations

from torch import nn

from bigbatch.models.lenet5 import LeNet5
from bigbatch.models.resnet import CifarResNet


def build_model(
    name: str, in_channels: int, image_size: tuple[int, int], num_classes: int
) -> nn.Module:
    if name == "lenet5":
        return LeNet5(in_channels, image_size, num_classes)
    if name.startswith("resnet") and name[len("resnet") :].isdigit():
        return CifarResNet(int(name[len("resnet") :]), in_channels, num_classes)
    raise ValueError(f"unknown model '{name}'; choose lenet5 or resnet8/20/32/44/56")


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


__all__ = ["LeNet5", "CifarResNet", "build_model", "has_batchnorm"]
