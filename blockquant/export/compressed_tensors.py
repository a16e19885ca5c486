"""compressed-tensors ``pack-quantized`` writer and reader (the format vLLM and transformers read).

Per quantized Linear ``L`` (layout of compressed-tensors' ``PackedQuantizationCompressor``,
checked against its 0.20 source):

- ``L.weight_packed`` int32 ``(out, ⌈in·bits/32⌉)``: signed codes ``q − 2^(b−1)`` offset back to
  unsigned and packed densely along the input dimension, least-significant element first;
- ``L.weight_scale`` ``(out, n_groups)`` (``(out, 1)`` per channel) in the model dtype;
- ``L.weight_zero_point`` int32 ``(⌈out·bits/32⌉, n_groups)``, asymmetric only: the zero points,
  offset to unsigned the same way and packed along the output dimension;
- ``L.weight_shape`` int64 ``[out, in]``.

compressed-tensors' grid is signed for both symmetric and asymmetric schemes, so blockquant's
unsigned asymmetric codes and zero points shift by ``2^(b−1)`` — the stored words are the same.
The asymmetric layout is llm-compressor's (and what vLLM allocates); transformers 5.23 +
compressed-tensors 0.20 load it only with ``CompressedTensorsConfig(dequantize=True)``, since
their compressed mode sizes ``weight_zero_point`` unpacked (docs/formats.md).

It cannot hold a ragged last group (compressed-tensors' dequantization requires
``in % group_size == 0`` and vLLM sizes the scales ``in // group_size``), act-order groups
(``g_idx``; removed from compressed-tensors) or GPT-2's Conv1D; those are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from blockquant.export.packing import check_tensor, pack_int32, packed_words, unpack_int32
from blockquant.export.qlinear import QuantLinear

NAME = "compressed-tensors"
FORMAT = "pack-quantized"
# The packing layout written here; 3-bit codes were packed 10 per word before 0.20.
LAYOUT_VERSION = "0.20.0"
SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "bias")


@dataclass(frozen=True)
class LayerScheme:
    bits: int
    group_size: int | None  # None: one group per output channel
    sym: bool
    targets: tuple[str, ...]


def problem(name: str, out_features: int, in_features: int, group_size: int, conv1d: bool, has_g_idx: bool) -> str | None:
    """Why this layer cannot be written in this format, or None."""
    if conv1d:
        return f"layer {name} is a Conv1D (GPT-2); compressed-tensors quantizes nn.Linear only"
    if has_g_idx:
        return f"layer {name} has act-order groups (g_idx), which compressed-tensors no longer holds; quantize with static_groups: true"
    if group_size != -1 and in_features % group_size:
        divisors = [d for d in (8, 16, 32, 64, 128) if in_features % d == 0]
        hint = f"a group size that divides it ({', '.join(map(str, divisors))}) or -1" if divisors else "--group-size -1"
        return (
            f"layer {name} has {in_features} inputs, which group size {group_size} does not divide: "
            f"compressed-tensors cannot hold a shorter last group; use {hint}"
        )
    return None


def layer_tensors(q: QuantLinear) -> dict[str, Tensor]:
    """The checkpoint tensors of one packed layer, by suffix."""
    out = {"weight_packed": q.qweight, "weight_scale": q.scales, "weight_shape": torch.tensor([q.out_features, q.in_features])}
    if not q.sym:
        out["weight_zero_point"] = pack_int32(q.zeros.t(), q.bits).t().contiguous()  # packed along `out`
    if q.bias is not None:
        out["bias"] = q.bias
    return out


def quantization_config(bits: int, group_size: int, sym: bool, ignore: list[str], desc_act: bool, method: str) -> dict[str, Any]:
    """``config.json``'s ``quantization_config``: one scheme for every Linear not in ``ignore``."""
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": sym,
        "dynamic": False,
        "strategy": "channel" if group_size == -1 else "group",
        "group_size": None if group_size == -1 else group_size,
    }
    return {
        "quant_method": NAME,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None, "format": FORMAT}
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": LAYOUT_VERSION,
    }


def extra_files(qcfg: dict[str, Any]) -> dict[str, str]:
    """Files besides config.json that carry the config: none for compressed-tensors."""
    return {}


