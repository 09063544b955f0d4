"""The name of the hardware a run trains on, recorded in each metrics row so that a report can
tell when the times it compares were measured on different machines (a run may be resumed on
another one)."""

from __future__ import annotations

import functools
import os
import platform

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def usable_cores() -> int:
    # A container or taskset can leave this process fewer cores than the host has.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@functools.cache
def _device_name(device_type: str, index: int | None, threads: int) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name(index)
    if device_type == "cpu":
        return f"{cpu_model()}, {threads} of {usable_cores()} cores"
    return device_type


def hardware_name(device: torch.device, world_size: int = 1) -> str:
    """``NVIDIA H200``, ``AMD EPYC, 1 of 2 cores`` (torch's threads of the usable cores), or
    ``8 x NVIDIA H200`` for a run over 8 processes (the main rank's device)."""
    name = _device_name(device.type, device.index, torch.get_num_threads())
    return f"{world_size} x {name}" if world_size > 1 else name
