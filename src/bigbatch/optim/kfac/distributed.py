"""K-FAC over torch.distributed: factors all-reduced, decompositions and preconditioning sharded.

On a statistics step every rank holds factor SUMS over its own examples (layers.py); one all-reduce
of a flat buffer turns them into sums over the global batch (optionally sending only each square
factor's upper triangle: about half the bytes). Each layer has an owner, chosen greedily to balance
the decomposition cost, that decomposes it on inverse steps.

Preconditioning is sharded as in KAISA (Pauloski et al., SC'21) by ``grad_worker_fraction``: the
ranks split into groups of fraction * world consecutive ranks; a layer's decomposition is broadcast
from its owner to the owner's group, whose members (the layer's gradient workers) each solve the
layer; every other rank receives the solution from the gradient worker at its own position in the
group. Fraction 1 (one group, COMM-OPT) is every rank holding every decomposition; 1/world (MEM-OPT)
is the owner alone holding and solving a layer and broadcasting its solution to all; in between
(HYBRID) trades memory against broadcasts. With the empirical Fisher and stats_fraction = 1 every
fraction gives the result of single-process K-FAC on the same global batch (tests check this).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from bigbatch.collectives import run_collective
from bigbatch.optim.kfac.preconditioner import KFACPreconditioner
from bigbatch.optim.kfac.state import LayerState
from bigbatch.optim.kfac.statistics import BatchStatistics, BlockState


def assign_by_cost(
    costs: dict[str, float], world_size: int, group_size: int | None = None
) -> dict[str, int]:
    """Longest-processing-time-first: each layer, most expensive first, goes to the least loaded
    group of ``group_size`` consecutive ranks (default: one group of all), and there to its least
    loaded rank, so that layers, and with them memory and preconditioning, spread over the groups
    before they fill any one."""
    size = group_size or world_size
    group_load, rank_load = [0.0] * (world_size // size), [0.0] * world_size
    owner = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        group = min(range(len(group_load)), key=lambda g: (group_load[g], g))
        ranks = range(group * size, (group + 1) * size)
        rank = min(ranks, key=lambda r: (rank_load[r], r))
        owner[name] = rank
        group_load[group] += costs[name]
        rank_load[rank] += costs[name]
    return owner


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class DistributedKFACPreconditioner(KFACPreconditioner):
    def __init__(self, *args: Any, timeout_s: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.upper_triangle = self.options.upper_triangle
        self.timeout_s = timeout_s  # the process group's, for the error message only
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.workers = self.options.grad_workers(self.world_size, section="")
        costs = {name: s.cost() for name, s in self.layers.items()}
        self.owner = assign_by_cost(costs, self.world_size, self.workers)
        self.position = self.rank % self.workers  # this rank's place in its group
        # Every rank must create every group, in the same order, even those it is not in.
        groups = [list(range(s, s + self.workers)) for s in range(0, self.world_size, self.workers)]
        receivers = [list(range(p, self.world_size, self.workers)) for p in range(self.workers)]
        self._worker_groups = [self._group(ranks) for ranks in groups]
        self._receiver_group = [self._group(ranks) for ranks in receivers][self.position]
        # Layers some rank holds a decomposition of: those are preconditioned on every rank.
        self.solvable: set[str] = set()
        self.bytes_sent = {"factor": 0, "decomposition": 0, "gradient": 0}

    def _group(self, ranks: list[int]) -> Any:
        """A process group of ``ranks``: None for all of them (the default group), "alone" for
        one rank (nothing to send)."""
        if len(ranks) == self.world_size:
            return None
        return dist.new_group(ranks) if len(ranks) > 1 else "alone"

    def group_of(self, name: str) -> int:
        """The index of the group that holds layer ``name``'s decomposition and solves it."""
        return self.owner[name] // self.workers

    def is_worker(self, name: str) -> bool:
        return self.group_of(name) == self.rank // self.workers

    def _collective(self, what: str, op: Any, *args: Any, **kwargs: Any) -> None:
        run_collective(what, self.rank, self.timeout_s, op, *args, **kwargs)

    # -- bookkeeping -----------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        held = _nbytes(t for s in self.layers.values() for t in s.decomposition or ())
        return {
            **super().metrics(),
            "kfac_factor_bytes": self.bytes_sent["factor"],
            "kfac_decomposition_bytes": self.bytes_sent["decomposition"],
            "kfac_gradient_bytes": self.bytes_sent["gradient"],
            "kfac_held_decomposition_bytes": held,
        }

    def reset_metrics(self) -> None:
        super().reset_metrics()
        self.bytes_sent = dict.fromkeys(self.bytes_sent, 0)

    def needs_decomposition(self, state: BlockState) -> bool:
        return state.has_factors and state.factors.name not in self.solvable

    # -- factors -------------------------------------------------------------------------------
    def _pack(self, m: torch.Tensor) -> torch.Tensor:
        if not self.upper_triangle or m.dim() != 2 or m.shape[0] != m.shape[1]:
            return m.reshape(-1)
        i, j = torch.triu_indices(m.shape[0], m.shape[1], device=m.device)
        return m[i, j]

    def _unpack(self, flat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if not self.upper_triangle or len(shape) != 2 or shape[0] != shape[1]:
            return flat.view(shape)
        out = flat.new_empty(shape)
        i, j = torch.triu_indices(shape[0], shape[1], device=flat.device)
        out[i, j] = flat
        out[j, i] = flat
        return out

    def _packed_size(self, shape: tuple[int, ...]) -> int:
        square = self.upper_triangle and len(shape) == 2 and shape[0] == shape[1]
        return shape[0] * (shape[0] + 1) // 2 if square else int(torch.Size(shape).numel())

    def reduce_factors(self, batch: BatchStatistics) -> None:
        with self.times.measure("communication", self.device):
            # On the process group's device, as the all-reduce needs.
            like: dict[str, Any] = {"dtype": self.factor_dtype, "device": self.device}
            # Every rank sends the same layout; a layer without statistics here sends zeros and a
            # count of 0.
            parts = []
            for name, state in self.layers.items():
                sums, count = batch.get(name, ({}, 0.0))
                for key, shape in state.statistic_shapes().items():
                    t = sums.get(key)
                    parts.append(
                        self._pack(t)
                        if t is not None
                        else torch.zeros(self._packed_size(shape), **like)
                    )
                parts.append(torch.as_tensor([float(count)], **like))
            flat = torch.cat(parts)
            self._collective("K-FAC factor all-reduce", dist.all_reduce, flat)
            self.bytes_sent["factor"] += _nbytes([flat])
            offset = 0
            for name, state in self.layers.items():
                sums = {}
                for key, shape in state.statistic_shapes().items():
                    size = self._packed_size(shape)
                    sums[key] = self._unpack(flat[offset : offset + size], shape)
                    offset += size
                # The count stays on the device: a layer no rank saw is left out there.
                batch[name] = (sums, flat[offset])
                offset += 1

    # -- decompositions ------------------------------------------------------------------------
    def compute_decompositions(self, states: list[BlockState]) -> None:
        with self.times.measure("eigendecomposition", self.device):
            for state in states:
                if self.owner[state.factors.name] == self.rank:
                    self.decompose(state)
        with self.times.measure("communication", self.device):
            # Which layers have a decomposition to share (an owner's eigh may have failed).
            ready = torch.tensor(
                [
                    float(s.decomposition is not None and self.owner[s.factors.name] == self.rank)
                    for s in states
                ],
                device=self.device,
            )
            self._collective("K-FAC decomposition check", dist.all_reduce, ready)
            rule = self.damping_rule
            for state, ok in zip(states, ready.tolist()):
                name = state.factors.name
                if not ok:
                    continue
                self.solvable.add(name)
                group, src = self._worker_groups[self.group_of(name)], self.owner[name]
                if not self.is_worker(name) or group == "alone":
                    continue
                if self.rank != src:
                    like = {"dtype": self.factor_dtype, "device": self.device}
                    state.decomposition = state.decomposition_like(rule, **like)
                assert state.decomposition is not None
                for tensor in state.decomposition:
                    self._collective(
                        "K-FAC decomposition broadcast", dist.broadcast, tensor, src, group
                    )
                if self.rank == src:
                    self.bytes_sent["decomposition"] += _nbytes(state.decomposition)
                else:
                    state.refresh(rule)  # the owner derived its own in decompose()

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any] | None:
        """Collective: rank 0 receives each decomposition it does not hold from the layer's owner
        and returns the whole state (every rank loads it on resume, so a resumed run equals an
        uninterrupted one in every mode); the others return None."""
        rule, like = self.damping_rule, {"dtype": self.factor_dtype, "device": self.device}
        fetched: dict[str, list[torch.Tensor]] = {}
        for name, state in self.layers.items():
            owner = self.owner[name]
            if name not in self.solvable or self.group_of(name) == 0 or self.rank not in (0, owner):
                continue
            tensors = state.decomposition if self.rank == owner else None
            tensors = tensors or state.decomposition_like(rule, **like)
            for tensor in tensors:
                op, peer = (dist.send, 0) if self.rank == owner else (dist.recv, owner)
                self._collective("K-FAC checkpoint gather", op, tensor, peer)
            if self.rank == 0:
                fetched[name] = [t.clone() for t in tensors]
        if self.rank != 0:
            return None
        out = self.state_dict()
        for name, received in fetched.items():
            out["layers"][name]["decomposition"] = received
        out["solvable"] = sorted(self.solvable)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Every rank loads rank 0's state, then keeps only its own group's decompositions."""
        super().load_state_dict(state)
        names = (n for n, s in state["layers"].items() if s["decomposition"] is not None)
        self.solvable = set(state.get("solvable", names))
        for name, layer in self.layers.items():
            if not self.is_worker(name):
                layer.decomposition = None
                if isinstance(layer, LayerState):
                    layer.scale = None

    # -- preconditioning -----------------------------------------------------------------------
    def solutions(self) -> list[tuple[BlockState, torch.Tensor, torch.Tensor]]:
        """Each rank solves the layers of its group and receives the others' solutions from the
        rank at its own position in their group: one broadcast per other group."""
        rule = self.damping_rule
        work = [
            (s, s.factors.grad_matrix())
            for s in self.layers.values()
            if s.factors.name in self.solvable and s.factors.has_grad()
        ]
        solved: dict[str, torch.Tensor] = {}
        for state, v in work:
            if self.is_worker(state.factors.name):
                x = state.solve(v.to(self.factor_dtype), rule).to(v.dtype)
                solved[state.factors.name] = x
        if self.workers < self.world_size:
            with self.times.measure("communication", self.device):
                for group in range(self.world_size // self.workers):
                    self._share_solutions(group, work, solved)
        return [(s, v, solved[s.factors.name]) for s, v in work]

    def _share_solutions(
        self,
        group: int,
        work: list[tuple[BlockState, torch.Tensor]],
        solved: dict[str, torch.Tensor],
    ) -> None:
        """Broadcast group ``group``'s solutions from its rank at this rank's position."""
        layers = [(s, v) for s, v in work if self.group_of(s.factors.name) == group]
        if not layers:
            return
        src = group * self.workers + self.position
        if self.rank == src:
            flat = torch.cat([solved[s.factors.name].reshape(-1) for s, _ in layers])
            self.bytes_sent["gradient"] += _nbytes([flat])
        else:
            size = sum(v.numel() for _, v in layers)
            flat = torch.empty(size, dtype=layers[0][1].dtype, device=self.device)
        self._collective(
            "K-FAC preconditioned-gradient broadcast",
            dist.broadcast,
            flat,
            src,
            self._receiver_group,
        )
        if self.rank != src:
            for (state, v), x in zip(layers, flat.split([v.numel() for _, v in layers])):
                solved[state.factors.name] = x.view_as(v)
