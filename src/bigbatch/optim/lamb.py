"""LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning", Algorithm 2, phi the
identity).

For each parameter tensor w with gradient g at step t:

    m = beta1 * m + (1 - beta1) * g            v = beta2 * v + (1 - beta2) * g^2
    r = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
    u = r + weight_decay * w
    w = w - lr * |w| / |u| * u                  (ratio 1 where |w| or |u| is 0)

With ``exclude_1d`` the 1-D tensors take ``w = w - lr * r`` (no trust ratio, no weight decay), as
the paper's BERT runs leave biases and normalization out. Written here rather than taken from
pytorch-optimizer 4.1, whose Lamb by default omits the second moment's bias correction, decays
weights outside the trust ratio and scales the trust-ratio-normalized step by 1 / (1 - beta1^t).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from bigbatch.optim.closure import run_closure


class LAMB(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        exclude_1d: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, exclude_1d=exclude_1d
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = run_closure(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                r = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt_().add_(group["eps"]))
                if group["exclude_1d"] and p.ndim <= 1:
                    p.sub_(r, alpha=group["lr"])
                    continue
                u = r.add_(p, alpha=group["weight_decay"])
                w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(u)
                ratio = torch.where(
                    (w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm)
                )
                p.sub_(u * (ratio * group["lr"]))
        return loss
