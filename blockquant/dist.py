"""Several processes sharing one run (``torchrun``): which process this is, its share of a list,
and the sums, maxima and minima that statistics are reduced with (``torch.distributed``).

Without a process group (one process, ``WORLD_SIZE`` unset) every function is the one-process
identity: rank 0 of 1, ``shard`` returns everything and the reductions return their input as it
is. ``init_from_env`` joins the standard ``env://`` rendezvous that ``torchrun`` sets up (gloo on
CPU, NCCL on CUDA). A collective whose peer has stopped raises a one-line ``ValueError`` naming
this rank (``StoppedPeer``), not a backend traceback. The only state is torch.distributed's own
process group.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as td
from torch import Tensor

T = TypeVar("T")

TIMEOUT_S = 1800.0  # how long a rank waits for its peers in one collective before it gives up


def _active() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return td.get_rank() if _active() else 0


def world_size() -> int:
    """How many processes share the run (1 without a process group)."""
    return td.get_world_size() if _active() else 1


def is_main() -> bool:
    """Rank 0: the process that prints and writes."""
    return rank() == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None


def init_from_env(device: str | torch.device, timeout_s: float = TIMEOUT_S) -> torch.device:
    """Join the process group torchrun described in the environment; the device this rank computes on.

    Nothing happens with ``WORLD_SIZE`` unset or 1, or when a process group already exists.
    On CUDA each process takes the GPU of its ``LOCAL_RANK`` (``device`` must then be plain
    ``cuda``) and the backend is NCCL; on CPU it is gloo. ``timeout_s`` bounds every wait for a
    peer, so a rank that died is noticed instead of waited for forever.
    """
    device = torch.device(device)
    n = env_world_size()
    if n <= 1 or _active():
        return device
    if not td.is_available():
        raise ValueError(f"WORLD_SIZE={n} asks for several processes, but this torch build has no torch.distributed")
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"under torchrun each process takes the GPU of its LOCAL_RANK: pass --device cuda, not {device}")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        td.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError, TimeoutError) as e:
        raise ValueError(f"cannot join the {n} processes torchrun started ({backend}): {_first_line(e)}") from None
    return device


def close() -> None:
    """Leave the process group (peers still waiting in a collective are released with an error)."""
    if _active():
        td.destroy_process_group()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class StoppedPeer(ValueError):
    """A collective failed: another rank stopped (an error, a crash) or did not answer in time."""


def _collective(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except (RuntimeError, TimeoutError) as e:  # gloo / NCCL errors (DistBackendError is a RuntimeError)
        raise StoppedPeer(f"rank {rank()}: another rank stopped ({_first_line(e)}); no output was written") from None


def _on_backend(t: Tensor) -> Tensor:
    """``t``, or a copy on the device NCCL reduces on."""
    if td.get_backend() == "nccl" and t.device.type != "cuda":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t


def _reduce(t: Tensor, op: td.ReduceOp) -> Tensor:
    if world_size() == 1:
        return t
    work = _on_backend(t)
    _collective(lambda: td.all_reduce(work, op=op))
    if work is not t:
        t.copy_(work)
    return t


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over every rank, in place; returns it (as it is with one process)."""
    return _reduce(t, td.ReduceOp.SUM)


def all_reduce_max(t: Tensor) -> Tensor:
    """Element-wise maximum over every rank, in place."""
    return _reduce(t, td.ReduceOp.MAX)


def all_reduce_min(t: Tensor) -> Tensor:
    """Element-wise minimum over every rank, in place."""
    return _reduce(t, td.ReduceOp.MIN)


def total(value: float) -> float:
    """A number (a loss, a count) summed over every rank, in float64."""
    return value if world_size() == 1 else float(all_reduce_sum(torch.tensor([value], dtype=torch.float64))[0])


def maximum(value: float) -> float:
    return value if world_size() == 1 else float(all_reduce_max(torch.tensor([value], dtype=torch.float64))[0])


def minimum(value: float) -> float:
    return value if world_size() == 1 else float(all_reduce_min(torch.tensor([value], dtype=torch.float64))[0])


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on some rank: every rank learns it before any of them raises."""
    return flag if world_size() == 1 else maximum(float(flag)) > 0


def barrier() -> None:
    if world_size() > 1:
        _collective(td.barrier)


def parts(n: int, first: int = 0) -> list[tuple[int, int]]:
    """``(start, stop)`` of each rank's contiguous part of ``n`` items, in rank order.

    Parts differ by at most one item; the ``n % world`` longer ones go to ranks ``first``,
    ``first + 1``, … (cyclically), so that a caller splitting several lists can rotate who
    gets the remainders.
    """
    w = world_size()
    q, rem = divmod(n, w)
    sizes = [q + (1 if (r - first) % w < rem else 0) for r in range(w)]
    starts = [sum(sizes[:r]) for r in range(w)]
    return [(s, s + k) for s, k in zip(starts, sizes)]


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's contiguous share of ``items`` (all of them with one process)."""
    if world_size() == 1:
        return items
    start, stop = parts(len(items))[rank()]
    return items[start:stop]
