"""Damping lost in the factors' rounding is said out loud: counted and warned, not silently turned
into updates 10^3 times too large."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bigbatch.optim.kfac import KFACPreconditioner


def _step(damping, dtype, method):
    torch.manual_seed(0)
    # Batch 16 against a 65-wide input: most directions of A carry no data.
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).to(dtype)
    x, y = torch.randn(16, 64, dtype=dtype), torch.randint(0, 10, (16,))
    kfac = KFACPreconditioner(
        model,
        damping=damping,
        factor_decay=0.0,
        factor_interval=1,
        inverse_interval=1,
        kl_clip=0.0,
        factor_dtype=dtype,
        inverse_method=method,
    )
    F.cross_entropy(model(x), y).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kfac.step(lr=0.1)
    grads = [p.grad.double() for p in model.parameters()]
    return grads, kfac.metrics()["kfac_damping_below_resolution"], caught


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_damping_below_float32_resolution_is_counted_and_warned(method):
    float32, flagged, caught = _step(1e-12, torch.float32, method)
    exact, exact_flagged, _ = _step(1e-12, torch.float64, method)
    # The problem is real: float32 statistics make the update far larger than the exact one...
    assert float(float32[0].norm() / exact[0].norm()) > 10
    # ...and it is said: every layer counted, one warning that names the key and the fix.
    assert flagged == 2 and exact_flagged == 0
    messages = [str(w.message) for w in caught if "resolution" in str(w.message)]
    assert len(messages) == 1 and "kfac.damping=1e-12" in messages[0]
    _, sane, caught = _step(1e-2, torch.float32, method)
    assert sane == 0 and not [w for w in caught if "resolution" in str(w.message)]
