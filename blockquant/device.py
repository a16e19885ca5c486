"""Devices and memory: which compute device a run may use, and how much memory it took."""

from __future__ import annotations

import resource
import sys

import torch


def check_device(name: str | torch.device, flag: str = "device") -> torch.device:
    """A device this machine has: ``cpu``, ``cuda`` or ``cuda:N``."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown {flag} {name!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported {flag} {name!r}; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {name!r} was asked for but no CUDA GPU is available; use cpu")
    return device


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB.

    Linux's ``VmHWM`` where there is one: ``ru_maxrss`` survives ``exec``, so a process started
    by a large parent would report the parent's peak (on Linux it counts KiB, on macOS bytes)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
