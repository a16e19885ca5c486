"""A Hugging Face checkpoint opened without materialising it: quantize models larger than memory.

The model is built on the ``meta`` device (accelerate's ``init_empty_weights``; buffers such as
rotary frequencies stay real), its (sharded) safetensors files are checked before any work —
every file the index names exists and holds every byte its header promises — and tensors are
read with safetensors' ``safe_open`` only when a module needs them: the modules outside the
blocks (embeddings, final norm, head) at open, each block just before the driver processes it;
``release`` puts a block back on ``meta`` once it is written. Peak host memory is then that of
the modules outside the blocks, one block in the compute dtype and the calibration activations,
whatever the number of blocks.
"""

from __future__ import annotations

import ctypes
import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from blockquant.files import load_tokenizer, model_class_name

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _check_shard(path: Path) -> list[str]:
    """The tensor names of one safetensors file, after checking it holds every byte its header promises."""
    if not path.is_file():
        raise ValueError(f"checkpoint shard {path} is missing")
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError):
        raise ValueError(f"checkpoint shard {path} is not a safetensors file (or its header is cut off)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(f"checkpoint shard {path} is truncated: {size} bytes, its header describes {8 + n + end}")
    return [k for k in header if k != "__metadata__"]


class LazyCheckpoint:
    """Where each tensor of a checkpoint lives, and loading / releasing modules of its meta model."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype) -> None:
        self.dir, self.dtype = Path(model_dir), dtype
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError):
                raise ValueError(f"{index} is not a safetensors index (it needs a 'weight_map')") from None
        elif (self.dir / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            raise ValueError(f"{self.dir} holds no {SINGLE_FILE} or {INDEX_FILE}: out-of-core loading reads safetensors checkpoints")
        self.where: dict[str, Path] = {}
        for file in files:
            for name in _check_shard(self.dir / file):
                self.where[name] = self.dir / file

    def check_covers(self, model: nn.Module) -> None:
        """Every tensor of ``model``'s state dict that is not tied to another must be in the checkpoint."""
        missing = [n for n in _own_tensors(model) if n not in self.where]
        if missing:
            raise ValueError(f"checkpoint {self.dir} lacks {len(missing)} tensor(s) the model needs, e.g. {', '.join(missing[:3])}")

    def load(self, module: nn.Module, prefix: str, device: torch.device | str = "cpu") -> None:
        """Read every parameter and persistent buffer of ``module`` (named ``prefix`` in the model)
        from the shards, floating ones in the checkpoint's compute dtype, onto ``device``."""
        by_file: dict[Path, list[tuple[nn.Module, str, str]]] = {}
        for owner, leaf, full in _slots(module, prefix):
            if full in self.where:
                by_file.setdefault(self.where[full], []).append((owner, leaf, full))
        for file, slots in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for owner, leaf, full in slots:
                    t = f.get_tensor(full)
                    t = t.to(device=device, dtype=self.dtype if t.is_floating_point() else t.dtype)
                    _assign(owner, leaf, t)

    @staticmethod
    def release(module: nn.Module) -> None:
        """Put ``module``'s parameters back on ``meta`` (shapes and dtypes kept): their memory is freed."""
        for owner, leaf, _ in _slots(module, ""):
            old = getattr(owner, leaf)
            _assign(owner, leaf, torch.empty_like(old, device="meta"))
        give_back_memory()


LARGE_ALLOCATION = 4 << 20  # bytes: from here on glibc maps each allocation on its own and unmaps it when freed


def map_large_allocations() -> None:
    """Have glibc map every allocation of ``LARGE_ALLOCATION`` bytes or more on its own, so that
    freeing it returns it to the system at once. By default glibc raises that threshold to the
    size of the last large block freed (up to 32 MiB): the many 10–50 MiB temporaries of
    quantizing and packing a block then come from the heap, which fragments and keeps growing.
    Set for out-of-core runs, where the peak is the point; it lasts for the process."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, LARGE_ALLOCATION)  # M_MMAP_THRESHOLD (fixed: no dynamic raise)
    except (OSError, AttributeError):
        pass


def give_back_memory() -> None:
    """Hand freed heap memory back to the system. glibc keeps what a process frees for its next
    allocations, so without this a run that frees a block per block would still grow as if it kept them."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator returns memory its own way
        pass


def _slots(module: nn.Module, prefix: str) -> list[tuple[nn.Module, str, str]]:
    """(owning module, attribute, full name) of every parameter and persistent buffer below ``module``."""
    out = []
    for name, sub in module.named_modules():
        for leaf in list(sub._parameters) + [b for b in sub._buffers if b not in sub._non_persistent_buffers_set]:
            if getattr(sub, leaf) is not None:
                out.append((sub, leaf, ".".join(p for p in (prefix, name, leaf) if p)))
    return out


def _assign(owner: nn.Module, leaf: str, t: torch.Tensor) -> None:
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    else:
        owner._buffers[leaf] = t


def _own_tensors(model: nn.Module) -> list[str]:
    """State-dict names of tensors not tied to another (a tied head is written once, as the embedding)."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return [n for n in model.state_dict() if n not in tied]


def open_model(
    model_dir: str | Path, dtype: torch.dtype = torch.float32, embeddings: bool = True
) -> tuple[nn.Module, LazyCheckpoint, object]:
    """The model of a local directory with its blocks on ``meta``, the ``LazyCheckpoint`` that loads
    them, and the tokenizer. The modules before the blocks (embeddings) are loaded, in ``dtype`` on
    CPU, unless ``embeddings`` is False (a run without calibration never runs the model); the final
    norm and the head stay on ``meta`` until ``load_outside`` reads them."""
    import transformers
    from accelerate import init_empty_weights

    from blockquant.arch import arch_for

    cls = getattr(transformers, model_class_name(model_dir))
    checkpoint = LazyCheckpoint(model_dir, dtype)
    map_large_allocations()
    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir))
        with init_empty_weights(include_buffers=False):
            model = cls(config).to(dtype)
    except Exception as e:  # transformers raises many types for a broken config
        raise ValueError(f"cannot build the model in {model_dir}: {type(e).__name__}: {e}".splitlines()[0]) from None
    checkpoint.check_covers(model)
    arch_for(model)  # a supported family, before any tensor is read
    if embeddings:
        load_outside(checkpoint, model, ends=False)
    return model.eval(), checkpoint, load_tokenizer(model_dir)


def load_outside(checkpoint: LazyCheckpoint, model: nn.Module, ends: bool = True) -> None:
    """(Re)load every module of ``model`` outside its blocks: embeddings, and with ``ends`` the final
    norm and the head (what runs after the blocks; capturing block 0's inputs does not need them)."""
    from blockquant.arch import arch_for

    arch = arch_for(model)
    for name, child in model.named_children():
        _outside(checkpoint, child, name, arch.blocks, release=False)
    if not ends:
        for end in (arch.final_norm, arch.head):
            if end is not None and not _tied_to_loaded(model, end):
                LazyCheckpoint.release(model.get_submodule(end))
    model.tie_weights()


def _tied_to_loaded(model: nn.Module, name: str) -> bool:
    """Whether module ``name`` shares its weight with another module (a tied head): freeing it frees nothing."""
    weight = getattr(model.get_submodule(name), "weight", None)
    return weight is not None and any(p is weight for n, p in model.named_parameters(remove_duplicate=False) if not n.startswith(name + "."))


def release_outside(model: nn.Module) -> None:
    """Put the modules outside the blocks back on ``meta`` (once block 0's inputs are captured, a run
    that needs neither the embeddings nor the head again frees them; ``load_outside`` reads them back)."""
    blocks = _blocks_path(model)
    for name, child in model.named_children():
        _outside(None, child, name, blocks, release=True)
    give_back_memory()


def _blocks_path(model: nn.Module) -> str:
    from blockquant.arch import arch_for

    return arch_for(model).blocks


def _outside(checkpoint: LazyCheckpoint | None, module: nn.Module, prefix: str, blocks: str, release: bool) -> None:
    """Load (or release) ``module`` except the ModuleList of blocks at ``blocks`` (a dotted path)."""
    if prefix == blocks:
        return
    if not blocks.startswith(prefix + "."):
        LazyCheckpoint.release(module) if release else checkpoint.load(module, prefix)
        return
    for owner, leaf, full in _slots_here(module, prefix):
        if release:
            _assign(owner, leaf, torch.empty_like(getattr(owner, leaf), device="meta"))
            continue
        if full not in checkpoint.where:
            continue  # tied to a tensor the checkpoint holds under another name
        with safe_open(str(checkpoint.where[full]), framework="pt", device="cpu") as f:
            t = f.get_tensor(full)
            _assign(owner, leaf, t.to(checkpoint.dtype) if t.is_floating_point() else t)
    for name, child in module.named_children():
        _outside(checkpoint, child, f"{prefix}.{name}", blocks, release)


def _slots_here(module: nn.Module, prefix: str) -> list[tuple[nn.Module, str, str]]:
    """The module's own parameters and persistent buffers (not its children's) that the checkpoint holds."""
    leaves = list(module._parameters) + [b for b in module._buffers if b not in module._non_persistent_buffers_set]
    return [(module, leaf, f"{prefix}.{leaf}") for leaf in leaves if getattr(module, leaf) is not None]
