"""What a quantizer is: the weight grid (QuantSpec), the activation grid (ActSpec), integer ranges.

The bottom of the package: it imports nothing of blockquant, so every layer above can use it.
Every rule is checked in ``__post_init__`` and a broken rule raises ``ValueError`` naming the fix.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from typing import Any

SUPPORTED_BITS = (2, 3, 4, 8)
ACT_BITS = (4, 8)  # 16 on the command line means "activations stay in full precision" (no ActSpec)
SCALE_DTYPES = ("float32", "bfloat16", "float16")  # floating dtypes a checkpoint may store scales in


def int_range(bits: int, sym: bool) -> tuple[int, int]:
    """The integer codes a ``bits``-wide grid holds: signed around zero, or unsigned from 0 with a zero point."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)


@dataclass(frozen=True)
class QuantSpec:
    """A uniform affine weight quantizer (DESIGN.md §2).

    group_size: ``g >= 1`` groups of g input columns (the last group is shorter when g does
    not divide the width), ``-1`` one scale per output channel. ``per_tensor`` overrides both
    with a single scale for the whole weight (library only; the CLI does not expose it).

    scale_dtype: the dtype the scales will be stored in (``"bfloat16"``, ``"float16"`` or
    ``"float32"``). Every method rounds its scales to it before computing codes, so the
    fake-quant weights it evaluates are exactly the ones a checkpoint with scales in that dtype
    reloads. ``None``: ``blockquant.quantize`` sets the model's parameter dtype.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    per_tensor: bool = False
    scale_dtype: str | None = None

    def __post_init__(self) -> None:
        for name, hint in (("bits", int), ("group_size", int), ("sym", bool), ("per_tensor", bool)):
            if not fits(getattr(self, name), hint):  # sym="no" would be truthy: symmetric, silently
                raise ValueError(f"QuantSpec.{name} must be {type_words(hint)}, got {getattr(self, name)!r}")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of 2, 3, 4 or 8, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group size must be >= 1 (columns per group) or -1 (one scale per output channel), got {self.group_size}")
        if self.scale_dtype not in (None, *SCALE_DTYPES):
            raise ValueError(
                f"scale_dtype must be one of {', '.join(SCALE_DTYPES)} (the dtype the checkpoint stores scales in) or None, "
                f"got {self.scale_dtype!r}; pass the name, e.g. 'bfloat16', not a torch.dtype"
            )

    @property
    def qmin(self) -> int:
        return int_range(self.bits, self.sym)[0]

    @property
    def qmax(self) -> int:
        return int_range(self.bits, self.sym)[1]

    def describe(self) -> str:
        gran = "tensor" if self.per_tensor else ("channel" if self.group_size == -1 else f"g{self.group_size}")
        return f"W{self.bits} {gran} {'sym' if self.sym else 'asym'}"


@dataclass(frozen=True)
class ActSpec:
    """Fake quantization of every block linear's input (DESIGN.md §2 "Activations").

    granularity ``token``: one scale per token, computed at run time from the token itself
    (dynamic); ``tensor``: one scale per linear, fixed from the calibration inputs (static),
    from their min–max or from the ``percentile`` of their values (``range: percentile``).
    """

    bits: int = 8
    granularity: str = "token"  # "token" (dynamic) or "tensor" (static, calibrated)
    sym: bool = True
    range: str = "minmax"  # static ranges: "minmax" or "percentile"
    percentile: float = 99.99  # of |x| (sym) or of each tail (asym), with range: percentile

    def __post_init__(self) -> None:
        if self.bits not in ACT_BITS:
            raise ValueError(f"activation bits must be 4, 8 or 16 (16 = no activation quantization), got {self.bits}")
        if self.granularity not in ("token", "tensor"):
            raise ValueError(f"activation granularity must be 'token' (dynamic) or 'tensor' (static), got {self.granularity!r}")
        if self.range not in ("minmax", "percentile"):
            raise ValueError(f"activation range must be 'minmax' or 'percentile', got {self.range!r}")
        if not 50 < self.percentile <= 100:
            raise ValueError(f"activation percentile must be in (50, 100], e.g. 99.99, got {self.percentile}")

    @property
    def qmin(self) -> int:
        return int_range(self.bits, self.sym)[0]

    @property
    def qmax(self) -> int:
        return int_range(self.bits, self.sym)[1]

    def describe(self) -> str:
        kind = "token" if self.granularity == "token" else f"tensor {self.range}"
        return f"A{self.bits} {kind} {'sym' if self.sym else 'asym'}"


def act_spec(bits: int, granularity: str = "token", **kwargs: Any) -> ActSpec | None:
    """The ActSpec for ``--abits`` (None for 16: activations stay in full precision)."""
    if bits == 16:
        return None
    if bits not in ACT_BITS:
        raise ValueError(f"--abits must be 4, 8 or 16 (16 = activations stay in full precision), got {bits}")
    return ActSpec(bits, granularity, **kwargs)


def fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (from YAML or a flag) has the option's type: a string 'false' is not False, 1.5 not an int."""
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint in (str, type(None)):
        return isinstance(value, hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(fits(v, args[0]) for v in value)
    return True  # a type this check does not know: the options' own __post_init__ validates it


def type_words(hint: Any) -> str:
    """``fits``'s type in words, for the error message."""
    words = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", type(None): "null"}
    if hint in words:
        return words[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_words(a) for a in args)
    if origin is tuple:
        return f"a list of {type_words(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return str(hint)
