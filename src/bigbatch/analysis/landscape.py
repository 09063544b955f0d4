"""Loss landscapes around a solution: f(a) = L(theta* + a delta) in 1-D, a 2-D grid over two
directions, and linear interpolation between two solutions.

Directions are seeded Gaussians shaped like the parameters. Normalization "none" is the seed's plot;
"filter" is Li et al. (2018): each filter of delta (one output unit: a row of a Linear weight, one
output channel of a Conv2d weight) is rescaled to the norm of the same filter of theta*, and
one-dimensional parameters (biases, BatchNorm weights and biases) get a zero direction, as that
paper does by default, so the plot shows the effect of the filters only.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
NORMALIZATIONS = ("none", "filter")


def random_direction(model: nn.Module, seed: int, normalization: str = "none") -> list[torch.Tensor]:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown direction normalization '{normalization}'; choose one of {NORMALIZATIONS}")
    g = torch.Generator().manual_seed(seed)
    direction = []
    for p in model.parameters():
        d = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
        if normalization == "filter":
            if p.dim() <= 1:
                d.zero_()
            else:
                theta = p.detach().flatten(1).norm(dim=1)
                scale = theta / d.flatten(1).norm(dim=1).clamp_min(1e-12)
                d.mul_(scale.view(-1, *([1] * (p.dim() - 1))))
        direction.append(d.to(p.device))
    return direction


def difference_direction(start: nn.Module, end: nn.Module) -> list[torch.Tensor]:
    """delta = theta_end - theta_start: the straight line between two solutions (a=0 start, a=1 end)."""
    return [(b.detach() - a.detach()) for a, b in zip(start.parameters(), end.parameters())]


@torch.inference_mode()
def evaluate_loss(model: nn.Module, batches: Batches) -> tuple[float, float]:
    loss_sum, hits, total = 0.0, 0, 0
    for x, y in batches():
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        hits += int((logits.argmax(1) == y).sum())
        total += y.shape[0]
    return loss_sum / total, hits / total


@torch.inference_mode()
def evaluate_along(
    model: nn.Module,
    directions: Sequence[Sequence[torch.Tensor]],
    points: Sequence[Sequence[float]],
    datasets: dict[str, Batches],
    progress: Callable[[], None] = lambda: None,
) -> list[dict[str, float]]:
    """Loss and accuracy at theta* + sum_i c_i d_i for every coefficient tuple in ``points``.

    The model's parameters are restored afterwards, whatever happens.
    """
    model.eval()
    params = list(model.parameters())
    origin = [p.detach().clone() for p in params]
    rows = []
    try:
        for coeffs in points:
            for p, o, *ds in zip(params, origin, *directions):
                p.copy_(o)
                for c, d in zip(coeffs, ds):
                    p.add_(d, alpha=c)
            row: dict[str, float] = {f"c{i}": float(c) for i, c in enumerate(coeffs)}
            for name, batches in datasets.items():
                row[f"{name}_loss"], row[f"{name}_acc"] = evaluate_loss(model, batches)
            rows.append(row)
            progress()
    finally:
        for p, o in zip(params, origin):
            p.copy_(o)
    return rows


def linspace(start: float, stop: float, num: int) -> list[float]:
    return [float(v) for v in torch.linspace(start, stop, num, dtype=torch.float64)]
