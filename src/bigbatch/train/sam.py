"""Sharpness-aware minimization (Foret, Kleiner, Mobahi & Neyshabur 2021, Algorithm 1) around any
torch.optim optimizer.

One step: the gradient g at w (already in ``p.grad``), the ascent point ``w + rho * g / |g|`` (|g|
the L2 norm over all parameters), the gradient there replaces g, w is restored bit for bit, and the
optimizer then steps from w with the second gradient. The choices:

- BatchNorm: the second forward pass normalizes with its own batch statistics but does not update
  the running statistics (the authors' advice, davda54/sam): every buffer is restored after it.
- Data parallel: ``g`` is the all-reduced gradient of the global batch, and so is the second one:
  SAM over the global batch (the paper's m-sharpness with m = the global batch, not one
  accelerator's shard), so a run on N ranks equals one process on the same batches (a test checks
  it on two gloo ranks). Each step costs two forward/backward passes and two all-reduces.
- fp16: the gradients are loss-scaled, and ``g / |g|`` does not depend on the scale. A first
  gradient that overflowed is left in place without a second pass, so the gradient scaler skips
  the step and lowers its scale as usual (one host read per step, only with fp16).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# Keeps g / |g| finite for a zero gradient (the authors' value).
NORM_EPS = 1e-12


class SAM:
    def __init__(self, model: nn.Module, rho: float) -> None:
        if rho <= 0:
            raise ValueError(f"SAM's rho must be > 0, got {rho}")
        self.model = model
        self.rho = rho

    def replace_gradient(
        self,
        backward: Callable[[], object],
        reduce: Callable[[], object],
        skip_overflow: bool = False,
    ) -> None:
        """With each ``p.grad`` the (reduced) gradient at w, make it the gradient at the ascent
        point: ``backward`` accumulates the batch's gradient into the zeroed ``p.grad``, ``reduce``
        averages it over ranks. With ``skip_overflow``, a non-finite first gradient stays."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params if p.grad is not None]
        norms = torch._foreach_norm(grads)
        norm = torch.linalg.vector_norm(torch.stack([n.to(norms[0].dtype) for n in norms]))
        if skip_overflow and not bool(torch.isfinite(norm)):
            return
        scale = self.rho / (norm + NORM_EPS)
        saved = [p.detach().clone() for p in params]
        buffers = [b.detach().clone() for b in self.model.buffers()]
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g * scale.to(g.dtype))
                p.grad = None
        backward()
        reduce()
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
            for b, value in zip(self.model.buffers(), buffers):
                b.copy_(value)
