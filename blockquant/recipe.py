"""How to quantize: a Recipe is a weight spec and a chain of method steps, each with its options.

Built from a method name, a comma chain or a YAML file (``parse_recipe``), and changed by the
command line's flags only through ``with_options``, which returns a new, validated recipe.
Every rule is checked when a Step or Recipe is built and a broken rule raises ``ValueError``
with the fix, so the CLI, YAML files and the Python API all give the same message.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from blockquant.finetune import TrainConfig
from blockquant.methods import METHODS
from blockquant.spec import ActSpec, QuantSpec, act_spec, fits, type_words

TRAIN_OPTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig))  # what a fine-tuning method's ``train`` holds


@dataclass(frozen=True)
class Step:
    """One method of a recipe chain with its options dataclass (see ``methods.METHODS``)."""

    method: str
    options: Any

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self.options)}


@dataclass(frozen=True)
class Recipe:
    """What ``blockquant.quantize`` does: a weight spec and the chain of methods to apply."""

    spec: QuantSpec = field(default_factory=QuantSpec)
    steps: tuple[Step, ...] = ()
    act: ActSpec | None = None  # activation fake-quant of every block linear's input; None: full precision

    def __post_init__(self) -> None:
        if not isinstance(self.spec, QuantSpec):
            raise TypeError(f"Recipe.spec must be a QuantSpec, e.g. QuantSpec(bits=4, group_size=128), got {self.spec!r}")
        if not isinstance(self.steps, (list, tuple)) or not all(isinstance(step, Step) for step in self.steps):
            raise TypeError(f"Recipe.steps must be Step objects, e.g. [make_step('gptq')], got {self.steps!r}")
        object.__setattr__(self, "steps", tuple(self.steps))  # a list given is kept as a tuple: recipes do not change
        if not self.steps:
            raise ValueError("a recipe needs at least one method, e.g. 'rtn' or 'gptq'")
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
            "steps": [s.to_dict() for s in self.steps],
        }


def _check_order(names: list[str]) -> None:
    """Per-block steps are scale transforms (awq, smoothquant) followed by at most one rounding
    method (rtn, gptq, zeroquant, admm): a second rounding re-rounds weights already on the grid
    (``rtn,gptq`` is plain rtn) and a transform after the rounding rescales rounded weights."""
    per_block = [n for n in names if METHODS[n].stage == 0]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"recipe {','.join(names)}: {', '.join(twice)} appears more than once; each method runs once")
    stage = [METHODS[n].stage for n in names]
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


def _takes(options_cls: type) -> set[str]:
    """The option names a method takes; a fine-tuning method also takes its ``train`` settings by name."""
    names = {f.name for f in dataclasses.fields(options_cls)}
    return names | set(TRAIN_OPTIONS) if "train" in names else names


def make_step(method: str, options: dict[str, Any] | None = None) -> Step:
    """Build a Step, checking the method name, its option names and their types.

    A fine-tuning method's training settings (``steps``, ``lr_scale``, ``holdout`` …) may be given
    by name beside its other options, or nested under ``train``; they go into its ``TrainConfig``,
    over that method's own defaults.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(sorted(METHODS))}")
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options of method {method!r} must be a dict of option name to value, got {options!r}")
    options = dict(options or {})
    options_cls = METHODS[method].options
    known = _takes(options_cls)
    nested = options.pop("train", None) if "train" in known else None
    if nested is not None and not isinstance(nested, (dict, TrainConfig)):
        raise ValueError(f"option 'train' of method {method!r} must be a mapping of training settings, got {nested!r}")
    train = dataclasses.asdict(nested) if isinstance(nested, TrainConfig) else dict(nested or {})
    unknown = (set(options) | set(train)) - known - ({"train"} if "train" in known else set())
    unknown |= set(train) - set(TRAIN_OPTIONS)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(sorted(unknown))} for method {method!r}; it takes: {', '.join(sorted(known - {'train'})) or 'no options'}"
        )
    hints = typing.get_type_hints(options_cls) | typing.get_type_hints(TrainConfig)
    given = {**train, **options}
    for name, value in given.items():
        if not fits(value, hints[name]):
            raise ValueError(f"option {name!r} of method {method!r} must be {type_words(hints[name])}, got {value!r}")
    own = {k: v for k, v in given.items() if k not in TRAIN_OPTIONS}
    if "train" in known:
        default = options_cls().train
        own["train"] = dataclasses.replace(default, **{k: v for k, v in given.items() if k in TRAIN_OPTIONS})
    return Step(method, options_cls(**own))


def step_options(step: Step) -> dict[str, Any]:
    """A step's options by name, its training settings flattened beside the others (``make_step``'s input)."""
    flat = {f.name: getattr(step.options, f.name) for f in dataclasses.fields(step.options)}
    train = flat.pop("train", None)
    return flat | (dataclasses.asdict(train) if train is not None else {})


# Command-line flags that set an option of the recipe's steps, and the method each is for; a flag
# naming no method sets that option on the recipe's last step (the fine-tuning step).
FLAG_METHOD = {"alpha": "smoothquant", "fold": "smoothquant", "hw": "qft"}


def with_options(recipe: Recipe, given: dict[str, Any]) -> Recipe:
    """A new, validated recipe with option values from the command line (``--steps 50`` is
    ``{"steps": 50}``). ``alpha`` / ``fold`` go to every smoothquant step and ``hw`` to the qft
    step; every other option to the last step, which must take it. ``None`` values are not given."""
    given = {k: v for k, v in given.items() if v is not None}
    steps = list(recipe.steps)
    for method in sorted(set(FLAG_METHOD.values())):
        mine = {k: v for k, v in given.items() if FLAG_METHOD.get(k) == method}
        where = [i for i, st in enumerate(steps) if st.method == method]
        if mine and not where:
            raise ValueError(f"{_flags(mine)}: {method} option(s); put {method} in the recipe (e.g. --recipe {_example(method)})")
        for i in where if mine else []:
            steps[i] = make_step(method, step_options(steps[i]) | mine)
    rest = {k: v for k, v in given.items() if k not in FLAG_METHOD}
    last = steps[-1]
    takes = _takes(METHODS[last.method].options)
    wrong = [k for k in rest if k not in takes]
    if wrong:
        ft = [m for m in ("blockft", "lkd", "qft") if set(wrong) <= _takes(METHODS[m].options)]
        it = "it" if len(wrong) == 1 else "them"
        hint = f"; {' and '.join(ft)} take{'s' if len(ft) == 1 else ''} {it} (e.g. --recipe gptq,{ft[0]})" if ft else ""
        raise ValueError(f"{_flags(wrong)}: the recipe's last step {last.method} takes no such option{'' if len(wrong) == 1 else 's'}{hint}")
    if rest:
        steps[-1] = make_step(last.method, step_options(last) | rest)
    return dataclasses.replace(recipe, steps=tuple(steps))


FLAG_NAMES = {"fold": "--smooth-fold"}  # options whose flag is not --NAME


def _flags(names: Any) -> str:
    return ", ".join(FLAG_NAMES.get(n, "--" + n.replace("_", "-")) for n in names)


def _example(method: str) -> str:
    return {"smoothquant": "smoothquant", "qft": "gptq,qft"}.get(method, method)


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
            if key in data and not fits(data[key], hint):
                raise ValueError(f"recipe file {text}: {key} must be {type_words(hint)}, got {data[key]!r}")
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
