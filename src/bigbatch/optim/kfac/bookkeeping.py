"""K-FAC's per-part timings and health counters, kept without a host synchronization per step."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


class PartTimes:
    """Seconds spent per part. On CUDA, kernels run asynchronously, so a part's time is the span
    between two recorded events, read when the times are (one synchronization then); elsewhere a
    wall clock around the part."""

    def __init__(self, parts: tuple[str, ...]):
        self.parts = parts
        self._seconds = dict.fromkeys(parts, 0.0)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def measure(self, part: str, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((part, start, end))
            return
        begin = time.perf_counter()
        yield
        self._seconds[part] += time.perf_counter() - begin

    def read(self) -> dict[str, float]:
        for part, start, end in self._events:
            end.synchronize()
            self._seconds[part] += start.elapsed_time(end) / 1000.0
        self._events.clear()
        return dict(self._seconds)

    def reset(self) -> None:
        self._seconds = dict.fromkeys(self.parts, 0.0)
        self._events.clear()


# Per-step fault masks held before they are summed into a count (bounded memory, few operations).
FOLD_EVERY = 256


class HealthCounters:
    """Cumulative counts of the run's faults. Those found on the device (non-finite statistics
    or updates) are added as device tensors and read only when the counters are."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self._host = dict.fromkeys(names, 0)
        self._device: dict[str, torch.Tensor] = {}
        self._pending: dict[str, list[torch.Tensor]] = {}

    def add(self, name: str, n: int | torch.Tensor) -> None:
        if isinstance(n, torch.Tensor):
            held = self._device.get(name)
            n = n.to(torch.int64)
            self._device[name] = n.clone() if held is None else held.add_(n.to(held.device))
        else:
            self._host[name] += n

    def add_failures(self, name: str, ok: torch.Tensor) -> None:
        """Count the False entries of the device mask ``ok`` when the counters are read (the
        masks are kept until then, folded into one count every FOLD_EVERY of them)."""
        pending = self._pending.setdefault(name, [])
        pending.append(ok)
        if len(pending) >= FOLD_EVERY:
            self._fold(name)

    def _fold(self, name: str) -> None:
        pending = self._pending.pop(name, [])
        if pending:
            self.add(name, torch.cat([m.reshape(-1) for m in pending]).logical_not().sum())

    def read(self) -> dict[str, int]:
        for name in list(self._pending):
            self._fold(name)
        out = dict(self._host)
        for name, count in self._device.items():
            out[name] += int(count)
        return out

    def load(self, saved: dict[str, int]) -> None:
        self._host = dict.fromkeys(self.names, 0)
        self._host.update({k: int(v) for k, v in saved.items() if k in self._host})
        self._device.clear()
        self._pending.clear()
