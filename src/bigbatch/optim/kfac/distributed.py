"""K-FAC over torch.distributed: factor sums all-reduced, eigendecompositions spread over ranks.

On a statistics step every rank holds factor SUMS over its own examples (layers.py); one all-reduce
of a flat buffer turns them into sums over the global batch (optionally sending only each factor's
upper triangle: about half the bytes). On an inverse step each layer's eigendecomposition is
assigned to one rank, greedily balancing the cost d_A^3 + d_G^3, and its result is broadcast from
that rank, so no rank decomposes every layer. With the empirical Fisher and stats_fraction = 1 the
result equals single-process K-FAC on the same global batch (tests check this).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from bigbatch.collectives import run_collective
from bigbatch.optim.kfac.preconditioner import KFACPreconditioner, LayerState


def assign_by_cost(costs: dict[str, float], world_size: int) -> dict[str, int]:
    """Longest-processing-time-first: each layer, most expensive first, goes to the least loaded
    rank."""
    load = [0.0] * world_size
    owner = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += costs[name]
    return owner


class DistributedKFACPreconditioner(KFACPreconditioner):
    def __init__(self, *args: Any, timeout_s: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.upper_triangle = self.options.upper_triangle
        self.timeout_s = timeout_s  # the process group's, for the error message only
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.factor_bytes = 0  # sent per rank in factor all-reduces since the last reset_metrics()
        costs = {
            name: float(s.factors.a_dim) ** 3 + float(s.factors.g_dim) ** 3
            for name, s in self.layers.items()
        }
        self.owner = assign_by_cost(costs, self.world_size)

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), "kfac_factor_bytes": self.factor_bytes}

    def reset_metrics(self) -> None:
        super().reset_metrics()
        self.factor_bytes = 0

    def _pack(self, m: torch.Tensor) -> torch.Tensor:
        if not self.upper_triangle:
            return m.reshape(-1)
        i, j = torch.triu_indices(m.shape[0], m.shape[1], device=m.device)
        return m[i, j]

    def _unpack(self, flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if not self.upper_triangle:
            return flat.view_as(like)
        out = torch.empty_like(like)
        i, j = torch.triu_indices(like.shape[0], like.shape[1], device=like.device)
        out[i, j] = flat
        out[j, i] = flat
        return out

    def reduce_factors(self, batch: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        start = time.perf_counter()
        # On the process group's device, as the all-reduce needs.
        like: dict[str, Any] = {"dtype": self.factor_dtype, "device": self.device}
        # Every rank sends the same layout; a layer without statistics here sends zeros and count 0.
        shapes = {n: (s.factors.a_dim, s.factors.g_dim) for n, s in self.layers.items()}
        parts = []
        for name, (a_dim, g_dim) in shapes.items():
            a, g, count = batch.get(
                name,
                (torch.zeros(a_dim, a_dim, **like), torch.zeros(g_dim, g_dim, **like), 0.0),
            )
            parts += [self._pack(a), self._pack(g), a.new_tensor([count])]
        flat = torch.cat(parts)
        run_collective("K-FAC factor all-reduce", self.rank, self.timeout_s, dist.all_reduce, flat)
        self.factor_bytes += flat.numel() * flat.element_size()
        offset = 0
        for name, (a_dim, g_dim) in shapes.items():
            like_a, like_g = torch.empty(a_dim, a_dim, **like), torch.empty(g_dim, g_dim, **like)
            sizes = [self._pack(like_a).numel(), self._pack(like_g).numel(), 1]
            a_flat, g_flat, count = flat[offset : offset + sum(sizes)].split(sizes)
            offset += sum(sizes)
            if float(count) > 0:
                batch[name] = (
                    self._unpack(a_flat, like_a),
                    self._unpack(g_flat, like_g),
                    float(count),
                )
        self.timings["communication"] += time.perf_counter() - start

    def compute_decompositions(self, states: list[LayerState]) -> None:
        start = time.perf_counter()
        mine = [s for s in states if self.owner[s.factors.name] == self.rank]
        for state in mine:
            self.decompose(state)
        self.timings["eigendecomposition"] += time.perf_counter() - start
        start = time.perf_counter()
        # Which layers have a decomposition to share (an owner's eigh may have failed).
        ready = torch.tensor(
            [
                float(s.decomposition is not None and self.owner[s.factors.name] == self.rank)
                for s in states
            ],
            device=self.device,
        )
        run_collective(
            "K-FAC decomposition check", self.rank, self.timeout_s, dist.all_reduce, ready
        )
        for state, ok in zip(states, ready.tolist()):
            if not ok:
                continue
            src = self.owner[state.factors.name]
            if self.rank != src:
                state.decomposition = tuple(
                    torch.empty_like(t) for t in self._decomposition_like(state)
                )
            assert state.decomposition is not None
            for tensor in state.decomposition:
                run_collective(
                    "K-FAC eigenbasis broadcast",
                    self.rank,
                    self.timeout_s,
                    dist.broadcast,
                    tensor,
                    src=src,
                )
            if self.rank != src:
                # The owner set its own in decompose(); A and G agree on all ranks.
                self.set_scale(state)
        self.timings["communication"] += time.perf_counter() - start

    def _decomposition_like(self, state: LayerState) -> tuple[torch.Tensor, ...]:
        a, g = state.factors.a_dim, state.factors.g_dim
        like: dict[str, Any] = {"dtype": self.factor_dtype, "device": self.device}
        if self.inverse_method == "eigen":
            return (
                torch.empty(a, a, **like),
                torch.empty(a, **like),
                torch.empty(g, g, **like),
                torch.empty(g, **like),
            )
        return torch.empty(a, a, **like), torch.empty(g, g, **like)
