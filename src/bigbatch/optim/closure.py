"""torch.optim's closure convention, shared by bigbatch's optimizers."""

from __future__ import annotations

from collections.abc import Callable

import torch


def run_closure(closure: Callable[[], float] | None) -> float | None:
    """The loss of ``closure`` (re-evaluated with autograd on), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
