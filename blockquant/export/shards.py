"""Sharded safetensors files and the sha256 manifest that guards them.

Writing: tensors go to ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` plus
``model.safetensors.index.json`` past ``max_shard_bytes``), then every file of the directory
is hashed into ``blockquant.sha256.json`` — whole files, and each tensor of each safetensors
file on its own, so that a flipped byte is reported with the tensor it hit.
Reading: safetensors only (never pickle); every failure is one ``ValueError`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MANIFEST_FILE = "blockquant.sha256.json"
_CHUNK = 1 << 20


def write_safetensors(tensors: dict[str, Tensor], directory: Path, max_shard_bytes: int) -> list[str]:
    """Write ``tensors`` in order, one shard per ``max_shard_bytes``; returns the file names."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_FILE), metadata={"format": "pt"})
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(names, shards):
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return names


def weight_files(directory: Path) -> list[str]:
    """The safetensors files of a checkpoint, checking that every shard of the index exists."""
    if (directory / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{directory / INDEX_FILE} is not a valid safetensors index: {e}") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise ValueError(f"shard {missing[0]} listed in {INDEX_FILE} is missing from {directory}; copy the complete checkpoint")
        return files
    if (directory / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    if list(directory.glob("*.bin")) or list(directory.glob("*.pt")):
        raise ValueError(f"{directory} holds only pickled weights (.bin/.pt), which blockquant never loads; convert them to safetensors")
    raise ValueError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}")


def read_tensors(directory: Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint (CPU, stored dtypes)."""
    tensors: dict[str, Tensor] = {}
    for file in weight_files(directory):
        try:
            tensors.update(load_file(str(directory / file)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"cannot read {directory / file} (truncated or corrupt?): {e}") from None
    return tensors


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _safetensors_layout(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """Header length and each tensor's ``[begin, end)`` byte range in the file."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is truncated: no safetensors header")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path} has a corrupt safetensors header") from None
    start = 8 + n
    return start, {k: (start + v["data_offsets"][0], start + v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"}


def _digests(path: Path) -> tuple[str, dict[str, str]]:
    """The sha256 of a safetensors file, of its header and of each tensor's bytes, in one read of
    the file, ``_CHUNK`` bytes at a time (an embedding is hundreds of MiB: reading it whole would
    cost that much memory at save)."""
    header_end, ranges = _safetensors_layout(path)
    whole, digests = hashlib.sha256(), {}

    def feed(f, n: int, part=None) -> None:  # the next n bytes into the file's hash (and the part's)
        while n > 0:
            chunk = f.read(min(_CHUNK, n))
            if not chunk:  # a file shorter than its header says: the parts read so far are hashed
                return
            whole.update(chunk)
            if part is not None:
                part.update(chunk)
            n -= len(chunk)

    with path.open("rb") as f:
        header = hashlib.sha256()
        feed(f, header_end, header)
        digests["__header__"] = header.hexdigest()
        at = header_end
        for name, (begin, end) in sorted(ranges.items(), key=lambda item: item[1]):
            feed(f, begin - at)  # padding between tensors, if any
            h = hashlib.sha256()
            feed(f, end - begin, h)
            digests[name], at = h.hexdigest(), end
        while chunk := f.read(_CHUNK):  # anything after the last tensor
            whole.update(chunk)
    return whole.hexdigest(), digests


def write_manifest(directory: Path) -> None:
    """Hash every file of ``directory`` (and each tensor of its safetensors files)."""
    files, tensors = {}, {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        rel = path.relative_to(directory).as_posix()
        if path.suffix == ".safetensors":  # the file's hash and its tensors' in one read
            digest, tensors[rel] = _digests(path)
        else:
            digest = _sha256_file(path)
        files[rel] = {"sha256": digest, "bytes": path.stat().st_size}
    (directory / MANIFEST_FILE).write_text(json.dumps({"algorithm": "sha256", "files": files, "tensors": tensors}, indent=1))


def verify_manifest(directory: Path) -> bool:
    """Check every file against the manifest; False when there is none to check against."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return False
    try:
        manifest = json.loads(path.read_text())
        files, tensors = manifest["files"], manifest.get("tensors", {})
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a valid checksum manifest: {e}") from None
    for rel, entry in files.items():
        file = directory / rel
        if not file.is_file():
            raise ValueError(f"{rel} is missing from {directory} (listed in {MANIFEST_FILE}); copy the complete checkpoint")
        size = file.stat().st_size
        if size != entry["bytes"]:
            what = "truncated" if size < entry["bytes"] else "longer than written"
            raise ValueError(f"{rel} in {directory} is {what}: {size} bytes, {entry['bytes']} expected; copy it again")
        if _sha256_file(file) != entry["sha256"]:
            raise ValueError(
                f"checksum mismatch in {directory / rel}: {_culprit(file, tensors.get(rel, {}))}; "
                "the file is corrupt, copy or export it again"
            )
    return True


def _culprit(file: Path, expected: dict[str, str]) -> str:
    """Which part of a corrupt file differs: a tensor by name, the header, or just 'its bytes'."""
    if not expected:
        return "its bytes differ from the manifest"
    try:
        actual = _digests(file)[1]
    except ValueError:
        return "its safetensors header is corrupt"
    for name, digest in expected.items():
        if actual.get(name) != digest:
            return "its safetensors header is corrupt" if name == "__header__" else f"tensor {name} differs from the manifest"
    return "its bytes differ from the manifest"
