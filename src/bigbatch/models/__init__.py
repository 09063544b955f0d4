"""Model factory: one name per architecture, sized from the dataset."""

from __future__ import annotations

from torch import nn

from bigbatch.models.ghost_bn import GhostBatchNorm2d
from bigbatch.models.lenet5 import LeNet5
from bigbatch.models.resnet import CifarResNet


def build_model(
    name: str,
    in_channels: int,
    image_size: tuple[int, int],
    num_classes: int,
    ghost_batch_size: int = 0,
) -> nn.Module:
    """``ghost_batch_size`` > 0: ghost BatchNorm (GhostBatchNorm2d) in the models that have BN."""
    if name == "lenet5":
        if ghost_batch_size:
            raise ValueError("lenet5 has no BatchNorm for a ghost_batch_size")
        return LeNet5(in_channels, image_size, num_classes)
    if name.startswith("resnet") and name[len("resnet") :].isdigit():
        return CifarResNet(int(name[len("resnet") :]), in_channels, num_classes, ghost_batch_size)
    raise ValueError(f"unknown model '{name}'; choose lenet5 or resnet8/20/32/44/56")


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def micro_batch_unit(model: nn.Module) -> int:
    """Micro-batches of a multiple of this size leave the model's maths unchanged: 1 without
    BatchNorm, the ghost batch size when every BatchNorm is ghost BatchNorm of one size, else 0
    (BatchNorm over the whole batch: no split keeps it)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 1
    sizes = {m.ghost_batch_size if isinstance(m, GhostBatchNorm2d) else 0 for m in norms}
    return sizes.pop() if len(sizes) == 1 else 0


__all__ = [
    "LeNet5",
    "CifarResNet",
    "GhostBatchNorm2d",
    "build_model",
    "has_batchnorm",
    "micro_batch_unit",
]
