"""bigbatch's K-FAC against a peer library's: ASDL (asdfghjkl, the `test` extra) preconditions with
the same pi-split damping and Cholesky inverses, so on a bias-free LeNet-5 (ASDL and bigbatch append
the bias differently) the preconditioned gradients must agree to round-off, in float64.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from kfac_oracles import D, make_kfac
from torch import nn

asdl_precondition = pytest.importorskip("asdl.precondition")


class BiasFreeLeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5, bias=False)
        self.conv2 = nn.Conv2d(6, 16, 5, bias=False)
        self.fc1 = nn.Linear(400, 120, bias=False)
        self.fc2 = nn.Linear(120, 84, bias=False)
        self.fc3 = nn.Linear(84, 10, bias=False)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc3(F.relu(self.fc2(x)))


def _asdl_gradients(model, x, y, damping):
    # ASDL brackets its phases with NVTX ranges, which need a CUDA build: no-ops here.
    nvtx = torch.cuda.nvtx
    saved = nvtx.range_push, nvtx.range_pop
    nvtx.range_push, nvtx.range_pop = (lambda *a, **k: None), (lambda *a, **k: None)
    try:
        config = asdl_precondition.PreconditioningConfig(
            data_size=x.shape[0],
            damping=damping,
            ema_decay=1.0,  # ASDL weighs the new value: keep exactly this batch's factors
            curvature_upd_interval=1,
            preconditioner_upd_interval=1,
        )
        maker = asdl_precondition.KfacGradientMaker(model, config, fisher_type="fisher_emp")
        model.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # ASDL's non-full backward hooks
            dummy = maker.setup_model_call(model, x)
            maker.setup_loss_call(F.cross_entropy, dummy, y)
            maker.forward_and_backward()
    finally:
        nvtx.range_push, nvtx.range_pop = saved
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("damping", [1e-2, 1e-4])
def test_pi_split_inverse_equals_asdl(damping):
    torch.manual_seed(0)
    ours, theirs = BiasFreeLeNet5().to(D), BiasFreeLeNet5().to(D)
    theirs.load_state_dict(ours.state_dict())
    x, y = torch.randn(16, 3, 32, 32, dtype=D), torch.randint(0, 10, (16,))
    kfac = make_kfac(ours, damping=damping, inverse_method="inverse", pi_damping=True)
    ours.zero_grad()
    F.cross_entropy(ours(x), y).backward()
    raw = [p.grad.clone() for p in ours.parameters()]
    kfac.step(lr=0.1)
    expected = _asdl_gradients(theirs, x, y, damping)
    for (name, p), r, e in zip(ours.named_parameters(), raw, expected):
        assert not torch.allclose(e, r), f"{name}: ASDL left the gradient unchanged"
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-14, msg=name)
