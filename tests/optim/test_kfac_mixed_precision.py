"""K-FAC under autocast (CPU autocast runs the same code path as CUDA's): statistics are summed in
float32 however the forward ran, and a GradScaler's loss scale is removed from G.
"""

import pytest
import torch
import torch.nn.functional as F

from bigbatch.models import build_model
from bigbatch.optim.kfac import KFACPreconditioner
from bigbatch.train.steps import autocast


def _factors(precision, grad_scale=None, pass_scale=True):
    torch.manual_seed(0)
    model = build_model("lenet5", 3, (32, 32), 10)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    kfac = KFACPreconditioner(
        model, damping=1e-2, factor_decay=0.0, factor_interval=1, inverse_interval=1
    )
    with autocast(x.device, precision):
        loss = F.cross_entropy(model(x).float(), y)
    (loss * (grad_scale or 1.0)).backward()
    if grad_scale:
        for p in model.parameters():
            p.grad /= grad_scale  # what GradScaler.unscale_ does
    kfac.step(lr=0.1, grad_scale=grad_scale if pass_scale else None)
    return kfac


def _relative(a, b):
    return float((a - b).norm() / b.norm())


# G's error is the backward pass's own rounding (bf16 keeps 8 significant bits, fp16 11), A's the
# forward's; a statistic summed in the low precision would be far off (an fp16 Gram overflows).
@pytest.mark.parametrize("precision, g_tolerance", [("bf16", 0.05), ("fp16", 0.03)])
def test_factors_under_autocast_are_float32_and_close_to_fp32(precision, g_tolerance):
    exact = _factors("fp32")
    scale = 1024.0 if precision == "fp16" else None
    mixed = _factors(precision, grad_scale=scale)
    for name, state in mixed.layers.items():
        assert state.A.dtype == state.G.dtype == torch.float32, name
        assert _relative(state.A, exact.layers[name].A) < 0.01, name
        assert _relative(state.G, exact.layers[name].G) < g_tolerance, name
    assert mixed.health == dict.fromkeys(mixed.health, 0)


def test_the_loss_scale_is_removed_from_g():
    exact = _factors("fp32")
    scaled = _factors("fp32", grad_scale=64.0)
    unremoved = _factors("fp32", grad_scale=64.0, pass_scale=False)
    for name in exact.layers:
        torch.testing.assert_close(scaled.layers[name].G, exact.layers[name].G, rtol=1e-4, atol=0)
        ratio = unremoved.layers[name].G.norm() / exact.layers[name].G.norm()
        assert ratio == pytest.approx(64.0**2, rel=1e-4)


def test_kfac_arithmetic_runs_at_full_float32_precision(monkeypatch):
    # TF32 (precision "high") would keep 10 mantissa bits in K-FAC's products on GPUs: its own
    # region sets "highest" and gives the user's setting back.
    from bigbatch.optim.kfac.state import LayerState

    seen = []
    solve = LayerState.solve

    def spying_solve(self, v, rule):
        seen.append(torch.get_float32_matmul_precision())
        return solve(self, v, rule)

    monkeypatch.setattr(LayerState, "solve", spying_solve)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 3))
        kfac = KFACPreconditioner(model, factor_interval=1, inverse_interval=1)
        torch.nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.arange(8) % 3).backward()
        kfac.step(lr=0.1)
        assert seen == ["highest"]
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)
