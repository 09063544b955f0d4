"""Distributed K-FAC with preconditioning sharded over ranks (KAISA's grad_worker_fraction,
optim/kfac/distributed.py) on real gloo process groups: every fraction gives the parameters of one
process on the same global batch, BatchNorm blocks included, memory per rank falls as stated, and
a run resumed from rank 0's checkpoint equals an uninterrupted one."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from bigbatch.config import KFACConfig
from bigbatch.errors import ConfigError
from bigbatch.optim.kfac import KFACPreconditioner

D = torch.float64
GLOBAL_BATCH = 16
STEPS = 4
OPTIONS = dict(
    damping=1e-3,
    factor_decay=0.9,
    factor_interval=1,
    inverse_interval=2,
    kl_clip=1e-2,
    factor_dtype=D,
)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 8),
        nn.Tanh(),
        nn.Linear(8, 5),
    ).to(D)


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 3, 6, 6, dtype=D, generator=g)
    return x, torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)


def _train(model, kfac, shard, steps=range(STEPS), optimizer=None):
    """SGD + K-FAC over ``steps``; ``shard(x, y)`` yields (x, y, weight) pieces whose weighted
    mean losses make up the step's loss."""
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in steps:
        optimizer.zero_grad()
        for x, y, weight in shard(*_batch(step)):
            (F.cross_entropy(model(x), y) * weight).backward()
        if dist.is_initialized():
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        kfac.step(lr=0.1)
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank, world, store, fractions, out):
    from bigbatch.optim.kfac.distributed import DistributedKFACPreconditioner

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    local = GLOBAL_BATCH // world
    results = {}
    for fraction in fractions:
        model = _model()
        kfac = DistributedKFACPreconditioner(model, grad_worker_fraction=fraction, **OPTIONS)
        params = _train(
            model,
            kfac,
            lambda x, y: [(x[rank * local : (rank + 1) * local], y[rank * local :][:local], 1.0)],
        )
        results[fraction] = (params, kfac.metrics(), _resumed(rank, world, local, fraction, out))
    torch.save(results, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def _resumed(rank, world, local, fraction, out):
    """Steps 0-3, a checkpoint (rank 0's, as the trainer writes it), a fresh start on every rank
    from it, steps 4-5: the decompositions of step 3 must come back (the next is at step 6)."""
    from bigbatch.optim.kfac.distributed import DistributedKFACPreconditioner

    def shard(x, y):
        return [(x[rank * local : (rank + 1) * local], y[rank * local :][:local], 1.0)]

    options = {**OPTIONS, "inverse_interval": 3}
    model = _model()
    kfac = DistributedKFACPreconditioner(model, grad_worker_fraction=fraction, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, kfac, shard, range(4), optimizer)
    saved = kfac.checkpoint_state()
    path = f"{out}/checkpoint-{fraction}.pt"
    if rank == 0:
        torch.save((saved, model.state_dict(), optimizer.state_dict()), path)
    dist.barrier()
    kfac_state, weights, momentum = torch.load(path)
    model = _model()
    model.load_state_dict(weights)
    kfac = DistributedKFACPreconditioner(model, grad_worker_fraction=fraction, **options)
    kfac.load_state_dict(kfac_state)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer.load_state_dict(momentum)
    resumed = _train(model, kfac, shard, range(4, 6), optimizer)
    straight_model = _model()
    straight = DistributedKFACPreconditioner(
        straight_model, grad_worker_fraction=fraction, **options
    )
    return resumed, _train(straight_model, straight, shard, range(6))


def _one_process(world):
    """One process on the same global batch: each rank's slice a micro-batch of its own (so
    BatchNorm normalizes the same examples together), weighted by its share."""
    model = _model()
    kfac = KFACPreconditioner(model, **OPTIONS)
    local = GLOBAL_BATCH // world

    def pieces(x, y):
        return [(x[s : s + local], y[s : s + local], 1 / world) for s in range(0, len(x), local)]

    params = _train(model, kfac, pieces)
    held = sum(t.numel() * t.element_size() for s in kfac.layers.values() for t in s.decomposition)
    return params, held


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("world, fractions", [(2, [1.0, 0.5]), (4, [1.0, 0.5, 0.25])])
def test_every_fraction_gives_the_parameters_of_one_process(tmp_path, world, fractions):
    mp.spawn(_worker, args=(world, tmp_path / "store", fractions, tmp_path), nprocs=world)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    expected, total_held = _one_process(world)
    for fraction in fractions:
        for rank in range(world):
            params, _, (resumed, straight) = ranks[rank][fraction]
            for got, want in zip(params, expected):
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
            for got, want in zip(resumed, straight):  # resume equals uninterrupted, every mode
                assert torch.equal(got, want)
        held = [ranks[r][fraction][1]["kfac_held_decomposition_bytes"] for r in range(world)]
        sent = sum(ranks[r][fraction][1]["kfac_gradient_bytes"] for r in range(world))
        # Each layer's decomposition lives on its fraction * world gradient workers only.
        assert sum(held) == round(fraction * world) * total_held
        if fraction < 1:
            assert max(held) < total_held and sent > 0
        else:
            assert held == [total_held] * world and sent == 0


def test_a_fraction_that_does_not_split_the_ranks_is_refused():
    with pytest.raises(ConfigError, match=r"grad_worker_fraction.*1/4, 2/4, 4/4"):
        KFACConfig(grad_worker_fraction=0.3).grad_workers(4)
    with pytest.raises(ConfigError, match="grad_worker_fraction"):
        KFACConfig(grad_worker_fraction=1 / 3).grad_workers(4)
    assert KFACConfig(grad_worker_fraction=1 / 3).grad_workers(6) == 2


def _adaptive_run(model, kfac, pieces, x_of, all_sum):
    """4 steps with Levenberg-Marquardt damping after each: (parameters, (damping, rho) per
    step)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    dampings = []
    for step in range(4):
        x, y = _batch(step)
        optimizer.zero_grad()
        for xs, ys, weight in pieces(x, y):
            (F.cross_entropy(model(xs), ys) * weight).backward()
        if dist.is_initialized():
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        before = kfac.adaptive.capture(model)
        kfac.step(lr=0.005)
        optimizer.step()
        xs, ys = x_of(x, y)
        local = GLOBAL_BATCH // 2

        def loss_of_rows(z, start, size, ys=ys):
            return F.cross_entropy(z, ys[start : start + size])

        kfac.adapt_damping(model, xs, loss_of_rows, before, 0.0, local, all_sum)
        dampings.append((kfac.damping, kfac.adaptive.ratios[-1]))
    return [p.detach().clone() for p in model.parameters()], dampings


def _adaptive_worker(rank, world, store, out):
    from bigbatch.optim.kfac.distributed import DistributedKFACPreconditioner

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    local = GLOBAL_BATCH // world

    def all_sum(values):
        t = torch.tensor(values, dtype=D)
        dist.all_reduce(t)
        return t.tolist()

    def mine(x, y):
        return x[rank * local : (rank + 1) * local], y[rank * local : (rank + 1) * local]

    model = _model()
    kfac = DistributedKFACPreconditioner(
        model, adaptive_damping=True, adaptive_interval=1, **OPTIONS
    )
    result = _adaptive_run(model, kfac, lambda x, y: [(*mine(x, y), 1.0)], mine, all_sum)
    torch.save(result, f"{out}/adaptive-{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.slow
def test_adaptive_damping_on_two_ranks_equals_one_process(tmp_path):
    # rho from the ranks' loss and curvature sums over the global batch: the same damping moves.
    mp.spawn(_adaptive_worker, args=(2, tmp_path / "store", tmp_path), nprocs=2)
    model = _model()
    kfac = KFACPreconditioner(model, adaptive_damping=True, adaptive_interval=1, **OPTIONS)
    local = GLOBAL_BATCH // 2

    def halves(x, y):
        return [(x[s : s + local], y[s : s + local], 0.5) for s in (0, local)]

    params, dampings = _adaptive_run(model, kfac, halves, lambda x, y: (x, y), lambda v: v)
    assert len(set(dampings)) > 1  # it moved
    for rank in range(2):
        got_params, got_dampings = torch.load(tmp_path / f"adaptive-{rank}.pt")
        for (got_damping, got_rho), (damping, rho) in zip(got_dampings, dampings):
            assert got_damping == damping and got_rho == pytest.approx(rho, rel=1e-9)
        for got, want in zip(got_params, params):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
