"""Layer-by-layer quantization of segmentation networks and their Dice (DESIGN.md §3 EfficientQ, §5).

The driver walks every conv / transposed conv / linear leaf in forward order (``convnet``).
Per layer: the input ``X`` is captured on the network whose earlier layers are already
quantized (a full forward pass with a hook, stopped at the layer: skip connections included),
``Y`` is the full-precision layer's output; the method (rtn, gptq, admm) writes the layer's
weights on the grid. Optional static 8-bit per-tensor activation quantization puts a quantizer
on every layer's input, its range from ``X`` before the layer is quantized. A recipe may end in
``qft`` (``admm,qft``): every layer's grid is then fine-tuned end to end (``methods.qft_conv``).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from blockquant import activations
from blockquant.api import peak_rss_mb
from blockquant.capture import relative_error
from blockquant.convnet import fold_batchnorm, layer_stats, layers_in_order, set_weight_matrix, weight_matrix
from blockquant.methods import admm, qft_conv
from blockquant.methods.gptq import GPTQOptions, gptq_quantize
from blockquant.methods.rtn import rtn_quantize
from blockquant.recipe import QuantSpec, Recipe

log = logging.getLogger(__name__)


class _Stop(Exception):
    pass


# ---------------------------------------------------------------- methods on one layer


def _rtn(layer: nn.Module, x: Tensor, y: Tensor, attention: Tensor | None, spec: QuantSpec, opts: Any, seed: int):
    col_weight = None
    if opts.clip_search and opts.input_weighted:
        col_weight = torch.diag(layer_stats(layer, x, seed=seed).gram)  # E[x²] per im2col column
    w_hat, scale, zero = rtn_quantize(weight_matrix(layer), spec, opts.clip_search, col_weight)
    return w_hat, scale, zero, None, {}


def _gptq(layer: nn.Module, x: Tensor, y: Tensor, attention: Tensor | None, spec: QuantSpec, opts: GPTQOptions, seed: int):
    """GPTQ on the im2col rows: ``H = 2/N Σ x xᵀ`` over (sampled) output positions."""
    stats = layer_stats(layer, x, seed=seed)
    h, w = 2 * stats.gram, weight_matrix(layer)
    tries = [True, False] if opts.clip_search == "auto" else [bool(opts.clip_search)]
    best = None
    for clip in tries:  # "auto": whichever range choice gives the lower calibration output error
        w_hat, scale, zero, _ = gptq_quantize(w, h, spec, replace(opts, clip_search=clip))
        err = relative_error(w, w_hat, h)
        if best is None or err < best[0]:
            best = (err, w_hat, scale, zero, clip)
    return best[1], best[2], best[3], None, {"positions": stats.rows, "of_positions": stats.total, "clip_search": best[4]}


LAYER_METHODS: dict[str, Callable] = {"rtn": _rtn, "gptq": _gptq, "admm": admm.quantize_layer}


# ---------------------------------------------------------------- the driver


@dataclass
class SegConfig:
    ends_bits: int | None = 8  # bits of the first layers (reading the input) and the last layer; None: the recipe's
    seed: int = 0  # position sampling of the Gram matrices
    progress: bool = True
    size_multiple: int = 1  # spatial sizes the network takes are multiples of this (QFT's training tiles keep it)
    tile_voxels: int = 2**17  # qft: the calibration volume is cut into tiles of at most this many voxels (training items)


@dataclass
class ConvLayerReport:
    name: str
    kind: str  # module class
    shape: list[int]  # weight shape
    bits: int
    error: float  # ‖layer(X) − Y‖² / ‖Y‖² on the calibration input, after quantization
    seconds: float
    info: dict = field(default_factory=dict)


@dataclass
class SegQuantResult:
    recipe: Recipe
    layers: list[ConvLayerReport] = field(default_factory=list)
    grids: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # name -> (scale, zero)
    folded: list[tuple[str, str]] = field(default_factory=list)  # (conv, batchnorm)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    activations: dict | None = None
    model_steps: dict[str, dict] = field(default_factory=dict)  # qft: its record (steps run, held-out loss, ...)

    def record(self) -> dict[str, Any]:
        spec = self.recipe.spec
        return {
            "quant_method": "blockquant",
            "method": self.recipe.name,
            "bits": spec.bits,
            "granularity": "tensor" if spec.per_tensor else "channel",
            "sym": spec.sym,
            "recipe": self.recipe.to_dict(),
            "batchnorm_folded": [list(p) for p in self.folded],
            "activations": self.activations,
            "seconds": round(self.seconds, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "model_steps": self.model_steps,
            "layers": {r.name: {k: v for k, v in asdict(r).items() if k != "name"} for r in self.layers},
        }


def check_recipe(recipe: Recipe) -> None:
    """Segmentation networks take one per-layer method (optionally followed by qft), per output channel or per tensor."""
    methods = [s.method for s in recipe.steps]
    if methods[0] not in LAYER_METHODS or len(methods) > 2 or (len(methods) == 2 and methods[1] != "qft"):
        first = ", ".join(LAYER_METHODS)
        raise ValueError(
            f"convolution networks are quantized by one of {first}, optionally followed by qft (e.g. admm,qft); got recipe {recipe.name!r}"
        )
    if len(methods) == 2:
        qft_conv.check(recipe.steps[1].options)
    if recipe.spec.group_size != -1 and not recipe.spec.per_tensor:
        raise ValueError(f"convolution layers are quantized per output channel: use --group-size -1 (got {recipe.spec.group_size})")
    if recipe.act is not None and recipe.act.granularity != "tensor":
        raise ValueError("activations of convolution networks are quantized per tensor with static ranges: use --act-granularity tensor")


def _capture(model: nn.Module, name: str, x: Tensor, output: bool = False) -> Tensor:
    """The input (or output) of layer ``name`` in a forward pass of ``model`` on ``x``, stopped there."""
    got: list[Tensor] = []

    def pre(_m: nn.Module, args: tuple) -> None:
        got.append(args[0].detach())
        raise _Stop

    def post(_m: nn.Module, _a: tuple, out: Tensor) -> None:
        got.append(out.detach())
        raise _Stop

    layer = model.get_submodule(name)
    handle = layer.register_forward_hook(post) if output else layer.register_forward_pre_hook(pre)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got[0]


def end_layers(model: nn.Module, order: list[str], x: Tensor) -> set[str]:
    """The first layers (those reading the network input itself) and the last layer in forward order."""
    firsts: list[str] = []

    def hook(name: str) -> Callable:
        return lambda _m, args: firsts.append(name) if args[0] is x else None

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in order]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return set(firsts) | {order[-1]}


@torch.no_grad()
def quantize_network(model: nn.Module, recipe: Recipe, calibration: Tensor, cfg: SegConfig | None = None) -> SegQuantResult:
    """Quantize ``model`` in place, layer by layer, on the calibration volume(s) ``(B, C, *S)``.

    BatchNorm is folded first. A method's returned bias (ADMM solves it jointly) replaces the
    layer's bias. The full-precision prediction on the calibration input gives the attention.
    """
    cfg = cfg or SegConfig()
    check_recipe(recipe)
    if cfg.size_multiple < 1 or cfg.tile_voxels < 1:
        raise ValueError(f"size_multiple and tile_voxels must be >= 1, got {cfg.size_multiple} and {cfg.tile_voxels}")
    step = recipe.steps[0]
    method = LAYER_METHODS[step.method]
    start = time.perf_counter()
    model.eval()
    calibration = calibration.float()
    result = SegQuantResult(recipe, folded=fold_batchnorm(model, calibration))
    order = layers_in_order(model, calibration)
    ends = end_layers(model, order, calibration) if cfg.ends_bits is not None else set()
    fp = copy.deepcopy(model)
    outputs: dict[str, Tensor] = {}
    hooks = [fp.get_submodule(n).register_forward_hook(lambda _m, _a, out, n=n: outputs.__setitem__(n, out.detach())) for n in order]
    logits = fp(calibration)  # (B, classes, *S)
    for h in hooks:
        h.remove()
    attention = admm.attention_map(logits.argmax(1), logits.shape[1])  # (B, *S); rtn and gptq do not read it
    specs: dict[str, QuantSpec] = {}
    bar = tqdm(order, desc=f"{recipe.name} {recipe.describe()}", unit="layer", disable=not cfg.progress)
    for name in bar:
        t0 = time.perf_counter()
        layer = model.get_submodule(name)
        spec = specs[name] = replace(recipe.spec, bits=cfg.ends_bits) if name in ends else recipe.spec
        x = _capture(model, name, calibration)
        if not torch.isfinite(x).all():
            raise ValueError(f"layer {name}: its calibration input holds NaN/Inf")
        if recipe.act is not None:
            lo, hi = float(x.min()), float(x.max())
            quantizer = activations.ActQuantizer(recipe.act, lo, hi)
            activations.add_input_quantizer(layer, quantizer)
            x = quantizer(x)
        y = outputs.pop(name)
        w = weight_matrix(layer)
        try:
            w_hat, scale, zero, bias, info = method(layer, x, y, attention, spec, step.options, cfg.seed)
        except ValueError as e:  # name the layer and what it saw: a tiny crop leaves deep layers a voxel or two
            raise ValueError(f"layer {name} (output {tuple(y.shape[2:])} on the calibration crop): {e}") from None
        set_weight_matrix(layer, w_hat)
        if bias is not None:
            layer.bias.data.copy_(bias.to(layer.bias.dtype))
        err = float(torch.sum((layer(x) - y) ** 2) / torch.sum(y**2).clamp(min=1e-30))
        result.grids[name] = (scale.cpu(), zero.cpu())
        kind = type(layer).__name__
        result.layers.append(ConvLayerReport(name, kind, list(layer.weight.shape), spec.bits, err, time.perf_counter() - t0, info))
        log.info(
            "%s (%s, W%d): relative output error %.3e, weight change %.3e", name, kind, spec.bits, err, float((w_hat - w).norm() / w.norm())
        )
        bar.set_postfix(err=f"{err:.2e}", rss_mb=f"{peak_rss_mb():.0f}")
    bar.close()
    if len(recipe.steps) == 2:  # qft: every layer's DoF fine-tuned jointly, end to end, from the grids just set
        t0 = time.perf_counter()
        result.grids, notes = qft_conv.apply(
            model,
            fp,
            calibration,
            attention,
            result.grids,
            specs,
            recipe.steps[1].options,
            recipe.act,
            cfg.size_multiple,
            cfg.tile_voxels,
            cfg.progress,
        )
        result.model_steps["qft"] = notes | {"seconds": round(time.perf_counter() - t0, 2)}
    result.activations = activations.record(model, recipe.act)
    result.seconds = time.perf_counter() - start
    result.peak_rss_mb = peak_rss_mb()
    return result
