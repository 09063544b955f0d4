"""LARS (You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks", Alg. 1).

For each parameter tensor w with gradient g, weight decay beta, trust coefficient eta, global
rate gamma and momentum m:

    local_lr = eta * |w| / (|g| + beta * |w|)        (1 where |w| or that sum is 0)
    v        = m * v + gamma * local_lr * (g + beta * w)
    w        = w - v             (Nesterov: w - (m * v + gamma * local_lr * (g + beta * w)))

The global rate sits inside the momentum buffer, as in the paper. With ``exclude_1d`` the 1-D
tensors (biases, BatchNorm scales and shifts) take ``v = m * v + gamma * g``: no trust ratio and no
weight decay, the common practice since the paper (its ImageNet runs and later LARS codes).
Written here rather than taken from pytorch-optimizer, whose LARS keeps the rate outside the
buffer and overwrites ``p.grad`` in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from bigbatch.optim.closure import run_closure


class LARS(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
        nesterov: bool = False,
        exclude_1d: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            nesterov=nesterov,
            exclude_1d=exclude_1d,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = run_closure(closure)
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["exclude_1d"] and p.ndim <= 1:
                    update = g * lr
                else:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    denominator = g_norm + decay * w_norm
                    ratio = torch.where(
                        (w_norm > 0) & (denominator > 0),
                        group["trust_coefficient"] * w_norm / denominator,
                        torch.ones_like(w_norm),
                    )
                    update = (g + decay * p) * (ratio * lr)
                if momentum > 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    buf.mul_(momentum).add_(update)
                    update = update.add(buf, alpha=momentum) if group["nesterov"] else buf
                p.sub_(update)
        return loss
