"""Dataclass configs: what to quantize to (QuantSpec) and how (Recipe = chain of method steps).

Every rule is checked in ``__post_init__`` and broken rules raise ``ValueError`` with the fix,
so the CLI, YAML files and the Python API all give the same message.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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
        for name, kind in (("bits", int), ("group_size", int), ("sym", bool), ("per_tensor", bool)):
            if not _fits(getattr(self, name), kind):  # sym="no" would be truthy: symmetric, silently
                raise ValueError(f"QuantSpec.{name} must be {_kind(kind)}, got {getattr(self, name)!r}")
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


@dataclass
class Step:
    """One method of a recipe chain with its options dataclass (see ``methods.METHODS``)."""

    method: str
    options: Any


@dataclass
class Recipe:
    """What ``blockquant.quantize`` does: a weight spec and the chain of methods to apply."""

    spec: QuantSpec = field(default_factory=QuantSpec)
    steps: list[Step] = field(default_factory=list)
    act: ActSpec | None = None  # activation fake-quant of every block linear's input; None: full precision

    def __post_init__(self) -> None:
        from blockquant.methods import METHODS

        if not isinstance(self.spec, QuantSpec):
            raise TypeError(f"Recipe.spec must be a QuantSpec, e.g. QuantSpec(bits=4, group_size=128), got {self.spec!r}")
        if not self.steps:
            raise ValueError("a recipe needs at least one method, e.g. 'rtn' or 'gptq'")
        if not all(isinstance(step, Step) for step in self.steps):
            raise TypeError(f"Recipe.steps must be Step objects, e.g. [make_step('gptq')], got {self.steps!r}")
        _check_order([s.method for s in self.steps])
        for step in self.steps:
            need = METHODS[step.method].activations
            if need and self.act is None:
                raise ValueError(f"{step.method} quantizes activations too: give --abits 8 (or 4), or abits: 8 in the recipe file")
            if need == "token" and self.act is not None and self.act.granularity != "token":
                raise ValueError(f"{step.method} uses token-wise dynamic activation quantization: use --act-granularity token")
            if METHODS[step.method].check is not None:
                METHODS[step.method].check(step.options, self.spec, self.act)

    @property
    def name(self) -> str:
        return ",".join(s.method for s in self.steps)

    def describe(self) -> str:
        return self.spec.describe() + (f" {self.act.describe()}" if self.act else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": dataclasses.asdict(self.spec),
            "act": None if self.act is None else dataclasses.asdict(self.act),
            "steps": [{"method": s.method, **dataclasses.asdict(s.options)} for s in self.steps],
        }


def _check_order(names: list[str]) -> None:
    """Per-block steps are scale transforms (awq, smoothquant) followed by at most one rounding
    method (rtn, gptq, zeroquant, admm): a second rounding re-rounds weights already on the grid
    (``rtn,gptq`` is plain rtn) and a transform after the rounding rescales rounded weights."""
    from blockquant.methods import METHODS

    per_block = [n for n in names if not (METHODS[n].windowed or METHODS[n].model_level)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"recipe {','.join(names)}: {', '.join(twice)} appears more than once; each method runs once")
    stage = [2 if METHODS[n].model_level else 1 if METHODS[n].windowed else 0 for n in names]
    if stage != sorted(stage) or stage.count(1) > 1:
        raise ValueError(
            f"recipe {','.join(names)}: per-block methods come first, then at most one fine-tuning step (blockft or lkd), "
            "then qft (e.g. awq,gptq,blockft,qft)"
        )
    rounding = [n for n in per_block if not METHODS[n].folds]
    if len(rounding) > 1:
        raise ValueError(
            f"recipe {','.join(names)}: {' and '.join(rounding)} both round the weights, and the second would only re-round "
            f"weights already on the grid; keep one (fine-tuning after rounding is blockft, lkd or qft, e.g. {rounding[-1]},blockft)"
        )
    late = [n for n in per_block[per_block.index(rounding[0]) + 1 :] if METHODS[n].folds] if rounding else []
    if late:
        raise ValueError(
            f"recipe {','.join(names)}: {late[0]} rescales weights before they are rounded; put it before {rounding[0]} "
            f"(e.g. {late[0]},{rounding[0]})"
        )


def make_step(method: str, options: dict[str, Any] | None = None) -> Step:
    """Build a Step, checking the method name and its option names."""
    from blockquant.methods import METHODS

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(sorted(METHODS))}")
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options of method {method!r} must be a dict of option name to value, got {options!r}")
    options_cls = METHODS[method].options
    known = {f.name for f in dataclasses.fields(options_cls)}
    unknown = set(options or {}) - known
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(sorted(unknown))} for method {method!r}; it takes: {', '.join(sorted(known)) or 'no options'}"
        )
    hints = typing.get_type_hints(options_cls)
    for name, value in (options or {}).items():
        if not _fits(value, hints[name]):
            raise ValueError(f"option {name!r} of method {method!r} must be {_kind(hints[name])}, got {value!r}")
    return Step(method, options_cls(**(options or {})))


def _fits(value: Any, hint: Any) -> bool:
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
        return any(_fits(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value)
    return True  # a type this check does not know: the options' own __post_init__ validates it


def _kind(hint: Any) -> str:
    """``_fits``'s type in words, for the error message."""
    words = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", type(None): "null"}
    if hint in words:
        return words[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_kind(a) for a in args)
    if origin is tuple:
        return f"a list of {_kind(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return str(hint)


