"""Write a quantized checkpoint block by block, as an out-of-core run finishes each block.

Everything goes into a hidden sibling of the output directory, ``.NAME.partial``: one shard
``model-0000k-of-0000n.safetensors`` per block (n = blocks + 1) in the chosen format, the last
shard for the tensors outside the blocks, and for each block a small ``.restore-k.safetensors``
(its integer codes and fp32 grids) hashed into ``progress.json`` with its shard. ``finish``
writes the index, config, tokenizer, record and sha256 manifest, drops the restore files and
renames the directory into place, so the quantized model is never whole in memory and a run
killed before the end leaves no output directory. A later run with ``resume`` reopens the
partial directory: ``restore`` checks a block's files against their hashes, puts the block's
quantized weights back exactly and returns its grids, and the run goes on from the first block
not written; the files it writes are those an uninterrupted run writes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from blockquant.arch import arch_for, block_linears, get_blocks
from blockquant.capture import LayerResult
from blockquant.export import compressed_tensors, gptq
from blockquant.export.qlinear import QuantLinear, pack_linear
from blockquant.export.shards import INDEX_FILE, write_manifest
from blockquant.files import RECORD_FILE, check_output_dir
from blockquant.spec import QuantSpec

FORMATS = {compressed_tensors.NAME: compressed_tensors, gptq.NAME: gptq}
DEQUANTIZED = "dequantized"
PROGRESS_FILE = "progress.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class StreamingWriter:
    """The output of one out-of-core run; ``setup`` (format, spec, recipe, source…) must match to resume."""

    def __init__(
        self,
        out_dir: str | Path,
        fmt: str,
        model: nn.Module,
        spec: QuantSpec,
        dtype: torch.dtype,
        setup: dict[str, Any],
        *,
        desc_act: bool = False,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.out = Path(out_dir)
        self.tmp = self.out.parent / f".{self.out.name}.partial"
        self.fmt, self.spec, self.dtype, self.model = fmt, spec, dtype, model
        self.arch = arch_for(model)
        self.n_blocks = len(get_blocks(model, self.arch))
        self.setup = {**setup, "format": fmt, "dtype": str(dtype).removeprefix("torch."), "blocks": self.n_blocks}
        quantized = {f"{self.arch.blocks}.{i}.{n}" for i, b in enumerate(get_blocks(model, self.arch)) for n in block_linears(b, self.arch)}
        ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized)
        group = -1 if spec.per_tensor else spec.group_size
        self.qcfg = None if fmt == DEQUANTIZED else FORMATS[fmt].quantization_config(spec.bits, group, spec.sym, ignore, desc_act, setup.get("method", ""))
        if resume:
            self.progress = self._reopen()
        else:
            check_output_dir(self.out, overwrite)
            if self.tmp.exists():
                raise ValueError(
                    f"an interrupted run left {self.tmp}: add --resume to continue it, or remove that directory to start again"
                )
            self.tmp.mkdir()
            self.progress = {"setup": self.setup, "blocks": {}}
            self._save_progress()

    def _reopen(self) -> dict[str, Any]:
        if not (self.tmp / PROGRESS_FILE).is_file():
            raise ValueError(f"--resume: no interrupted run of {self.out} to continue ({self.tmp} does not exist); run without --resume")
        progress = json.loads((self.tmp / PROGRESS_FILE).read_text())
        if progress.get("setup") != self.setup:
            theirs = progress.get("setup") or {}
            diff = ", ".join(f"{k}: {theirs.get(k)!r} then, {v!r} now" for k, v in self.setup.items() if theirs.get(k) != v)
            raise ValueError(f"--resume: the interrupted run in {self.tmp} was made with other settings ({diff}); run without --resume")
        return progress

    def _save_progress(self) -> None:
        part = self.tmp / (PROGRESS_FILE + ".new")
        part.write_text(json.dumps(self.progress, indent=1))
        os.replace(part, self.tmp / PROGRESS_FILE)

    def shard(self, j: int) -> str:
        return f"model-{j + 1:05d}-of-{self.n_blocks + 1:05d}.safetensors"

    def write(self, j: int, block: nn.Module, layers: dict[str, LayerResult]) -> None:
        """Block ``j``'s shard and restore file, written and hashed; ``layers`` by full name."""
        prefix = f"{self.arch.blocks}.{j}"
        tensors, restore = {}, {}
        packed_layers = {name.removeprefix(prefix + "."): r for name, r in layers.items()}
        for name, module in block.named_modules():
            if name in packed_layers:
                r = packed_layers[name]
                weight = module.weight.detach().t() if isinstance(module, Conv1D) else module.weight.detach()
                exact = _pack_rows(f"{prefix}.{name}", weight, r, self.spec, None, torch.float32)
                restore |= {f"{name}.{k}": v for k, v in exact.state_dict().items() if v is not None}
                tensors |= self._layer_tensors(f"{prefix}.{name}", module, weight, r)
            else:
                own = {**module._parameters, **{b: t for b, t in module._buffers.items() if b not in module._non_persistent_buffers_set}}
                for leaf, t in own.items():
                    if t is not None and not (name.rpartition(".")[0] in packed_layers or name in packed_layers):
                        tensors[".".join(p for p in (prefix, name, leaf) if p)] = _cast(t, self.dtype)
        shard, side = self.tmp / self.shard(j), self.tmp / f".restore-{j}.safetensors"
        self._save(tensors, shard)
        self._save(restore, side)
        errors = {n: r.error for n, r in packed_layers.items()}
        self.progress["blocks"][str(j)] = {"shard": _sha256(shard), "restore": _sha256(side), "errors": errors}
        self._save_progress()

    def _layer_tensors(self, full: str, module: nn.Module, weight: Tensor, r: LayerResult) -> dict[str, Tensor]:
        bias = None if module.bias is None else module.bias.detach().to(self.dtype)
        if self.fmt == DEQUANTIZED:
            out = {f"{full}.weight": _cast(module.weight, self.dtype)}
            return out | ({f"{full}.bias": bias} if bias is not None else {})
        q = _pack_rows(full, weight, r, self.spec, bias, self.dtype)
        return {f"{full}.{k}": v for k, v in FORMATS[self.fmt].layer_tensors(q).items()}

    def _save(self, tensors: dict[str, Tensor], path: Path) -> None:
        part = path.with_name(path.name + ".new")
        try:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(part), metadata={"format": "pt"})
            os.replace(part, path)
        except (OSError, SafetensorError) as e:
            self._fail_on_full_disk(e)
            raise

    def _fail_on_full_disk(self, e: BaseException) -> None:
        """A full disk gives one clear error and no partial directory (it could not be resumed usefully)."""
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e):
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise ValueError(f"the disk holding {self.out} is full ({e.strerror or e}); nothing was written: free space and run again") from None

    def restore(self, j: int, block: nn.Module) -> dict[str, LayerResult] | None:
        """Block ``j`` as an earlier run wrote it (weights put back exactly), or None if it was not written."""
        entry = self.progress["blocks"].get(str(j))
        if entry is None:
            return None
        shard, side = self.tmp / self.shard(j), self.tmp / f".restore-{j}.safetensors"
        for path, key in ((shard, "shard"), (side, "restore")):
            if not path.is_file() or _sha256(path) != entry[key]:
                raise ValueError(f"--resume: {path} is missing or does not match its hash in {PROGRESS_FILE}; run without --resume")
        saved = load_file(str(side))
        prefix, out = f"{self.arch.blocks}.{j}", {}
        for name, error in entry["errors"].items():
            module = block.get_submodule(name)
            cols, rows = (module.weight.shape if isinstance(module, Conv1D) else module.weight.shape[::-1])
            g_idx = saved.get(f"{name}.g_idx")
            width = cols if self.spec.group_size == -1 or self.spec.per_tensor else min(self.spec.group_size, cols)
            q = QuantLinear(cols, rows, self.spec.bits, width, self.spec.sym, saved[f"{name}.qweight"], saved[f"{name}.scales"], saved[f"{name}.zeros"], g_idx)
            w = q.dequantize(torch.float32)
            module.weight.data.copy_((w.t() if isinstance(module, Conv1D) else w).to(module.weight.dtype))
            zero = q.zeros.float() + self.spec.qmin
            out[f"{prefix}.{name}"] = LayerResult(q.scales.float(), zero, None if g_idx is None else g_idx.long(), error)
        return out

    def finish(self, tokenizer: Any, record: dict[str, Any], source: Any = None) -> Path:
        """The tensors outside the blocks, the index, config, tokenizer, record and manifest; then rename
        into place. ``source`` (a ``lazy.LazyCheckpoint``) reads the tensors outside the blocks one
        shard at a time from the source checkpoint instead of the model (which then needs none of them)."""
        missing = [j for j in range(self.n_blocks) if str(j) not in self.progress["blocks"]]
        if missing:
            raise ValueError(f"blocks {missing[:5]} of {self.out} were never written")
        try:
            return self._finish(tokenizer, record, source)
        except OSError as e:
            self._fail_on_full_disk(e)
            raise

    def _finish(self, tokenizer: Any, record: dict[str, Any], source: Any) -> Path:
        blocks = self.arch.blocks + "."
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        state = self.model.state_dict()
        names = [k for k in state if not k.startswith(blocks) and k not in tied]
        groups: list[list[str]] = [[]]  # shards of at most OUTSIDE_BYTES (an embedding of its own), read and written one at a time
        for k in names:
            size = state[k].numel() * self.dtype.itemsize
            if groups[-1] and sum(state[n].numel() for n in groups[-1]) * self.dtype.itemsize + size > OUTSIDE_BYTES:
                groups.append([])
            groups[-1].append(k)
        total_shards = self.n_blocks + len(groups)
        for j in range(self.n_blocks):  # the block shards were named before the count was known
            os.replace(self.tmp / self.shard(j), self.tmp / f"model-{j + 1:05d}-of-{total_shards:05d}.safetensors")
        for i, group in enumerate(groups):
            tensors = {k: _cast(_read(source, k) if source is not None else state[k], self.dtype) for k in group}
            self._save(tensors, self.tmp / f"model-{self.n_blocks + i + 1:05d}-of-{total_shards:05d}.safetensors")
            del tensors
        weight_map, total = {}, 0
        for path in sorted(self.tmp.glob("model-*.safetensors")):
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            for k, v in header.items():
                if k != "__metadata__":
                    weight_map[k] = path.name
                    total += v["data_offsets"][1] - v["data_offsets"][0]
        (self.tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        config = json.loads(self.model.config.to_json_string(use_diff=True))
        config.update(architectures=[type(self.model).__name__], dtype=str(self.dtype).removeprefix("torch."))
        if self.qcfg is not None:
            config["quantization_config"] = self.qcfg
            for file, text in FORMATS[self.fmt].extra_files(self.qcfg).items():
                (self.tmp / file).write_text(text)
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if getattr(self.model, "generation_config", None) is not None and self.model.can_generate():
            self.model.generation_config.save_pretrained(self.tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.tmp)
        record = dict(record)
        record["export"] = {"format": self.fmt, "dtype": str(self.dtype).removeprefix("torch."), "streamed": True}
        (self.tmp / RECORD_FILE).write_text(json.dumps(record, indent=1))
        for path in [*self.tmp.glob(".restore-*.safetensors"), self.tmp / PROGRESS_FILE]:
            path.unlink()
        write_manifest(self.tmp)
        if self.out.exists():
            shutil.rmtree(self.out)  # check_output_dir allowed it (--overwrite)
        os.replace(self.tmp, self.out)
        return self.out


OUTSIDE_BYTES = 256 * 2**20  # the shards of the tensors outside the blocks: at most this much, or one tensor each


def _read(source: Any, name: str) -> Tensor:
    """One tensor of the source checkpoint (``lazy.LazyCheckpoint``), as stored."""
    from safetensors import safe_open

    with safe_open(str(source.where[name]), framework="pt", device="cpu") as f:
        return f.get_tensor(name)


ROWS = 512  # rows packed at a time: packing makes a few full-size temporaries of what it packs


def _pack_rows(name: str, weight: Tensor, r: LayerResult, spec: QuantSpec, bias: Tensor | None, dtype: torch.dtype) -> QuantLinear:
    """``pack_linear`` over chunks of rows (each row's grid is its own), joined into one layer."""
    out = weight.shape[0]
    parts = []
    for i in range(0, out, ROWS):
        rows = slice(i, min(i + ROWS, out))
        scale, zero = (r.scale, r.zero) if r.scale.shape[0] == 1 else (r.scale[rows], r.zero[rows])
        parts.append(pack_linear(name, weight[rows], scale, zero, r.g_idx, spec, None, dtype)[0])
    q = parts[0]
    cat = lambda key: torch.cat([getattr(p, key) for p in parts])  # noqa: E731
    return QuantLinear(q.in_features, out, q.bits, q.group_size, q.sym, cat("qweight"), cat("scales"), cat("zeros"), r.g_idx, bias)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    t = t.detach()
    return t.to(dtype) if t.is_floating_point() else t
