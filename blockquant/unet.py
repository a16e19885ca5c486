"""MONAI networks on disk and the volumes they read: the layout of ``shared/subjects/lits-unet``.

A network directory holds ``unet_config.json`` (the constructor's arguments under a key naming
the class, e.g. ``"monai_unet": {...}``, and optionally ``"intensity"``, the preprocessing
expression) and ``model.safetensors`` (its state dict). A quantized directory has the same two
files (folded BatchNorms become exact identities, so any MONAI install loads it), plus
``quantization.safetensors`` (per layer ``weight_scale`` / ``weight_zero_point``: the integer
codes are ``round(W / scale) + zero``) and ``blockquant.json``, the record of what was done.

Volumes are ``.npz`` / ``.npy`` arrays or NIfTI (``.nii``, ``.nii.gz``, through nibabel).
"""

from __future__ import annotations

import ast
import json
import math
import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from blockquant.files import RECORD_FILE, atomic_dir

CONFIG_FILE = "unet_config.json"
WEIGHTS_FILE = "model.safetensors"
GRIDS_FILE = "quantization.safetensors"
NETWORKS = {"monai_unet": "UNet", "monai_basicunet": "BasicUNet"}  # config key -> monai.networks.nets class
PRESETS = {"none": "HU", "ct-abdomen": "clip((HU+200)/500, 0, 1)", "unit": "clip(HU, 0, 1)"}
IMAGE_KEYS, LABEL_KEYS = ("img", "image", "vol", "volume", "x"), ("lab", "label", "labels", "seg", "mask", "y")


