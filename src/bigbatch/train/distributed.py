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


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The torch device runtime.device names; "auto" and a bare "cuda" mean cuda:LOCAL_RANK for
    a rank of a torchrun job."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainingError(
            f"runtime.device '{name}' is not a torch device; use auto, cpu or cuda"
        ) from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise TrainingError(
            f"runtime.device is '{name}' but this torch has no CUDA device "
            f'(torch {torch.__version__}); use runtime.device="auto" or "cpu", or install a '
            "CUDA build of torch"
        )
    if device.index is None:
        device = torch.device("cuda", local_rank or 0)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise TrainingError(
            f"runtime.device resolves to '{device}' but only {torch.cuda.device_count()} CUDA "
            "device(s) are visible; use cuda:0 .. cuda:N-1 or auto"
        )
    return device


class ParallelContext:
    """A single process: rank 0 of 1. Subclasses communicate."""

    rank = 0
    world_size = 1

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.communication_time = 0.0
        self.bytes_communicated = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def reduce_step(
        self, model: nn.Module, local_count: int, extras: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Average gradients over the global batch; return ``extras`` (scalar tensors) summed over
        ranks, still on the device."""
        return extras

    def all_sum(self, values: list[float]) -> list[float]:
        return values

    def broadcast_parameters(self, model: nn.Module) -> None:
        pass

    def average_buffers(self, model: nn.Module) -> None:
        """BatchNorm running statistics: the mean over ranks (each saw only its shard)."""

    def share(self, data: bytes | None) -> bytes | None:
        """Rank 0's ``data`` on every rank (the others pass None): ranks need no shared disk."""
        return data

    def check_same(self, digest: int, what: str) -> None:
        """Refuse to start unless every rank passes the same ``digest``."""

    def agree(self, error: str | None) -> None:
        """Rank 0's error (if any) raised on every other rank, so that none waits for a failed
        rank 0; rank 0 raises its own."""


class DistributedContext(ParallelContext):
    def __init__(self, timeout_s: float, device: torch.device):
        super().__init__(device)
        self.timeout_s = timeout_s
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def _all_reduce(self, tensor: torch.Tensor, what: str) -> None:
        start = time.perf_counter()
        run_collective(what, self.rank, self.timeout_s, dist.all_reduce, tensor)
        self.communication_time += time.perf_counter() - start
        self.bytes_communicated += tensor.numel() * tensor.element_size()

    def reduce_step(
        self, model: nn.Module, local_count: int, extras: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        grads_of = [p.grad for p in model.parameters() if p.grad is not None]
        grads = [g.reshape(-1) * local_count for g in grads_of]  # local mean -> local sum
        dtype = grads[0].dtype if grads else torch.float64
        count = torch.full((1,), float(local_count), dtype=dtype, device=self.device)
        tail = [e.to(self.device, dtype).reshape(1) for e in extras]
        flat = torch.cat([*grads, *tail, count])
        self._all_reduce(flat, "gradient all-reduce")
        total = flat[-1]
        offset = 0
        for g in grads_of:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g) / total)
            offset += n
        return list(flat[offset:-1].unbind())

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self._all_reduce(t, "metric all-reduce")
        return [float(v) for v in t]

    def broadcast_parameters(self, model: nn.Module) -> None:
        for tensor in [*model.parameters(), *model.buffers()]:
            run_collective(
                "parameter broadcast", self.rank, self.timeout_s, dist.broadcast, tensor.data, src=0
            )

    def average_buffers(self, model: nn.Module) -> None:
        buffers = [b for b in model.buffers() if b.is_floating_point()]
        if not buffers:
            return
        flat = torch.cat([b.reshape(-1) for b in buffers])
        self._all_reduce(flat, "BatchNorm statistics all-reduce")
        flat /= self.world_size
        offset = 0
        for b in buffers:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()

    def share(self, data: bytes | None) -> bytes | None:
        size = torch.tensor([-1 if data is None else len(data)], dtype=torch.int64)
        size = size.to(self.device)
        run_collective("broadcast from rank 0", self.rank, self.timeout_s, dist.broadcast, size, 0)
        n = int(size)
        if n < 0:
            return None
        payload = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if self.rank == 0 and data
            else torch.empty(n, dtype=torch.uint8)
        ).to(self.device)
        if n:
            run_collective(
                "broadcast from rank 0", self.rank, self.timeout_s, dist.broadcast, payload, 0
            )
        return payload.cpu().numpy().tobytes()

    def check_same(self, digest: int, what: str) -> None:
        # max(d) and max(-d) over ranks: every rank has the same d iff both give it back.
        t = torch.tensor([digest, -digest], dtype=torch.int64, device=self.device)
        run_collective(
            "config check",
            self.rank,
            self.timeout_s,
            lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX),
        )
        if int(t[0]) != digest or -int(t[1]) != digest:
            raise TrainingError(
                f"the ranks of this job were started with different {what}; start every rank "
                "with the same config file and --set values (rank "
                f"{self.rank} has fingerprint {digest:x})"
            )

    def agree(self, error: str | None) -> None:
        shared = self.share(error.encode() if error is not None else b"")
        if shared and self.rank != 0:
            raise TrainingError(f"rank 0: {shared.decode()}")


def launched_with_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_parallel(timeout_s: float = 300.0, device_name: str = "auto") -> ParallelContext:
    """A DistributedContext under torchrun, else a single-process context; the backend follows
    the device (nccl for CUDA, gloo for the CPU), each rank on cuda:LOCAL_RANK."""
    if not launched_with_torchrun():
        return ParallelContext(resolve_device(device_name))
    device = resolve_device(device_name, int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(
                backend,
                timeout=timedelta(seconds=timeout_s),
                device_id=device if backend == "nccl" else None,
            )
        except (RuntimeError, dist.DistError, ValueError) as exc:
            raise TrainingError(
                f"could not join the process group ({exc}); check MASTER_ADDR/MASTER_PORT and that "
                "every rank started"
            ) from None
    return DistributedContext(timeout_s, device)


def shutdown_parallel() -> None:
    if dist.is_initialized():
        try:
            # No rank tears down the store (rank 0 hosts it) while another still uses it.
            dist.barrier()
        except (RuntimeError, dist.DistError):
            pass  # a peer died: nothing to wait for
        dist.destroy_process_group()
