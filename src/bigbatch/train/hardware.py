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


def hardware_name(device: torch.device) -> str:
    """``NVIDIA H200``, or ``AMD EPYC, 1 of 2 cores`` (torch's threads of the usable cores)."""
    return _device_name(device.type, device.index, torch.get_num_threads())
