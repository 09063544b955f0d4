import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bigbatch.analysis.hessian import (
    hessian_vector_product,
    hutchinson_trace,
    lanczos_top_eigenvalues,
    power_iteration_top_eigenvalue,
)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(40, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    data = [(x[:25], y[:25]), (x[25:], y[25:])]  # two unequal batches: the mean must weight them
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss_of(flat):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[i : i + s.numel()].view(s)
            i += s.numel()
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    dense = torch.autograd.functional.hessian(loss_of, flat0)
    return model, (lambda: data), dense


def _split(model, flat):
    out, i = [], 0
    for p in model.parameters():
        out.append(flat[i : i + p.numel()].view_as(p))
        i += p.numel()
    return out


def test_hvp_matches_dense_hessian(tiny):
    model, batches, dense = tiny
    v = torch.randn(dense.shape[0], dtype=torch.float64)
    hv = torch.cat([h.flatten() for h in hessian_vector_product(model, batches, _split(model, v))])
    torch.testing.assert_close(hv, dense @ v, rtol=1e-10, atol=1e-12)


def test_top_eigenvalues_match_dense(tiny):
    model, batches, dense = tiny
    exact = torch.linalg.eigvalsh(dense).flip(0)
    top = lanczos_top_eigenvalues(model, batches, k=3, steps=dense.shape[0])
    torch.testing.assert_close(
        torch.tensor(top, dtype=torch.float64), exact[:3], rtol=1e-6, atol=1e-9
    )
    # Few steps still pin the top eigenvalue closely.
    assert lanczos_top_eigenvalues(model, batches, k=1, steps=15)[0] == pytest.approx(
        float(exact[0]), rel=1e-4
    )
    dominant = exact[exact.abs().argmax()]
    assert power_iteration_top_eigenvalue(model, batches, iters=2000, tol=1e-10) == pytest.approx(
        float(dominant), rel=1e-4
    )


def test_hutchinson_converges_within_its_error(tiny):
    model, batches, dense = tiny
    exact = float(torch.trace(dense))
    estimate, stderr = hutchinson_trace(model, batches, samples=400, seed=1)
    assert stderr > 0
    assert abs(estimate - exact) < 4 * stderr
    small, small_err = hutchinson_trace(model, batches, samples=25, seed=1)
    assert small_err > stderr  # error shrinks with samples
