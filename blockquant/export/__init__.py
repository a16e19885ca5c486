"""Real low-bit checkpoints: compressed-tensors and GPTQ-v2 export, packed reload (DESIGN.md §4)."""

from blockquant.export.checkpoint import (
    DEQUANTIZED,
    FORMAT_CHOICES,
    FORMATS,
    export_problem,
    is_packed,
    load,
    load_model_any,
    resolve_format,
    save_checkpoint,
    save_packed,
    stored_dtype,
)
from blockquant.export.qlinear import QuantLinear, pack_linear, set_cpu_kernels

__all__ = [
    "DEQUANTIZED",
    "FORMAT_CHOICES",
    "FORMATS",
    "QuantLinear",
    "set_cpu_kernels",
    "export_problem",
    "is_packed",
    "load",
    "load_model_any",
    "pack_linear",
    "resolve_format",
    "save_checkpoint",
    "save_packed",
    "stored_dtype",
]
