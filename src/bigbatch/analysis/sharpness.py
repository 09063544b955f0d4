"""Keskar et al. (2017) epsilon-sharpness: the largest relative loss increase inside a box around
theta*.

    sharpness = 100 * (max_{y in C} L(theta* + y) - L(theta*)) / (1 + L(theta*)),
    C = { y : |y_i| <= eps (|theta*_i| + 1) }   (the full-space box, A = I in the paper's notation)

The inner maximization is solved approximately, as in the paper, by a few ascent steps; here
projected sign-gradient ascent (the steepest ascent direction for a box), started at the centre.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bigbatch.analysis.hessian import Batches, loss_and_gradient
from bigbatch.analysis.landscape import evaluate_loss


def epsilon_sharpness(
    model: nn.Module,
    batches: Batches,
    epsilon: float = 1e-3,
    steps: int = 10,
    progress: Callable[[int], None] = lambda _: None,
) -> dict[str, float]:
    if epsilon <= 0 or steps < 1:
        raise ValueError("epsilon must be > 0 and steps >= 1")
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    origin = [p.detach().clone() for p in params]
    bounds = [epsilon * (o.abs() + 1) for o in origin]
    base_loss, _ = evaluate_loss(model, batches)
    best = base_loss
    step_size = 2.0 / steps  # in units of the box half-width: reaches any corner in `steps` steps
    try:
        for i in range(steps):
            _, grad = loss_and_gradient(model, batches)
            with torch.no_grad():
                for p, o, b, g in zip(params, origin, bounds, grad):
                    p.add_(step_size * b * g.sign())
                    p.copy_(torch.maximum(torch.minimum(p, o + b), o - b))
            best = max(best, evaluate_loss(model, batches)[0])
            progress(i + 1)
    finally:
        with torch.no_grad():
            for p, o in zip(params, origin):
                p.copy_(o)
    return {
        "epsilon_sharpness": 100.0 * (best - base_loss) / (1.0 + base_loss),
        "base_loss": base_loss,
        "max_loss": best,
    }
