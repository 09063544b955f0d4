"""Synchronous data parallelism on torch.distributed.

Each rank holds a disjoint shard of every global batch (see data/batches.py) and computes the mean
loss over its shard. ``reduce_step`` then turns the per-rank gradients into the gradient of the mean
over the whole global batch with ONE all-reduce of a flat buffer that also carries the step's loss
and hit counts, so every rank sees the same global loss and agrees on stopping for a non-finite one.

Why our own all-reduce rather than DistributedDataParallel: gradients are accumulated over several
micro-batches per step, shards can be unequal (the last batch of an epoch), and K-FAC needs the
reduced gradients at a known point between backward and its own step. One flat all-reduce after the
last micro-batch is exact for all three, is what DDP does for a model of this size anyway (one
bucket), and lets us time communication on its own.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from bigbatch.collectives import run_collective
from bigbatch.errors import TrainingError


class ParallelContext:
    """A single process: rank 0 of 1. Subclasses communicate."""

    rank = 0
    world_size = 1

    def __init__(self) -> None:
        self.communication_time = 0.0
        self.bytes_communicated = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def reduce_step(self, model: nn.Module, local_count: int, extras: list[float]) -> list[float]:
        """Average gradients over the global batch; return ``extras`` summed over ranks."""
        return extras

    def all_sum(self, values: list[float]) -> list[float]:
        return values

    def broadcast_parameters(self, model: nn.Module) -> None:
        pass


class DistributedContext(ParallelContext):
    def __init__(self, timeout_s: float):
        super().__init__()
        self.timeout_s = timeout_s
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )

    def _all_reduce(self, tensor: torch.Tensor, what: str) -> None:
        start = time.perf_counter()
        run_collective(what, self.rank, self.timeout_s, dist.all_reduce, tensor)
        self.communication_time += time.perf_counter() - start
        self.bytes_communicated += tensor.numel() * tensor.element_size()

    def reduce_step(self, model: nn.Module, local_count: int, extras: list[float]) -> list[float]:
        grads_of = [p.grad for p in model.parameters() if p.grad is not None]
        grads = [g.reshape(-1) * local_count for g in grads_of]  # local mean -> local sum
        tail = torch.tensor(
            [*extras, float(local_count)],
            dtype=grads[0].dtype if grads else torch.float64,
            device=self.device,
        )
        flat = torch.cat([*grads, tail.to(self.device)])
        self._all_reduce(flat, "gradient all-reduce")
        total = flat[-1]
        offset = 0
        for g in grads_of:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g) / total)
            offset += n
        return [float(v) for v in flat[offset:-1]]

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self._all_reduce(t, "metric all-reduce")
        return [float(v) for v in t]

    def broadcast_parameters(self, model: nn.Module) -> None:
        for tensor in [*model.parameters(), *model.buffers()]:
            run_collective(
                "parameter broadcast", self.rank, self.timeout_s, dist.broadcast, tensor.data, src=0
            )


def launched_with_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_parallel(timeout_s: float = 300.0) -> ParallelContext:
    """A DistributedContext under torchrun (gloo on CPU, nccl on GPU), else a single-process
    context."""
    if not launched_with_torchrun():
        return ParallelContext()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, dist.DistError, ValueError) as exc:
            raise TrainingError(
                f"could not join the process group ({exc}); check MASTER_ADDR/MASTER_PORT and that "
                "every rank started"
            ) from None
    return DistributedContext(timeout_s)


def shutdown_parallel() -> None:
    if dist.is_initialized():
        try:
            # No rank tears down the store (rank 0 hosts it) while another still uses it.
            dist.barrier()
        except (RuntimeError, dist.DistError):
            pass  # a peer died: nothing to wait for
        dist.destroy_process_group()
