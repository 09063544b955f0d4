"""Shared K-FAC test helpers: a one-batch preconditioner, a stepping loop, a small float64 MLP and
the brute-force per-example gradients the factors are checked against.

Imported by the tests in this folder as ``from kfac_oracles import ...`` (pytest's prepend import
mode puts the folder on sys.path).
"""

import torch
import torch.nn.functional as F
from torch import nn

from bigbatch.optim.kfac import KFACPreconditioner

D = torch.float64


def make_kfac(model, **kw):
    """A preconditioner that keeps exactly one batch's factors and solves them every step."""
    defaults = dict(
        damping=1e-12,
        factor_decay=0.0,
        factor_interval=1,
        inverse_interval=1,
        kl_clip=0.0,
        factor_dtype=D,
    )
    defaults.update(kw)
    return KFACPreconditioner(model, **defaults)


def per_example_grads(model, layer, x, y, out_grad_of):
    """Brute force: for each example, d(loss_n)/d[W|b] flattened row-major, and d(loss_n)/d(layer
    output)."""
    flat, gs = [], []
    for n in range(x.shape[0]):
        model.zero_grad()
        captured = {}
        h = layer.register_forward_hook(lambda m, i, o, seen=captured: seen.setdefault("out", o))
        logits = model(x[n : n + 1])
        h.remove()
        out = captured["out"]
        loss = F.cross_entropy(logits, y[n : n + 1])
        gw, gb, go = torch.autograd.grad(loss, [layer.weight, layer.bias, out])
        flat.append(torch.cat([gw.reshape(gw.shape[0], -1), gb.reshape(-1, 1)], 1).flatten())
        gs.append(out_grad_of(go[0]))
    return torch.stack(flat), gs


def step_once(model, kfac, x, y, micro=None):
    """One cross-entropy step over ``micro``-sized slices (default: the whole batch)."""
    model.zero_grad()
    n = x.shape[0]
    micro = micro or n
    for s in range(0, n, micro):
        logits = model(x[s : s + micro])
        kfac.accumulate_mc_fisher(logits)
        (F.cross_entropy(logits, y[s : s + micro]) * (min(micro, n - s) / n)).backward()
    kfac.step(lr=0.1)


def linear_model():
    """Linear(5, 4) -> tanh -> Linear(4, 3), seeded, in float64."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(D)