def is_network_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_config(model_dir: str | Path) -> tuple[dict[str, Any], str]:
    """The directory's config and the key of the network in it."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{model_dir} is not a MONAI network directory: it has no {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    keys = [k for k in NETWORKS if isinstance(config, dict) and isinstance(config.get(k), dict)]
    if not keys:
        raise ValueError(f"{path} names no network: it needs one of {', '.join(NETWORKS)} with the constructor's arguments")
    return config, keys[0]


def load_network(model_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The MONAI network of a directory, fp32, eval mode, and its config."""
    config, key = read_config(model_dir)
    try:
        from monai.networks import nets
    except ImportError:
        raise ValueError("MONAI networks need the unet extra: pip install -c constraints.txt -e '.[unet]'") from None
    try:
        model = getattr(nets, NETWORKS[key])(**config[key])
    except (TypeError, ValueError, AssertionError) as e:
        raise ValueError(f"cannot build {NETWORKS[key]} from {CONFIG_FILE}: {e}") from None
    weights = Path(model_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{model_dir} has no {WEIGHTS_FILE} (the network's state dict)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError, OSError) as e:
        detail = " ".join(str(e).split())  # torch's state-dict report spans lines: keep the keys and shapes it names
        raise ValueError(f"cannot load {weights}: {detail[:500]}{' ...' if len(detail) > 500 else ''}") from None
    return model.float().eval(), config


def size_multiple(config: dict[str, Any]) -> int:
    """Each spatial size must be a multiple of this to pass every down- and up-sampling level."""
    key = next(k for k in NETWORKS if k in config)
    if key == "monai_unet":
        return math.prod(int(s) if isinstance(s, int) else int(max(s)) for s in config[key]["strides"])
    return 16  # BasicUNet: four 2x poolings


def size_problem(config: dict[str, Any], sizes: tuple[int, ...]) -> str | None:
    """Why a volume of spatial ``sizes`` cannot pass the network in one piece (None when it can):
    each size must pass every level, and instance normalisation needs more than one voxel at the
    deepest level (MONAI's default norm for both networks)."""
    m = size_multiple(config)
    if any(s % m for s in sizes):
        return f"each size must be a multiple of {m}"
    net = config[next(k for k in NETWORKS if k in config)]
    norm = net.get("norm", "instance")
    if str(norm[0] if isinstance(norm, (list, tuple)) else norm).lower().startswith("instance") and math.prod(s // m for s in sizes) < 2:
        return f"the network's instance norms need more than one voxel at its deepest level (size / {m} on each axis): make one size at least {2 * m}"
    return None


def save_network(
    model: nn.Module,
    config: dict[str, Any],
    out_dir: str | Path,
    record: dict[str, Any],
    grids: dict[str, tuple[Tensor, Tensor]],
    overwrite: bool,
) -> None:
    """Config + state dict (+ grids and record), written to a temporary sibling and renamed."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    grid_tensors = {}
    for name, (scale, zero) in grids.items():
        grid_tensors[f"{name}.weight_scale"] = scale.float().contiguous()
        grid_tensors[f"{name}.weight_zero_point"] = zero.float().contiguous()
    with atomic_dir(out_dir, overwrite) as tmp:
        cfg = {k: v for k, v in config.items() if k not in ("eval_dice",)}  # scores of the source network no longer hold
        cfg["quantization"] = {k: record[k] for k in ("method", "bits", "granularity", "sym") if k in record}
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=1))
        save_file(state, str(tmp / WEIGHTS_FILE))
        save_file(grid_tensors, str(tmp / GRIDS_FILE))
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1))


# ---------------------------------------------------------------- volumes


def read_array(path: str | Path, keys: tuple[str, ...], key: str | None, what: str) -> np.ndarray:
    """An array from ``.npz`` (``key`` or the first of ``keys`` present), ``.npy`` or NIfTI."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} file {p} does not exist")
    name = p.name.lower()
    if not name.endswith((".npz", ".npy", ".nii", ".nii.gz")):
        raise ValueError(f"{what} file {p}: unknown format; use .npz, .npy, .nii or .nii.gz")
    array, files = None, []
    try:
        if name.endswith(".npz"):
            with np.load(p) as data:
                files = list(data.files)
                only = files[0] if len(files) == 1 and what == "image" else None  # a lone array is an image, never labels
                pick = key or next((k for k in keys if k in files), only)
                array = np.asarray(data[pick]) if pick in files else None
        elif name.endswith(".npy"):
            array = np.load(p)
        else:
            import nibabel

            array = np.asarray(nibabel.load(str(p)).get_fdata(dtype=np.float32))
    except Exception as e:  # a truncated zip, a file that is not NIfTI, pickled data: what the reader says, in one line
        raise ValueError(f"cannot read {what} file {p}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if array is None:
        flag = f"--{what.split()[0]}-key"
        if key:
            raise ValueError(f"{p} has no array {key!r} ({flag}); it has {', '.join(files) or 'none'}")
        raise ValueError(f"{p} has arrays {', '.join(files) or '(none)'}; name the {what} with {flag}")
    return array


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv, ast.Pow: operator.pow}
_FUNCS = {"clip": np.clip, "abs": np.abs, "minimum": np.minimum, "maximum": np.maximum, "exp": np.exp, "log": np.log, "sqrt": np.sqrt}


def intensity(expr: str) -> Callable[[np.ndarray], np.ndarray]:
    """A preprocessing preset name or an arithmetic expression of ``HU`` (the raw voxel values).

    Numbers are float32, so the expression costs what its array operations cost (``9**9**9**9``
    is inf, not an integer too big to ever finish computing), and it may come from an untrusted
    ``unet_config.json``: only names, numbers, arithmetic and a few numpy functions are evaluated.
    """
    if not isinstance(expr, str):
        raise ValueError(f"the intensity expression must be a string (an expression of HU or a preset name), got {expr!r}")
    text = PRESETS.get(expr, expr)
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ValueError(
            f"intensity expression {expr!r} is not valid; e.g. 'clip((HU+200)/500, 0, 1)' or a preset: {', '.join(PRESETS)}"
        ) from None

    def ev(node: ast.AST, hu: np.ndarray) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body, hu)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return np.float32(node.value)
        if isinstance(node, ast.Name) and node.id in ("HU", "x"):
            return hu
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left, hu), ev(node.right, hu))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand, hu)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS and not node.keywords:
            return _FUNCS[node.func.id](*[ev(a, hu) for a in node.args])
        raise ValueError(f"intensity expression {expr!r}: only HU, numbers, + - * / ** and {', '.join(_FUNCS)} are allowed")

    def apply(hu: np.ndarray) -> np.ndarray:
        try:
            with np.errstate(all="ignore"):  # 1/HU at HU = 0 is inf, as numpy says; not a warning per volume
                return np.asarray(ev(tree, np.asarray(hu, dtype=np.float32)), dtype=np.float32)
        except (ArithmeticError, TypeError) as e:  # exp(), clip(HU, 0, 1, 2, 3): a call numpy refuses
            raise ValueError(f"intensity expression {expr!r} cannot be evaluated: {e}") from None

    apply(np.zeros(1, dtype=np.float32))  # validate once
    if not any(isinstance(n, ast.Name) and n.id in ("HU", "x") for n in ast.walk(tree)):
        raise ValueError(f"intensity expression {expr!r} does not use HU, the voxel values")
    return apply