# A recipe file's top-level keys and their types (``steps`` is checked item by item).
RECIPE_KEYS: dict[str, Any] = {
    "wbits": int,
    "group_size": int,
    "sym": bool,
    "abits": int,
    "act_granularity": str,
    "act_sym": bool,
    "act_range": str,
    "act_percentile": float,
    "steps": list,
}


# recipe-file keys that a command-line flag also sets
FILE_FLAGS = {"wbits": "--wbits", "group_size": "--group-size", "sym": "--sym", "abits": "--abits", "act_granularity": "--act-granularity"}


def parse_recipe(text: str, spec: QuantSpec, act: ActSpec | None = None, explicit: frozenset[str] = frozenset()) -> Recipe:
    """``text`` is a method name, a comma chain (``awq,gptq``) or a path to a YAML file.

    ``explicit`` names the ``FILE_FLAGS`` keys the caller set on purpose (``spec``/``act`` hold
    their values): a file naming another value for one of them is refused, since a quiet winner
    either way (``--wbits 4`` giving a 3-bit model) is a trap.

    YAML layout::

        wbits: 4            # optional; the file's value is used, and must agree with an explicit --wbits
        group_size: 128
        sym: false
        abits: 8            # optional: 4, 8 or 16 (no activation quantization)
        act_granularity: token   # or tensor (static); act_sym, act_range, act_percentile too
        steps:
          - method: gptq
            act_order: true
    """
    path = Path(text)
    if text.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ValueError(f"recipe file {text} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"recipe file {text} is not valid YAML: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
            raise ValueError(f"recipe file {text} needs a 'steps:' list of {{method: NAME, ...}}")
        unknown = sorted(set(data) - set(RECIPE_KEYS))
        if unknown:
            raise ValueError(f"recipe file {text}: unknown key(s) {', '.join(map(str, unknown))}; it takes {', '.join(RECIPE_KEYS)}")
        for key, hint in RECIPE_KEYS.items():
            if key in data and not _fits(data[key], hint):
                raise ValueError(f"recipe file {text}: {key} must be {_kind(hint)}, got {data[key]!r}")
        ours = {"wbits": spec.bits, "group_size": spec.group_size, "sym": spec.sym, "abits": 16 if act is None else act.bits}
        ours["act_granularity"] = None if act is None else act.granularity
        clash = [
            f"{FILE_FLAGS[k]} {ours[k]} against the file's {k}: {data[k]}"
            for k in FILE_FLAGS
            if k in explicit and k in data and data[k] != ours[k]
        ]
        if clash:
            raise ValueError(f"recipe file {text} and the command line disagree ({'; '.join(clash)}): give each value in one place")
        spec = dataclasses.replace(  # keeps the caller's scale_dtype
            spec,
            bits=data.get("wbits", spec.bits),
            group_size=data.get("group_size", spec.group_size),
            sym=data.get("sym", spec.sym),
        )
        act = _yaml_act(data, act)
        steps = []
        for item in data["steps"]:
            if isinstance(item, str):
                item = {"method": item}
            if not isinstance(item, dict) or "method" not in item:
                raise ValueError(f"recipe file {text}: each step needs 'method:', got {item!r}")
            opts = {k: v for k, v in item.items() if k != "method"}
            steps.append(make_step(str(item["method"]), opts))
        return Recipe(spec, steps, act)
    names = [n.strip() for n in text.split(",") if n.strip()]
    return Recipe(spec, [make_step(n) for n in names], act)


def _yaml_act(data: dict[str, Any], act: ActSpec | None) -> ActSpec | None:
    """A recipe file's ``abits`` / ``act_*`` keys over the command line's ActSpec."""
    keys = {"act_granularity": "granularity", "act_sym": "sym", "act_range": "range", "act_percentile": "percentile"}
    if "abits" not in data and not any(k in data for k in keys):
        return act
    base = dataclasses.asdict(act) if act is not None else {"bits": 16}
    base["bits"] = data.get("abits", base["bits"])
    base.update({field_: data[k] for k, field_ in keys.items() if k in data})
    bits = base.pop("bits")
    if bits == 16 and any(k in data for k in keys):
        raise ValueError("act_granularity / act_sym / act_range need abits: 8 or 4 in the recipe file")
    return act_spec(bits, **base)