def parse_config(qcfg: dict[str, Any]) -> list[LayerScheme]:
    """The weight schemes of a ``quantization_config``; anything blockquant cannot run is refused."""
    groups = qcfg.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError("compressed-tensors quantization_config has no config_groups")
    old = _before_dense_layout(qcfg.get("version"))
    schemes = []
    for key, group in groups.items():
        fmt = group.get("format") or qcfg.get("format")
        if fmt != FORMAT:
            raise ValueError(f"compressed-tensors format {fmt!r} (config group {key}) is not supported; blockquant reads {FORMAT!r}")
        w = group.get("weights") or {}
        if group.get("input_activations") or group.get("output_activations"):
            raise ValueError(f"config group {key} quantizes activations, which blockquant does not execute")
        if w.get("type", "int") != "int" or w.get("num_bits") not in range(1, 9) or w.get("dynamic"):
            raise ValueError(f"config group {key}: only static integer weights of 1-8 bits are supported, got {w}")
        if w.get("actorder") in ("group", "dynamic"):
            raise ValueError(f"config group {key}: actorder 'group' (g_idx) is not supported")
        strategy = w.get("strategy") or ("group" if w.get("group_size") else "channel")
        if strategy not in ("group", "channel"):
            raise ValueError(f"config group {key}: weight strategy {strategy!r} is not supported (group or channel)")
        if w["num_bits"] == 3 and old:
            raise ValueError(
                f"3-bit checkpoints of compressed-tensors {qcfg['version']} (< 0.20) pack 10 codes per word; "
                "blockquant reads the dense 0.20 layout only"
            )
        group_size = int(w["group_size"]) if strategy == "group" else None
        schemes.append(LayerScheme(int(w["num_bits"]), group_size, bool(w.get("symmetric", True)), tuple(group.get("targets", ()))))
    return schemes


def _before_dense_layout(version: Any) -> bool:
    """True for a compressed-tensors version older than the dense 3-bit layout (0.20)."""
    nums = re.findall(r"\d+", str(version or ""))[:2]
    return len(nums) == 2 and (int(nums[0]), int(nums[1])) < (0, 20)


def quantized_layers(tensors: dict[str, Tensor]) -> list[str]:
    return [k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed")]


def _scheme_for(name: str, schemes: list[LayerScheme]) -> LayerScheme:
    for s in schemes:
        for t in s.targets:
            if t == name or t == "Linear" or (t.startswith("re:") and re.match(t[3:], name)):
                return s
    raise ValueError(f"layer {name} holds packed weights but no config group targets it")


def read_layer(tensors: dict[str, Tensor], name: str, schemes: list[LayerScheme], out: int, cols: int) -> QuantLinear:
    """Build the QuantLinear of ``name`` (an ``out × cols`` Linear), consuming its tensors."""
    s = _scheme_for(name, schemes)
    got = {k: tensors.pop(f"{name}.{k}") for k in SUFFIXES if f"{name}.{k}" in tensors}
    for k in ("weight_scale", "weight_shape") + (() if s.sym else ("weight_zero_point",)):
        if k not in got:
            raise ValueError(f"checkpoint lacks {name}.{k}")
    shape = tuple(int(v) for v in got["weight_shape"].flatten().tolist())
    if shape != (out, cols):
        raise ValueError(
            f"{name}.weight_shape says {shape} but the model's layer is ({out}, {cols}); the checkpoint does not fit this config"
        )
    g = s.group_size or cols
    n_groups = -(-cols // g)
    check_tensor(name, "weight_packed", got["weight_packed"], torch.int32, (out, packed_words(cols, s.bits)))
    scales = got["weight_scale"]
    if not scales.is_floating_point() or tuple(scales.shape) != (out, n_groups):
        raise ValueError(f"{name}.weight_scale must be float of shape {(out, n_groups)}, got {scales.dtype} {tuple(scales.shape)}")
    if s.sym:
        zeros = torch.full((out, n_groups), 1 << (s.bits - 1), dtype=torch.uint8)
    else:
        zp = got["weight_zero_point"]
        check_tensor(name, "weight_zero_point", zp, torch.int32, (packed_words(out, s.bits), n_groups))
        zeros = unpack_int32(zp.t().contiguous(), s.bits, out).t().contiguous()
    return QuantLinear(cols, out, s.bits, g, s.sym, got["weight_packed"].contiguous(), scales, zeros, None, got.get("bias"))
