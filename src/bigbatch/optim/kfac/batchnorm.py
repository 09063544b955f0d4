"""Unit-wise curvature of BatchNorm's affine parameters: one 2x2 Fisher block per channel.

For channel c of a BatchNorm layer, example n's own gradient of (gamma_c, beta_c) is

    d gamma_c = sum_t g_{n,c,t} xhat_{n,c,t},    d beta_c = sum_t g_{n,c,t}

with xhat the normalized input (the batch's statistics held fixed, as the layer used them), g the
gradient of example n's loss with respect to the layer's output and t the spatial locations. The
block is F_c = E_n[[d gamma_c, d beta_c]^T [d gamma_c, d beta_c]] (ASDL's "unit-wise" Fisher); the
cross-channel terms are dropped. As for G in layers.py, the hooks see g / N of a mean loss and the
preconditioner multiplies the sums by N^2. The damped 2x2 systems (F_c + damping I) x = v are solved
in closed form.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bigbatch.optim.kfac.state import RESOLUTION_ULPS, Damping, copy_tensor

BatchNorm = nn.BatchNorm1d | nn.BatchNorm2d


def normalized_input(module: BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with the statistics a training-mode forward used: the batch's
    (biased variance), or each ghost batch's when the module normalizes slices of
    ``ghost_batch_size`` examples."""
    ghost = int(getattr(module, "ghost_batch_size", 0) or 0)
    n = x.shape[0]
    if ghost and ghost < n:
        pieces = [normalized_input_of_batch(module, s) for s in x.split(ghost)]
        return torch.cat(pieces)
    return normalized_input_of_batch(module, x)


def normalized_input_of_batch(module: BatchNorm, x: torch.Tensor) -> torch.Tensor:
    dims = [0, *range(2, x.dim())]  # every axis but the channels
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, keepdim=True, unbiased=False)
    return (x - mean) * torch.rsqrt(var + module.eps)


class BatchNormFactors:
    """Per-channel sums of (d gamma^2, d gamma d beta, d beta^2) over examples between K-FAC
    steps, from the normalized inputs a forward hook holds until the output gradient arrives."""

    def __init__(self, name: str, module: BatchNorm):
        self.name = name
        self.module = module
        self.f_sum: torch.Tensor | None = None  # [channels, 3]
        self.count = 0
        self._held: list[torch.Tensor] = []  # normalized inputs, in forward order

    @property
    def channels(self) -> int:
        return int(self.module.num_features)

    def add_input(self, x: torch.Tensor, rows: int) -> None:
        """A micro-batch's input; ``rows``: how many of its first examples give statistics (the
        normalization uses all of them, as the forward did)."""
        self.count += rows
        x = x.detach()
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # mixed precision: bf16/fp16 rows
        self._held.append(normalized_input(self.module, x)[:rows])

    def add_output_grad(self, grad_output: torch.Tensor, rows: int) -> None:
        xhat = self._held.pop(0)
        g = grad_output.detach()[:rows]
        g = g.to(torch.promote_types(g.dtype, torch.float32))
        spatial = list(range(2, g.dim()))
        d_gamma = (g * xhat.to(g.dtype)).sum(spatial) if spatial else g * xhat.to(g.dtype)
        d_beta = g.sum(spatial) if spatial else g
        sums = torch.stack(
            [(d_gamma * d_gamma).sum(0), (d_gamma * d_beta).sum(0), (d_beta * d_beta).sum(0)], 1
        )
        self.f_sum = sums if self.f_sum is None else self.f_sum.add_(sums)

    def finish(self) -> None:
        """Inputs whose gradient never came (no backward reached the layer) are dropped."""
        self._held.clear()

    def reset(self) -> None:
        self.f_sum, self.count = None, 0
        self._held.clear()

    # -- gradient as a matrix [channels, 2]: (gamma, beta) per channel ---------------------------
    def has_grad(self) -> bool:
        return self.module.weight.grad is not None and self.module.bias.grad is not None

    def grad_matrix(self) -> torch.Tensor:
        assert self.module.weight.grad is not None and self.module.bias.grad is not None
        return torch.stack([self.module.weight.grad, self.module.bias.grad], 1)

    def grad_parts(self, m: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        assert self.module.weight.grad is not None and self.module.bias.grad is not None
        return [(self.module.weight.grad, m[:, 0]), (self.module.bias.grad, m[:, 1])]


def solve_2x2(blocks: torch.Tensor, v: torch.Tensor, damping: float) -> torch.Tensor:
    """(F_c + damping I)^-1 v_c for every channel: blocks [C, 3] = (f11, f12, f22), v [C, 2]."""
    f11, f12, f22 = (blocks[:, i] + (damping if i != 1 else 0.0) for i in range(3))
    det = f11 * f22 - f12 * f12
    x_gamma = (f22 * v[:, 0] - f12 * v[:, 1]) / det
    x_beta = (f11 * v[:, 1] - f12 * v[:, 0]) / det
    return torch.stack([x_gamma, x_beta], 1)


class BatchNormState:
    """Running 2x2 blocks of one BatchNorm layer; its "decomposition" is the blocks as of the last
    decomposition step (the closed-form solve needs nothing more)."""

    def __init__(self, factors: BatchNormFactors):
        self.factors = factors
        self.F: torch.Tensor | None = None  # [channels, 3]
        self.decomposition: tuple[torch.Tensor, ...] | None = None

    def blocks(self) -> torch.Tensor:
        """The running blocks as [channels, 2, 2] matrices."""
        assert self.F is not None
        f11, f12, f22 = self.F.unbind(1)
        return torch.stack([f11, f12, f12, f22], 1).view(-1, 2, 2)

    # -- the interface the preconditioner uses (same as LayerState's) ---------------------------
    @property
    def has_factors(self) -> bool:
        return self.F is not None

    def statistic_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"F": (self.factors.channels, 3)}

    def batch_sums(self, output_scale: float | torch.Tensor) -> dict[str, torch.Tensor] | None:
        f = self.factors
        return None if f.f_sum is None else {"F": f.f_sum * output_scale}

    def update(self, means: dict[str, torch.Tensor], decay: float | torch.Tensor) -> None:
        if self.F is None:
            self.F = means["F"]
        else:
            self.F.mul_(decay).add_(means["F"] * (1 - decay))

    def cost(self) -> float:
        return 8.0 * self.factors.channels

    def damping_below_resolution(self, rule: Damping) -> bool:
        assert self.F is not None
        eps = RESOLUTION_ULPS * torch.finfo(self.F.dtype).eps
        return rule.value < eps * float(self.F[:, [0, 2]].max())

    def decompose(self, rule: Damping) -> tuple[int, bool]:
        assert self.F is not None
        self.decomposition = (self.F.clone(),)
        return 0, True

    def decomposition_like(self, rule: Damping, **like: Any) -> tuple[torch.Tensor, ...]:
        return (torch.empty(self.factors.channels, 3, **like),)

    def refresh(self, rule: Damping) -> None:
        """Nothing is derived from the decomposition: solve() reads the damping itself."""

    def solve(self, v: torch.Tensor, rule: Damping) -> torch.Tensor:
        assert self.decomposition is not None
        return solve_2x2(self.decomposition[0], v, rule.value)

    def state_dict(self) -> dict[str, Any]:
        d = self.decomposition
        return {"F": copy_tensor(self.F), "decomposition": None if d is None else [d[0].clone()]}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.F = copy_tensor(state["F"], device)
        saved = state["decomposition"]
        self.decomposition = None if saved is None else (saved[0].detach().to(device, copy=True),)
