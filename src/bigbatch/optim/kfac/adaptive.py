"""Levenberg-Marquardt adaptation of K-FAC's damping (Martens & Grosse 2015, section 6.5).

Every ``interval`` steps the update delta that the optimizer applied is judged on the batch that
produced it by the reduction ratio

    rho = (h(theta + delta) - h(theta)) / (M(delta) - M(0)),
    M(delta) - M(0) = grad h^T delta + 1/2 delta^T (F + (lambda + eta) I) delta,

with h the batch loss plus the L2 term eta/2 |theta|^2 of the optimizer's weight decay eta, F the
exact Fisher of the batch at theta (for softmax cross-entropy the Gauss-Newton matrix J^T H_z J,
computed as a Jacobian-vector product and a Hessian-vector product in logit space, not K-FAC's
approximation) and lambda the damping (M&G's quadratic model of section 6.4). Then lambda <-
lambda / omega when rho < 1/4, lambda <- omega lambda when rho > 3/4, omega = (19/20)^interval,
kept within [min_damping, max_damping]. An update the model predicts to raise the loss, or a
non-finite rho, raises lambda; a zero update (a skipped fp16 step) leaves it.

Cost per adaptation: one forward with a tangent (the JVP) and one plain forward on the batch, both
without autograd (no K-FAC hook sees them) and without updating BatchNorm's running statistics; one
host read (and, with data parallelism, one all-reduce).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jvp

# (logits of the rows start..start+size of the batch, start, size) -> their mean loss.
LossOfRows = Callable[[torch.Tensor, int, int], torch.Tensor]


def _total(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of scalar tensors in float64, on their device."""
    return torch.stack([t.double() for t in terms]).sum()


@contextlib.contextmanager
def _batch_statistics_only(model: nn.Module) -> Iterator[None]:
    """BatchNorm normalizes with the batch's statistics, as in training, but updates no running
    statistics (these forwards only judge a step)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracked = [m.track_running_stats for m in norms]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, flag in zip(norms, tracked):
            m.track_running_stats = flag


class AdaptiveDamping:
    def __init__(self, interval: int, min_damping: float, max_damping: float):
        self.interval = interval
        self.omega = (19 / 20) ** interval
        self.min_damping, self.max_damping = min_damping, max_damping
        self.ratios: list[float] = []  # each finite rho since the last reset

    def due(self, step: int) -> bool:
        return step % self.interval == 0

    @staticmethod
    def capture(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each trainable parameter and its (averaged, unscaled, not yet preconditioned) gradient,
        copied before the step changes them."""
        return {
            name: (p.detach().clone(), p.grad.detach().clone())
            for name, p in model.named_parameters()
            if p.grad is not None
        }

    def reduction_ratio(
        self,
        model: nn.Module,
        x: torch.Tensor,
        loss_of_rows: LossOfRows,
        before: dict[str, tuple[torch.Tensor, torch.Tensor]],
        damping: float,
        weight_decay: float,
        micro: int,
        all_sum: Callable[[list[float]], list[float]] = lambda v: v,
    ) -> float | None:
        """rho of the step from ``before`` to the model's current parameters on batch ``x``
        (``micro`` rows at a time; ``all_sum`` sums over data-parallel ranks); None for a zero
        update."""
        params = dict(model.named_parameters())
        old = {name: theta for name, (theta, _) in before.items()}
        delta = {name: params[name].detach() - theta for name, theta in old.items()}
        # The rest of the model (frozen parameters, buffers) as it is; buffers copied, so that
        # BatchNorm's running statistics stay untouched by these forwards.
        fixed = {n: p.detach() for n, p in params.items() if n not in old}
        params_now = {name: params[name].detach() for name in old}
        fixed.update({n: b.clone() for n, b in model.named_buffers()})
        # Sums over this rank's examples of the old and new loss and of delta^T F delta.
        sums = torch.zeros(3, dtype=torch.float64, device=x.device)
        n = x.shape[0]
        with torch.autocast(x.device.type, enabled=False), _batch_statistics_only(model):
            for start in range(0, n, micro):
                size = min(micro, n - start)
                rows = x.narrow(0, start, size)

                def logits_at(theta: dict[str, torch.Tensor], rows: torch.Tensor = rows) -> Any:
                    return functional_call(model, {**fixed, **theta}, (rows,))

                # Without autograd, so no hook (K-FAC's statistics) sees these forwards.
                with torch.no_grad():
                    primal_and_tangent = jvp(logits_at, (old,), (delta,))
                    new = loss_of_rows(logits_at(dict(params_now)), start, size)
                z, u = primal_and_tangent[0], primal_and_tangent[1]
                with torch.enable_grad():  # the loss's Hessian-vector product in logit space
                    z = z.detach().requires_grad_(True)
                    loss = loss_of_rows(z, start, size)
                    (grad_z,) = torch.autograd.grad(loss, z, create_graph=True)
                    (hu,) = torch.autograd.grad(grad_z, z, u)
                terms = torch.stack([loss.detach(), new, (u * hu).sum()]).double()
                sums += terms * size
        norms = torch.stack(
            [
                _total(d.pow(2).sum() for d in delta.values()),
                _total(t.pow(2).sum() for t in old.values()),
                _total(p.pow(2).sum() for p in params_now.values()),
                _total(((g + weight_decay * t) * delta[k]).sum() for k, (t, g) in before.items()),
            ]
        )
        values = torch.cat([sums, norms]).tolist()  # the one host read of this analysis
        step_sq, theta_sq_old, theta_sq_new, grad_dot = values[3:]
        # Each rank's sums over its examples, then the means over all ranks' examples.
        loss_old, loss_new, curvature, total = all_sum([*values[:3], float(n)])
        loss_old, loss_new, curvature = loss_old / total, loss_new / total, curvature / total
        if step_sq == 0:
            return None
        actual = loss_new - loss_old + weight_decay / 2 * (theta_sq_new - theta_sq_old)
        predicted = grad_dot + 0.5 * curvature + 0.5 * (damping + weight_decay) * step_sq
        return actual / predicted if predicted < 0 else float("nan")

    def adjusted(self, damping: float, rho: float | None) -> float:
        """The damping after an adaptation that measured ``rho``."""
        if rho is None:
            return damping
        if math.isfinite(rho):
            self.ratios.append(rho)
        if not rho > 0.25:  # a poor or undefined (nan) prediction
            damping = damping / self.omega
        elif rho > 0.75:
            damping = damping * self.omega
        return min(max(damping, self.min_damping), self.max_damping)
