"""One layer's K-FAC state: running factors, their decomposition, saving and restoring them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from bigbatch.optim.kfac.decompositions import pi_ratio, robust_eigh, robust_inverse
from bigbatch.optim.kfac.layers import LayerFactors

# Damping below this many units of a factor's precision (times its scale) is lost in rounding.
RESOLUTION_ULPS = 100


@dataclass(frozen=True)
class Damping:
    """How a layer's Kronecker block is damped and solved (the conventions are preconditioner.py's):
    ``method`` "eigen" or "inverse", ``value`` the damping, ``pi`` Martens & Grosse's split."""

    method: str
    value: float
    pi: bool


def copy_tensor(t: torch.Tensor | None, device: torch.device | None = None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(device or t.device, copy=True)


class LayerState:
    """Running Kronecker factors of one Linear/Conv2d layer and their decomposition.

    The preconditioner uses every layer's state through the same methods (batchnorm.py's
    BatchNormState has them too): named statistics, their running update, a decomposition and a
    solve, so that it and the distributed code handle every kind of block alike.
    """

    def __init__(self, factors: LayerFactors):
        self.factors = factors
        self.A: torch.Tensor | None = None
        self.G: torch.Tensor | None = None
        # eigen: (QA, dA, QG, dG); inverse: (A_inv, G_inv)
        self.decomposition: tuple[torch.Tensor, ...] | None = None
        # eigen: 1 / (damped eigenvalues of kron(G, A)) as a [g_dim, a_dim] matrix, fixed until the
        # next decomposition so each step's preconditioning is four products and one multiply.
        self.scale: torch.Tensor | None = None

    # -- statistics ------------------------------------------------------------------------------
    @property
    def has_factors(self) -> bool:
        return self.A is not None

    def statistic_shapes(self) -> dict[str, tuple[int, ...]]:
        a, g = self.factors.a_dim, self.factors.g_dim
        return {"A": (a, a), "G": (g, g)}

    def batch_sums(self, output_scale: float | torch.Tensor) -> dict[str, torch.Tensor] | None:
        """This step's raw sums (G times ``output_scale``, which makes its rows per-example
        gradients); None when the layer saw no input or no output gradient."""
        f = self.factors
        if f.a_sum is None or f.g_sum is None:
            return None
        return {"A": f.a_sum, "G": f.g_sum * output_scale}

    def update(self, means: dict[str, torch.Tensor], decay: float | torch.Tensor) -> None:
        """Fold a batch's factors into the running averages (the first batch initializes them);
        ``decay`` is the old value's weight."""
        if self.A is None or self.G is None:
            self.A, self.G = means["A"], means["G"]
        else:
            self.A.mul_(decay).add_(means["A"] * (1 - decay))
            self.G.mul_(decay).add_(means["G"] * (1 - decay))

    def cost(self) -> float:
        """Work of one decomposition, for assigning layers to ranks."""
        return float(self.factors.a_dim) ** 3 + float(self.factors.g_dim) ** 3

    # -- damping and decompositions (conventions in preconditioner.py) -------------------------
    def damping_below_resolution(self, rule: Damping) -> bool:
        """Whether the damping is lost in the factors' rounding: below RESOLUTION_ULPS units of
        their dtype's precision times their scale, directions without data get updates of noise /
        damping (the float32 statistics, not the decomposition, set that limit)."""
        assert self.A is not None and self.G is not None
        eps = RESOLUTION_ULPS * torch.finfo(self.A.dtype).eps
        # The largest diagonal entry: within a factor of dim of the largest eigenvalue.
        scale_a = float(self.A.diagonal().max())
        scale_g = float(self.G.diagonal().max())
        if rule.method == "eigen" and not rule.pi:
            return rule.value < eps * scale_a * scale_g
        pi = pi_ratio(self.A, self.G) if rule.pi else 1.0
        root = math.sqrt(rule.value)
        return root * pi < eps * scale_a or root / pi < eps * scale_g

    def decompose(self, rule: Damping) -> tuple[int, bool]:
        """(fallbacks used, success); on failure the previous decomposition stays."""
        assert self.A is not None and self.G is not None
        if rule.method == "eigen":
            (qa_da, retried_a), (qg_dg, retried_g) = robust_eigh(self.A), robust_eigh(self.G)
            if qa_da is None or qg_dg is None:
                return retried_a + retried_g, False
            self.decomposition = (*qa_da, *qg_dg)
            self.set_scale(rule)
            return retried_a + retried_g, True
        # Martens & Grosse's split: A + pi sqrt(d) I and G + sqrt(d) / pi I.
        pi = pi_ratio(self.A, self.G) if rule.pi else 1.0
        root = math.sqrt(rule.value)
        (a_inv, retried_a), (g_inv, retried_g) = (
            robust_inverse(self.A, root * pi),
            robust_inverse(self.G, root / pi),
        )
        if a_inv is None or g_inv is None:
            return retried_a + retried_g, False
        self.decomposition = (a_inv, g_inv)
        return retried_a + retried_g, True

    def set_scale(self, rule: Damping) -> None:
        """Cache 1 / (damped eigenvalues) of an eigen decomposition (pi from the same factors)."""
        if rule.method != "eigen" or self.decomposition is None:
            self.scale = None
            return
        _, da, _, dg = self.decomposition
        if rule.pi:
            pi = pi_ratio(self.A, self.G) if self.A is not None and self.G is not None else 1.0
            root = math.sqrt(rule.value)
            denominator = torch.outer(dg + root / pi, da + root * pi)
        else:
            denominator = torch.outer(dg, da).add_(rule.value)
        self.scale = denominator.reciprocal_()

    def decomposition_like(self, rule: Damping, **like: Any) -> tuple[torch.Tensor, ...]:
        """Empty tensors shaped as ``rule``'s decomposition (receive buffers of a broadcast)."""
        a, g = self.factors.a_dim, self.factors.g_dim
        if rule.method == "eigen":
            shapes: tuple[tuple[int, ...], ...] = ((a, a), (a,), (g, g), (g,))
        else:
            shapes = ((a, a), (g, g))
        return tuple(torch.empty(shape, **like) for shape in shapes)

    def refresh(self, rule: Damping) -> None:
        """Derive what depends on the damping from the decomposition (after a decomposition
        came from another rank, or the damping changed)."""
        self.set_scale(rule)

    def solve(self, v: torch.Tensor, rule: Damping) -> torch.Tensor:
        """(F + damping)^-1 v for the gradient matrix v [g_dim, a_dim]."""
        assert self.decomposition is not None
        if rule.method == "inverse":
            a_inv, g_inv = self.decomposition
            return g_inv @ v @ a_inv
        if self.scale is None:
            self.set_scale(rule)
        assert self.scale is not None
        qa, _, qg, _ = self.decomposition
        return qg @ (qg.t() @ v @ qa).mul_(self.scale) @ qa.t()

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Copies: later steps do not change a state that was saved or handed on."""
        decomposition = self.decomposition
        return {
            "A": copy_tensor(self.A),
            "G": copy_tensor(self.G),
            "decomposition": None
            if decomposition is None
            else [copy_tensor(t) for t in decomposition],
            "scale": copy_tensor(self.scale),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """Copies on ``device``, whatever device the state was saved on."""
        self.A, self.G = copy_tensor(state["A"], device), copy_tensor(state["G"], device)
        saved = state["decomposition"]
        self.decomposition = (
            None if saved is None else tuple(t.detach().to(device, copy=True) for t in saved)
        )
        self.scale = copy_tensor(
            state.get("scale"), device
        )  # absent in older checkpoints: recomputed
