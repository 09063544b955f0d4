"""torch.optim.Muon for conv weights too, and several optimizers stepped as one.

Muon (Jordan et al. 2024) orthogonalizes each weight's momentum by a quintic Newton-Schulz
iteration. torch.optim.Muon accepts only 2-D parameters; Muon's authors treat a conv weight
(out, in, kh, kw) as the (out, in * kh * kw) matrix of its im2col form, so ``MatrixMuon`` steps a
2-D copy of every weight with torch.optim.Muon and writes the result back: the maths is
torch.optim.Muon's, including its lr adjustment ``sqrt(max(1, rows / cols))`` ("original") of that
matrix and its decoupled weight decay ``w *= 1 - lr * weight_decay``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from bigbatch.optim.closure import run_closure


class MatrixMuon(torch.optim.Optimizer):
    """torch.optim.Muon over tensors of 2 or more dimensions, each seen as (shape[0], rest)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        adjust_lr_fn: str = "original",
    ) -> None:
        params = list(params)
        for p in params:
            if p.ndim < 2:
                raise ValueError(f"MatrixMuon takes weights of 2 or more dimensions, not {p.shape}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        # Leaf copies that own torch.optim.Muon's state; refilled from the weights every step, so
        # a restored or perturbed model is what gets stepped.
        self._matrices = [p.detach().reshape(p.shape[0], -1).clone() for p in params]
        self._muon = torch.optim.Muon(
            self._matrices,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = run_closure(closure)
        if len(self.param_groups) != 1:
            raise ValueError("MatrixMuon keeps one parameter group")
        group, inner = self.param_groups[0], self._muon.param_groups[0]
        inner["lr"], inner["weight_decay"] = group["lr"], group["weight_decay"]
        params = group["params"]
        for p, m in zip(params, self._matrices):
            m.copy_(p.reshape(m.shape))
            m.grad = None if p.grad is None else p.grad.reshape(m.shape)
        self._muon.step()
        for p, m in zip(params, self._matrices):
            if m.grad is not None:
                p.copy_(m.view(p.shape))
                m.grad = None
        return loss

    def state_dict(self) -> dict[str, Any]:
        return self._muon.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._muon.load_state_dict(state_dict)


class CombinedOptimizer(torch.optim.Optimizer):
    """Optimizers over disjoint parameters stepped as one. ``param_groups`` are theirs (so a
    schedule that writes each group's lr reaches them); ``state_dict`` holds each one's."""

    def __init__(self, parts: Sequence[torch.optim.Optimizer]) -> None:
        # Not Optimizer.__init__: the parts own the parameters, the state and the hooks.
        self.parts = list(parts)
        self.defaults: dict[str, Any] = {}
        self.state: Any = {}
        self._collect_groups()

    def _collect_groups(self) -> None:
        self.param_groups = [g for part in self.parts for g in part.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = run_closure(closure)
        for part in self.parts:
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        parts = state_dict["parts"]
        if len(parts) != len(self.parts):
            raise ValueError(f"state of {len(parts)} optimizers given to {len(self.parts)}")
        for part, state in zip(self.parts, parts):
            part.load_state_dict(state)
        self._collect_groups()  # load_state_dict gives each part new group dicts

    def __repr__(self) -> str:
        return f"CombinedOptimizer({', '.join(type(p).__name__ for p in self.parts)})"
