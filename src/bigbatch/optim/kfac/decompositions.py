"""Decompositions of one damped Kronecker factor that never crash a run.

Each returns (result, retried): ``result`` is None when every attempt failed (the caller keeps the
last good decomposition and counts the failure), ``retried`` whether a fallback succeeded.
"""

from __future__ import annotations

import math

import torch


def robust_eigh(m: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, bool]:
    """(eigenvectors, eigenvalues) of symmetric ``m``: in its dtype, else float64, else jittered."""
    attempts = [(m.dtype, 0.0), (torch.float64, 0.0), (torch.float64, 1e-6), (torch.float64, 1e-3)]
    for attempt, (dtype, jitter) in enumerate(attempts):
        try:
            x = m.to(dtype)
            if jitter:
                scale = max(float(x.diagonal().abs().mean()), 1e-12)
                x = x + jitter * scale * torch.eye(x.shape[0], dtype=dtype, device=x.device)
            d, q = torch.linalg.eigh(x)
            if math.isfinite(float(d.sum() + q.sum())):  # non-finite iff an entry is (|q| <= 1)
                # Tiny negative eigenvalues are round-off of a PSD matrix.
                return (q.to(m.dtype).contiguous(), d.clamp_min(0).to(m.dtype)), attempt > 0
        except (RuntimeError, torch.linalg.LinAlgError):
            pass
    return None, False


def robust_inverse(m: torch.Tensor, damping: float) -> tuple[torch.Tensor | None, bool]:
    """(m + damping I)^-1: Cholesky in m's dtype, else LU in float64, else with 10x damping."""
    damped = m.clone()
    damped.diagonal().add_(damping)
    chol, info = torch.linalg.cholesky_ex(damped)
    if int(info) == 0:
        inv = torch.cholesky_inverse(chol)
        if math.isfinite(float(inv.sum())):  # one reduction: any non-finite entry makes it so
            return inv, False
    eye = torch.eye(m.shape[0], dtype=torch.float64, device=m.device)
    for extra in (1.0, 10.0):
        try:
            inv = torch.linalg.inv(m.to(torch.float64) + damping * extra * eye)
            if torch.isfinite(inv).all():
                return inv.to(m.dtype), True
        except (RuntimeError, torch.linalg.LinAlgError):
            pass
    return None, False


def pi_ratio(a: torch.Tensor, g: torch.Tensor) -> float:
    """Martens & Grosse's pi = sqrt((tr A / dim A) / (tr G / dim G)); 1 where it is undefined."""
    ta = float(a.diagonal().mean())
    tg = float(g.diagonal().mean())
    if ta <= 0 or tg <= 0 or not math.isfinite(ta / tg):
        return 1.0
    return math.sqrt(ta / tg)
