"""Loss landscapes around a solution: f(a) = L(theta* + a delta) in 1-D, a 2-D grid over two
directions, and linear interpolation between two solutions.

Directions are seeded Gaussians shaped like the parameters. Normalization "none" is the paper's
plot; "filter" is Li et al. (2018): each filter of delta (one output unit: a row of a Linear
weight, one output channel of a Conv2d weight) is rescaled to the norm of the same filter of
theta*, and one-dimensional parameters (biases, BatchNorm weights and biases) get a zero
direction, as that paper does by default, so the plot shows the effect of the filters only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
NORMALIZATIONS = ("none", "filter")


def random_direction(
    model: nn.Module, seed: int, normalization: str = "none"
) -> list[torch.Tensor]:
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"unknown direction normalization '{normalization}'; choose one of {NORMALIZATIONS}"
        )
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
    """delta = theta_end - theta_start: the line between two solutions (a=0 start, a=1 end)."""
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


def _input_layer(model: nn.Module, x: torch.Tensor) -> nn.Conv2d | nn.Linear | None:
    """The model's first Conv2d or Linear if its forward applies it once, to the input itself."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    # Exactly these types, as a subclass may compute something else from its weight.
    if first is None or type(first) not in (nn.Conv2d, nn.Linear):
        return None
    if isinstance(first, nn.Conv2d) and first.padding_mode != "zeros":  # F.conv2d pads with zeros
        return None
    probe = x[:1]
    seen: list[bool] = []
    handle = first.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0] is probe))
    try:
        model(probe)
    finally:
        handle.remove()
    return first if seen == [True] else None


def _layer_output(
    layer: nn.Conv2d | nn.Linear, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight, bias)


def _views(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``flat`` cut into views shaped like the tensors in ``like``."""
    parts = torch.split(flat, [t.numel() for t in like])
    return [part.view(t.shape) for part, t in zip(parts, like)]


def _flatten_parameters(model: nn.Module) -> torch.Tensor:
    """Make the parameters views of one flat buffer, returned: a point is one add per direction."""
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    for p, view in zip(params, _views(flat, params)):
        p.data = view
    return flat


def _combine(
    out: torch.Tensor, base: torch.Tensor, terms: Sequence[torch.Tensor], coeffs: Sequence[float]
) -> None:
    """out = base + sum_i coeffs[i] * terms[i]."""
    torch.add(base, terms[0], alpha=coeffs[0], out=out)
    for c, term in zip(coeffs[1:], terms[1:]):
        out.add_(term, alpha=c)


class _Replica:
    """A copy of the model that evaluates one batch at every point."""

    def __init__(
        self,
        model: nn.Module,
        directions: Sequence[Sequence[torch.Tensor]],
        points: Sequence[Sequence[float]],
    ):
        self.model = copy.deepcopy(model)
        self.params = list(self.model.parameters())
        self.flat = _flatten_parameters(self.model)
        self.origin = self.flat.clone()
        self.steps = [torch.cat([t.detach().reshape(-1) for t in d]) for d in directions]
        self.points = points
        self.first: nn.Conv2d | nn.Linear | None = None
        self.probed = False

    def _skip_first_layer(
        self, first: nn.Conv2d | nn.Linear, x: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The first layer's outputs on ``x`` at the origin and with each direction's weight and
        bias; and a buffer, for its output at a point, that its forward now returns instead."""
        index = {id(p): k for k, p in enumerate(self.params)}
        outputs = []
        for flat in [self.origin, *self.steps]:
            tensors = _views(flat, self.params)
            bias = None if first.bias is None else tensors[index[id(first.bias)]]
            outputs.append(_layer_output(first, x, tensors[index[id(first.weight)]], bias))
        given = torch.empty_like(outputs[0])
        first.forward = lambda input: given  # type: ignore[method-assign]
        return given, outputs

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> list[tuple[float, int]]:
        """(loss sum, correct predictions) of the batch at each point."""
        if not self.probed:
            self.first, self.probed = _input_layer(self.model, x), True
        first = self.first
        given, outputs = (None, []) if first is None else self._skip_first_layer(first, x)
        losses, hits = [], []
        for coeffs in self.points:
            _combine(self.flat, self.origin, self.steps, coeffs)
            if given is not None:
                _combine(given, outputs[0], outputs[1:], coeffs)
            logits = self.model(x)
            losses.append(F.cross_entropy(logits, y, reduction="sum"))
            hits.append((logits.argmax(1) == y).sum())
        if not losses:
            return []
        # One copy to the host per batch rather than one per point.
        return list(zip(torch.stack(losses).tolist(), torch.stack(hits).tolist()))


@torch.inference_mode()
def evaluate_along(
    model: nn.Module,
    directions: Sequence[Sequence[torch.Tensor]],
    points: Sequence[Sequence[float]],
    datasets: dict[str, Batches],
    progress: Callable[[], None] = lambda: None,
) -> list[dict[str, float]]:
    """Loss and accuracy at theta* + sum_i c_i d_i for every coefficient tuple in ``points``.

    Data is the outer loop and points the inner one, so each batch is prepared once. If the model
    applies a Conv2d or Linear to its input, that layer is linear in the coefficients
    (layer(x; W + c D) = layer(x; W) + c layer(x; D)): it runs once per batch and direction, and
    each point adds up those outputs instead. ``model`` is not modified; ``progress`` is called
    once per batch.
    """
    model.eval()
    replica = _Replica(model, directions, points)
    sums = {name: [[0.0, 0, 0] for _ in points] for name in datasets}
    for name, batches in datasets.items():
        for x, y in batches():
            for acc, (loss, hit) in zip(sums[name], replica(x, y)):
                acc[0] += loss
                acc[1] += hit
                acc[2] += y.shape[0]
            progress()
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


def mean_rise(rows: Sequence[dict[str, float]], distance: float, key: str = "train_loss") -> float:
    """(f(-d) + f(d)) / 2 - f(0) of a 1-D curve (rows with ``c0`` and ``key``, as evaluate_along
    returns them): how far ``key`` rises at distance ``d`` on both sides of the solution."""
    at = {row["c0"]: row[key] for row in rows}
    missing = [a for a in (-distance, 0.0, distance) if a not in at]
    if missing:
        raise ValueError(f"the curve has no point at a = {missing}; evaluate it at -d, 0 and d")
    return (at[-distance] + at[distance]) / 2 - at[0.0]
