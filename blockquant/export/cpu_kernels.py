"""PyTorch's own CPU weight-only kernels for packed layers: int4 groups and int8 channels.

At batch 1 a CPU decoder is bound by reading weights, and ``QuantLinear``'s plain-torch path
unpacks and dequantizes every weight on every call. ``aten._weight_int4pack_mm_for_cpu`` and
``aten._weight_int8pack_mm`` read the low-bit weights directly and sum in fp32. Each layer's
weights are converted once into the layout they need (:func:`convert`), a second copy about
as large as the packed words; the packed buffers stay what the module saves.

Where they apply (:func:`cpu_kernel_for`), measured with torch 2.13 on an AVX-512 core:

- bf16 activations only: at one token 1.8–4× faster than a bf16 ``F.linear`` of 2048-wide
  layers. With fp32 or fp16 activations both kernels take 4–20× longer than a dense matmul of
  the same shape, and from 16 tokens on 6–17× longer than dequantize + matmul.
- 1 to ``MAX_TOKENS`` tokens: beyond ~128–256 tokens dequantize + matmul is faster again.
- int4: contiguous groups of 32, 64, 128 or 256 columns (the kernel refuses others), ``in``
  a multiple of the group, ``out`` a multiple of 16 (the weight conversion refuses others).
  It computes ``(q − 8)·s + m``; our ``s·(q − z)`` is that with ``m = s·(8 − z)``: zero when
  symmetric, and for an asymmetric grid rounded to bf16 (``m`` needs up to 12 significant bits),
  which moves a layer's output by at most about 1e-3 of its norm.
- int8: one scale per output channel on the symmetric grid only: the kernel computes
  ``s·q`` for signed ``q``, which holds ``s·(q − z)`` only when every ``z`` is 128.
- ``in`` a multiple of 32: the bf16 int8 kernel reads past a row of any other width
  (a segmentation fault at ``in % 16 ≠ 0`` with AVX-512, ``in % 8 ≠ 0`` with AVX2).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from blockquant.export.packing import unpack_int32

MAX_TOKENS = 128
INT4_GROUPS = (32, 64, 128, 256)
ROW_ALIGN = 32  # in_features: the int8 kernel's vector loads (see module docstring)
INT4_OUT_ALIGN = 16  # out_features: what _convert_weight_to_int4pack_for_cpu accepts
DTYPES = (torch.bfloat16,)


class Converted(NamedTuple):
    """A layer's weights in a kernel's layout, for activations of ``dtype``."""

    kind: str  # "int4" or "int8"
    weight: Tensor  # int4: uint8 (out, in/2) in the kernel's nibble order; int8: int8 (out, in), q − 128
    scales: Tensor  # int4: (in/g, out, 2) scale and m = s·(8 − z); int8: (out,)
    group_size: int
    bias: Tensor | None


def cpu_kernel_for(
    bits: int, group_size: int, in_features: int, out_features: int, sym: bool, has_g_idx: bool, dtype: torch.dtype, tokens: int
) -> str | None:
    """``"int4"``, ``"int8"`` or None: which kernel multiplies a call of this shape (module docstring)."""
    if dtype not in DTYPES or not 1 <= tokens <= MAX_TOKENS or has_g_idx or in_features % ROW_ALIGN:
        return None
    if bits == 4 and group_size in INT4_GROUPS and in_features % group_size == 0 and out_features % INT4_OUT_ALIGN == 0:
        return "int4"
    if bits == 8 and sym and group_size >= in_features:
        return "int8"
    return None


def convert(
    kind: str, qweight: Tensor, scales: Tensor, zeros: Tensor, in_features: int, group_size: int, bias: Tensor | None, dtype: torch.dtype
) -> Converted | None:
    """The weights of one packed layer in ``kind``'s layout (None when its zero points do not fit).

    Scales are rounded to ``dtype``, as the kernels require; ``m = s·(8 − z)`` is exact in fp32
    before that rounding.
    """
    codes = unpack_int32(qweight, 4 if kind == "int4" else 8, in_features)  # (out, in) uint8
    s = scales.float()  # (out, G)
    bias = None if bias is None else bias.to(dtype)
    if kind == "int4":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
        m = s * (8 - zeros.float())
        scale_and_zero = torch.stack([s.t(), m.t()], dim=-1).to(dtype).contiguous()  # (G, out, 2)
        return Converted(kind, packed, scale_and_zero, group_size, bias)
    if not bool((zeros == 128).all()):
        return None
    signed = (codes.to(torch.int16) - 128).to(torch.int8)
    return Converted(kind, signed, s[:, 0].to(dtype).contiguous(), group_size, bias)


def cpu_linear(x: Tensor, c: Converted) -> Tensor:
    """``x Ŵᵀ + b`` with the converted weights; ``x`` ``(..., in)`` in the dtype they were converted for."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (T, in): both kernels take 2-D contiguous activations
    if c.kind == "int4":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, c.weight, c.group_size, c.scales)
    else:
        y = torch.ops.aten._weight_int8pack_mm(x2, c.weight, c.scales)
    if c.bias is not None:
        y = y + c.bias
    return y.view(*x.shape[:-1], y.shape[-1])


def kernels_available() -> bool:
    """Whether this torch build has both CPU ops."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(torch.ops.aten, "_weight_int8pack_mm")
