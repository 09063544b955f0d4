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


def _input_layer(model: nn.Module, x: torch.Tensor) -> nn.Module | bool:
    """The first Conv2d/Linear if the model applies it to its input itself; otherwise False."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if first is None:
        return False
    probe = x[:1]
    seen: list[bool] = []
    handle = first.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0] is probe))
    try:
        model(probe)
    finally:
        handle.remove()
    return first if seen == [True] else False


def _layer_output(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight, bias)


@torch.inference_mode()
def evaluate_along(
    model: nn.Module,
    directions: Sequence[Sequence[torch.Tensor]],
    points: Sequence[Sequence[float]],
    datasets: dict[str, Batches],
    progress: Callable[[], None] = lambda: None,
) -> list[dict[str, float]]:
    """Loss and accuracy at theta* + sum_i c_i d_i for every coefficient tuple in ``points``.

    ``progress`` is called once per batch. Data is the outer loop and points the inner one, so each batch is prepared once; and the first
    layer, which is linear in the coefficients (layer(x; W + c D) = layer(x; W) + c layer(x; D)), is
    computed once per direction and batch instead of once per point. The model's parameters are
    restored afterwards, whatever happens.
    """
    model.eval()
    params = list(model.parameters())
    origin = [p.detach().clone() for p in params]
    sums = {name: [[0.0, 0, 0] for _ in points] for name in datasets}
    first: nn.Module | bool | None = None
    try:
        for name, batches in datasets.items():
            for x, y in batches():
                if first is None:
                    first = _input_layer(model, x)
                outputs = None
                if isinstance(first, nn.Module):
                    index = {id(p): i for i, p in enumerate(params)}
                    wi = index[id(first.weight)]
                    bi = index[id(first.bias)] if first.bias is not None else None
                    base = _layer_output(first, x, origin[wi], origin[bi] if bi is not None else None)
                    outputs = [
                        _layer_output(first, x, d[wi], d[bi] if bi is not None else None) for d in directions
                    ]
                for k, coeffs in enumerate(points):
                    for p, o, *ds in zip(params, origin, *directions):
                        p.copy_(o)
                        for c, d in zip(coeffs, ds):
                            p.add_(d, alpha=c)
                    if outputs is not None:
                        out = base.clone()
                        for c, o in zip(coeffs, outputs):
                            out.add_(o, alpha=c)
                        first.forward = lambda _x, out=out: out  # type: ignore[method-assign]
                    try:
                        logits = model(x)
                    finally:
                        if outputs is not None:
                            del first.forward
                    acc = sums[name][k]
                    acc[0] += float(F.cross_entropy(logits, y, reduction="sum"))
                    acc[1] += int((logits.argmax(1) == y).sum())
                    acc[2] += y.shape[0]
                progress()
    finally:
        for p, o in zip(params, origin):
            p.copy_(o)
    rows = []
    for k, coeffs in enumerate(points):
        row: dict[str, float] = {f"c{i}": float(c) for i, c in enumerate(coeffs)}
        for name in datasets:
            loss_sum, hits, total = sums[name][k]
            row[f"{name}_loss"], row[f"{name}_acc"] = loss_sum / total, hits / total
        rows.append(row)
    return rows


def linspace(start: float, stop: float, num: int) -> list[float]:
    return [float(v) for v in torch.linspace(start, stop, num, dtype=torch.float64)]
