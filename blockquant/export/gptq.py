"""GPTQ checkpoint writer (v2) and reader (v2 and v1), for the GPTQModel / transformers ecosystem.

Per quantized layer ``L`` (layout of GPTQModel's ``GPTQQuantLinear`` buffers):

- ``L.qweight`` int32 ``(in·bits/32, out)``: unsigned codes packed along the input dimension,
  least-significant element first; 32 codes fill ``bits`` words (3-bit codes straddle words);
- ``L.qzeros`` int32 ``(n_groups, out·bits/32)``: unsigned zero points packed along the output
  dimension the same way (``2^(b−1)`` for symmetric schemes);
- ``L.scales`` ``(n_groups, out)`` in the model dtype; ``L.g_idx`` int32 ``(in,)``, the group of
  each input column (``i // group_size`` unless act-order permuted the groups).

"v2" (``checkpoint_format: gptq_v2``) stores the zero points as they are; v1 (``gptq``) stores
``z − 1``, which loses ``z = 0`` — the reason to write v2. Packing whole 32-code blocks along
both dimensions needs ``in`` and ``out`` divisible by 32; GPTQ kernels also need every group
full. Other layers are refused.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from torch import Tensor

from blockquant.export.packing import check_tensor, pack_int32, unpack_int32
from blockquant.export.qlinear import QuantLinear

NAME = "gptq"
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias")
CONFIG_FILE = "quantize_config.json"


def problem(name: str, out_features: int, in_features: int, group_size: int, conv1d: bool, has_g_idx: bool) -> str | None:
    """Why this layer cannot be written in this format, or None."""
    if in_features % 32 or out_features % 32:
        return (
            f"layer {name} is {out_features}×{in_features}: GPTQ packs blocks of 32 codes along both "
            "dimensions, so in and out features must be multiples of 32"
        )
    if group_size != -1 and in_features % group_size:
        return (
            f"layer {name} has {in_features} inputs, which group size {group_size} does not divide: "
            "GPTQ kernels need full groups; use a group size that divides it or -1"
        )
    return None


def layer_tensors(q: QuantLinear) -> dict[str, Tensor]:
    """The checkpoint tensors of one packed layer, by suffix (qweight is ours transposed)."""
    g_idx = q.g_idx if q.g_idx is not None else torch.arange(q.in_features, dtype=torch.int32) // q.group_size
    out = {
        "qweight": q.qweight.t().contiguous(),
        "qzeros": pack_int32(q.zeros.t(), q.bits),
        "scales": q.scales.t().contiguous(),
        "g_idx": g_idx.to(torch.int32),
    }
    if q.bias is not None:
        out["bias"] = q.bias
    return out


def quantization_config(bits: int, group_size: int, sym: bool, ignore: list[str], desc_act: bool, method: str) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` (GPTQModel also reads it from quantize_config.json)."""
    return {
        "quant_method": NAME,
        "checkpoint_format": "gptq_v2",
        "bits": bits,
        "group_size": group_size,
        "sym": sym,
        "desc_act": desc_act,
        "pack_dtype": "int32",
        "lm_head": False,
        "meta": {"quantizer": [_quantizer()], "method": method},
    }


def extra_files(qcfg: dict[str, Any]) -> dict[str, str]:
    """GPTQModel looks for its config in quantize_config.json."""
    return {CONFIG_FILE: json.dumps(qcfg, indent=1)}


def _quantizer() -> str:
    try:
        return f"blockquant:{version('blockquant')}"
    except PackageNotFoundError:
        return "blockquant"


def parse_config(qcfg: dict[str, Any]) -> dict[str, Any]:
    """Bits, group size, symmetry and zero-point offset of a GPTQ config; unknown variants refused."""
    fmt = str(qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported; blockquant reads 'gptq' (v1) and 'gptq_v2'")
    bits = qcfg.get("bits")
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"GPTQ bits must be 2, 3, 4 or 8, got {bits!r}")
    if qcfg.get("dynamic"):
        raise ValueError("GPTQ per-layer 'dynamic' overrides are not supported")
    if str(qcfg.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
        raise ValueError(f"GPTQ pack_dtype {qcfg['pack_dtype']!r} is not supported; int32 only")
    return {
        "bits": int(bits),
        "group_size": int(qcfg.get("group_size", -1)),
        "sym": bool(qcfg.get("sym", True)),
        "zero_offset": 1 if fmt == "gptq" else 0,
    }


def quantized_layers(tensors: dict[str, Tensor]) -> list[str]:
    return [k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")]


def read_layer(tensors: dict[str, Tensor], name: str, cfg: dict[str, Any], out: int, cols: int) -> QuantLinear:
    """Build the QuantLinear of ``name`` (an ``out × cols`` layer), consuming its tensors."""
    got = {k: tensors.pop(f"{name}.{k}") for k in SUFFIXES if f"{name}.{k}" in tensors}
    missing = [k for k in ("qzeros", "scales") if k not in got]
    if missing:
        raise ValueError(f"checkpoint lacks {name}.{missing[0]}")
    bits, g = cfg["bits"], cfg["group_size"] if cfg["group_size"] != -1 else cols
    n_groups = -(-cols // g)
    if cols % 32 or out % 32:
        raise ValueError(f"layer {name} is {out}×{cols}; GPTQ tensors need both multiples of 32")
    check_tensor(name, "qweight", got["qweight"], torch.int32, (cols * bits // 32, out))
    check_tensor(name, "qzeros", got["qzeros"], torch.int32, (n_groups, out * bits // 32))
    scales = got["scales"]
    if not scales.is_floating_point() or tuple(scales.shape) != (n_groups, out):
        raise ValueError(f"{name}.scales must be float of shape {(n_groups, out)}, got {scales.dtype} {tuple(scales.shape)}")
    zeros = unpack_int32(got["qzeros"], bits, out).t()  # (out, G)
    if cfg["zero_offset"]:  # v1 stored z − 1 (mod 2^bits)
        zeros = ((zeros.to(torch.int16) + 1) % (1 << bits)).to(torch.uint8)
    contiguous = torch.arange(cols, dtype=torch.int32) // g
    g_idx = got.get("g_idx", contiguous)
    if tuple(g_idx.shape) != (cols,) or g_idx.is_floating_point():
        raise ValueError(f"{name}.g_idx must be integer of shape ({cols},), got {g_idx.dtype} {tuple(g_idx.shape)}")
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        raise ValueError(f"{name}.g_idx holds groups outside [0, {n_groups})")
    g_idx = None if torch.equal(g_idx.to(torch.int32), contiguous) else g_idx
    qweight = got["qweight"].t().contiguous()  # (out, words): our row-major layout
    return QuantLinear(cols, out, bits, g, cfg["sym"], qweight, scales.t().contiguous(), zeros.contiguous(), g_idx, got.get("bias"))
