"""Calibration activations kept off the compute device (``--offload-activations cpu|disk``).

A block's inputs and its full-precision targets are one ``(B, T, C)`` tensor per calibration
batch; for long calibration sets they do not fit next to the block (128 × 2048 tokens × hidden
8192 in fp32 is 8.6 GB per stream). ``Offloaded`` holds them in host memory (pinned, when the
device is a GPU) or in files, and hands each batch to the compute device when it is read, so
that the device holds one batch of each stream at a time.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

MODES = ("none", "cpu", "disk")


class Offloaded(list):
    """A list of per-batch tensors stored in ``mode`` (``cpu`` or ``disk``) and read onto ``device``.

    It behaves as the list of device tensors it stands for (indexing, iteration, slicing, ``len``),
    so every consumer of a stream works unchanged.
    """

    def __init__(self, tensors: Iterable[Tensor], mode: str, device: torch.device, folder: Path | None = None) -> None:
        super().__init__()
        self.mode, self.device = mode, torch.device(device)
        if mode == "disk":
            self.folder = Path(tempfile.mkdtemp(prefix="blockquant-act-", dir=folder))
            weakref.finalize(self, shutil.rmtree, self.folder, True)  # the files go with the list
        for i, t in enumerate(tensors):
            super().append(self._store(i, t))

    def _store(self, i: int, t: Tensor) -> Tensor | Path:
        t = t.detach()
        if self.mode == "disk":
            path = self.folder / f"{i}.safetensors"
            save_file({"t": t.contiguous().cpu()}, str(path))
            return path
        host = t.to("cpu")
        return host.pin_memory() if self.device.type == "cuda" and torch.cuda.is_available() else host

    def _read(self, item: Tensor | Path) -> Tensor:
        t = load_file(str(item))["t"] if isinstance(item, Path) else item
        return t.to(self.device, non_blocking=True)

    def append(self, t: Tensor) -> None:  # type: ignore[override]
        super().append(self._store(len(self), t))

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self._read(x) for x in super().__getitem__(i)]
        return self._read(super().__getitem__(i))

    def __iter__(self) -> Iterator[Tensor]:
        for x in super().__iter__():
            yield self._read(x)


def offload(tensors: list[Tensor], mode: str, device: torch.device, folder: Path | None = None) -> list[Tensor]:
    """``tensors`` stored as ``mode`` says (``none``: as they are)."""
    if mode not in MODES:
        raise ValueError(f"offload_activations must be one of {', '.join(MODES)}, got {mode!r}")
    return tensors if mode == "none" else Offloaded(tensors, mode, device, folder)
