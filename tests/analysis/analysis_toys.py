"""A small conv net and two uneven batches, shared by the landscape and sharpness tests.

Imported by the tests in this folder as ``from analysis_toys import ...`` (pytest's prepend
import mode puts the folder on sys.path).
"""

import torch
from torch import nn


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )


def toy_data():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 2, 8, 8, generator=g), torch.randint(0, 3, (30,), generator=g)
    return lambda: [(x[:16], y[:16]), (x[16:], y[16:])], x, y