def parse_region(text: str | None, ndim: int) -> tuple[slice, ...]:
    """``"a:b"`` (first spatial axis) or ``"a:b,c:d,e:f"``; empty bounds are open."""
    if not text:
        return (slice(None),) * ndim
    parts = text.split(",")
    if len(parts) > ndim:
        raise ValueError(f"region {text!r} has {len(parts)} axes; the volume has {ndim}")
    out = []
    for part in parts:
        bounds = part.strip().split(":")
        try:
            if len(bounds) != 2:
                raise ValueError
            out.append(slice(int(bounds[0]) if bounds[0] else None, int(bounds[1]) if bounds[1] else None))
        except ValueError:
            raise ValueError(f"region {text!r}: each axis is START:STOP, e.g. 24:88 or 96:") from None
    return tuple(out) + (slice(None),) * (ndim - len(out))


def network_input(volume: np.ndarray, config: dict[str, Any], region: tuple[slice, ...], what: str, whole: bool = True) -> Tensor:
    """``(1, C, *S)`` tensor of a preprocessed volume's region, checked against the network
    (``whole``: the network takes it in one pass, so each size must pass every level)."""
    net = config[next(k for k in NETWORKS if k in config)]
    dims, channels = int(net["spatial_dims"]), int(net["in_channels"])
    if volume.ndim == dims:
        volume = volume[None]
    if volume.ndim != dims + 1:
        raise ValueError(
            f"{what} volume has shape {volume.shape}; the network takes {dims}-D volumes (with an optional channel axis first)"
        )
    if volume.shape[0] != channels:
        raise ValueError(f"{what} volume has {volume.shape[0]} channels but the network takes {channels} (in_channels)")
    x = volume[(slice(None), *region)]
    if x.size == 0:
        raise ValueError(f"{what} region is empty: the volume's spatial shape is {volume.shape[1:]}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} volume holds NaN/Inf values after preprocessing; nothing valid to run the network on")
    if float(x.max()) == float(x.min()):
        raise ValueError(f"{what} volume is constant ({float(x.min()):g} everywhere after preprocessing): nothing to calibrate on")
    if whole and (problem := size_problem(config, x.shape[1:])):
        m = size_multiple(config)
        fix = tuple(s - s % m or m for s in x.shape[1:])
        hint = f"; crop to e.g. {fix}" if fix != tuple(x.shape[1:]) else ""
        if hint and size_problem(config, fix):
            hint += f" with one size at least {2 * m}"
        raise ValueError(f"{what} spatial size {tuple(x.shape[1:])} cannot pass the network: {problem}{hint}")
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]


def check_labels(labels: np.ndarray, out_channels: int) -> np.ndarray:
    if not np.isfinite(labels).all() or (labels != np.round(labels)).any() or labels.min() < 0:
        raise ValueError("the label map must hold non-negative integer classes")
    top = int(labels.max())
    if top >= out_channels:
        raise ValueError(f"the label map holds class {top} but the network outputs {out_channels} classes (0..{out_channels - 1})")
    return labels.astype(np.int64)


def parse_classes(text: str | None, out_channels: int) -> dict[str, tuple[int, ...]]:
    """``"liver=1,2;tumour=2"``; default: class c counts labels >= c (nested regions, as in LiTS)."""
    if not text:
        return {f"class{c}": tuple(range(c, out_channels)) for c in range(1, out_channels)}
    out = {}
    for item in text.split(";"):
        name, _, labels = item.partition("=")
        try:
            values = tuple(int(v) for v in labels.split(","))
        except ValueError:
            raise ValueError(f"--classes {text!r}: each entry is NAME=L1,L2 (e.g. liver=1,2;tumour=2)") from None
        if not name.strip() or any(not 0 <= v < out_channels for v in values):
            raise ValueError(f"--classes {text!r}: names must be non-empty and labels in 0..{out_channels - 1}")
        out[name.strip()] = values
    return out
