"""Curvature of the training loss at a solution: Hessian-vector products, top eigenvalues (Lanczos),
trace (Hutchinson), all matrix-free.

The loss is the mean cross-entropy over a fixed set of examples, with the model in eval mode so
that BatchNorm uses its running statistics and the loss is a deterministic function of the weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
Vector = list[torch.Tensor]


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _dot(a: Vector, b: Vector) -> torch.Tensor:
    return torch.stack([(x * y).sum() for x, y in zip(a, b)]).sum()


def _axpy(alpha: float | torch.Tensor, x: Vector, y: Vector) -> Vector:
    return [yi + alpha * xi for xi, yi in zip(x, y)]


def _scale(alpha: float | torch.Tensor, x: Vector) -> Vector:
    return [alpha * xi for xi in x]


def _norm(x: Vector) -> torch.Tensor:
    return torch.sqrt(_dot(x, x))


def hessian_vector_product(model: nn.Module, batches: Batches, vector: Vector) -> Vector:
    """H v for H the Hessian of the mean loss over all examples in ``batches`` (Pearlmutter's
    trick)."""
    params = _params(model)
    out = [torch.zeros_like(p) for p in params]
    total = 0
    for x, y in batches():
        loss = F.cross_entropy(model(x), y, reduction="sum")
        grads = torch.autograd.grad(loss, params, create_graph=True)
        hv = torch.autograd.grad(_dot(list(grads), vector), params)
        out = [o + h for o, h in zip(out, hv)]
        total += y.shape[0]
    return [o / total for o in out]


def loss_and_gradient(model: nn.Module, batches: Batches) -> tuple[float, Vector]:
    params = _params(model)
    grad = [torch.zeros_like(p) for p in params]
    loss_sum, total = 0.0, 0
    for x, y in batches():
        loss = F.cross_entropy(model(x), y, reduction="sum")
        grad = [g + d for g, d in zip(grad, torch.autograd.grad(loss, params))]
        loss_sum += float(loss.detach())
        total += y.shape[0]
    return loss_sum / total, [g / total for g in grad]


# Probes are drawn from a CPU generator and moved to the parameters' device: a seed gives the same
# probes, and so the same estimates, on every device; one copy per probe is small beside an HVP.
def _draw_gaussian(p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device)


def _draw_rademacher(p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, p.shape, generator=g).to(p.dtype) * 2 - 1).to(p.device)


def lanczos_top_eigenvalues(
    model: nn.Module,
    batches: Batches,
    k: int = 1,
    steps: int = 20,
    seed: int = 0,
    progress: Callable[[int], None] = lambda _: None,
) -> list[float]:
    """The k largest Hessian eigenvalues from ``steps`` Lanczos iterations with full
    reorthogonalization.

    Lanczos converges to the extreme eigenvalues first; ``steps`` Hessian-vector products give the
    top few to high accuracy for the sizes used here (tests compare with a dense Hessian).
    """
    params = _params(model)
    g = torch.Generator().manual_seed(seed)
    v = [_draw_gaussian(p, g) for p in params]
    v = _scale(1.0 / _norm(v), v)
    basis: list[Vector] = []
    alphas: list[float] = []
    betas: list[float] = []
    beta = 0.0
    v_prev: Vector | None = None
    dim = sum(p.numel() for p in params)
    for i in range(min(steps, dim)):
        basis.append(v)
        w = hessian_vector_product(model, batches, v)
        alpha = float(_dot(w, v))
        w = _axpy(-alpha, v, w)
        if v_prev is not None:
            w = _axpy(-beta, v_prev, w)
        for b in basis:  # full reorthogonalization keeps Ritz values from repeating
            w = _axpy(-_dot(w, b), b, w)
        alphas.append(alpha)
        beta = float(_norm(w))
        progress(i + 1)
        if beta < 1e-10:
            break
        betas.append(beta)
        v_prev, v = v, _scale(1.0 / beta, w)
    n = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    off = torch.tensor(betas[: n - 1], dtype=torch.float64)
    t += torch.diag(off, 1) + torch.diag(off, -1)
    ritz = torch.linalg.eigvalsh(t).flip(0)
    return [float(r) for r in ritz[:k]]


def power_iteration_top_eigenvalue(
    model: nn.Module, batches: Batches, iters: int = 100, tol: float = 1e-4, seed: int = 0
) -> float:
    """The dominant eigenvalue (largest in magnitude) by power iteration: a simple cross-check for
    Lanczos."""
    params = _params(model)
    g = torch.Generator().manual_seed(seed)
    v = [_draw_gaussian(p, g) for p in params]
    v = _scale(1.0 / _norm(v), v)
    eig = 0.0
    for _ in range(iters):
        hv = hessian_vector_product(model, batches, v)
        new = float(_dot(hv, v))
        v = _scale(1.0 / _norm(hv), hv)
        if abs(new - eig) <= tol * max(abs(new), 1e-12):
            return new
        eig = new
    return eig


def hutchinson_trace(
    model: nn.Module,
    batches: Batches,
    samples: int = 100,
    seed: int = 0,
    progress: Callable[[int], None] = lambda _: None,
) -> tuple[float, float]:
    """tr(H) ~ mean of v^T H v over Rademacher v; returns (estimate, its standard error)."""
    params = _params(model)
    g = torch.Generator().manual_seed(seed)
    values = []
    for i in range(samples):
        v = [_draw_rademacher(p, g) for p in params]
        values.append(float(_dot(hessian_vector_product(model, batches, v), v)))
        progress(i + 1)
    mean = sum(values) / len(values)
    var = sum((x - mean) ** 2 for x in values) / max(len(values) - 1, 1)
    return mean, math.sqrt(var / len(values))
