"""Layer-by-layer quantization of networks without a chain of blocks: convolution networks such as
MONAI U-Nets with skip connections (DESIGN.md §3 EfficientQ, §4).

Every conv / transposed conv / linear leaf is walked in forward order (``convnet``). Per layer:
the input ``X`` is captured on the network whose earlier layers are already quantized (a full
forward pass with a hook, stopped at the layer: skip connections included), ``Y`` is the
full-precision layer's output; the method's ``conv_layer`` function writes the layer's weights on
the grid. Optional static per-tensor activation quantization puts a quantizer on every layer's
input, its range from ``X`` before the layer is quantized. A recipe may end in a whole-network
step (``admm,qft``): its ``conv_model`` function then fine-tunes every layer's grid end to end.
``blockquant.quantize`` calls this for any model that is not a transformer of ``arch.ARCHITECTURES``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from blockquant import activations
from blockquant.capture import LayerResult
from blockquant.convnet import NetworkContext, fold_batchnorm, layers_in_order, size_multiple
from blockquant.device import peak_rss_mb
from blockquant.layers import set_weight_matrix, weight_matrix
from blockquant.methods import METHODS, admm
from blockquant.recipe import Recipe
from blockquant.report import QuantResult
from blockquant.spec import QuantSpec

log = logging.getLogger(__name__)


class _Stop(Exception):
    pass


def check_recipe(recipe: Recipe) -> None:
    """A convolution network takes one per-layer method (optionally followed by a whole-network
    step such as qft), per output channel or per tensor, with static activation ranges."""
    methods = [s.method for s in recipe.steps]
    layer_methods = [m for m, e in METHODS.items() if e.conv_layer]
    if methods[0] not in layer_methods or any(not METHODS[m].conv_model for m in methods[1:]) or len(methods) > 2:
        others = [m for m in methods if not (METHODS[m].conv_layer or METHODS[m].conv_model)]
        why = f"{', '.join(others)} {'works' if len(others) == 1 else 'work'} on transformer blocks only; " if others else ""
        raise ValueError(
            f"{why}convolution networks are quantized by one of {', '.join(layer_methods)}, optionally followed by "
            f"{', '.join(m for m, e in METHODS.items() if e.conv_model)} (e.g. admm,qft); got recipe {recipe.name!r}"
        )
    if len(methods) == 2 and recipe.steps[1].method == "qft":
        from blockquant.methods import qft_conv

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
def quantize_layers(
    model: nn.Module, recipe: Recipe, calibration: Tensor, result: QuantResult, ends_bits: int | None, seed: int, progress: bool
) -> None:
    """Quantize ``model`` in place, layer by layer, on the calibration images ``(B, C, *S)``.

    BatchNorm is folded first. A method's returned bias (ADMM solves it jointly) replaces the
    layer's bias. The full-precision prediction on the calibration input gives the attention.
    ``ends_bits``: bits of the first layers (those reading the input) and the last; None: the recipe's.
    """
    check_recipe(recipe)
    step = recipe.steps[0]
    method = METHODS[step.method].conv_layer
    model.eval()
    result.batchnorm_folded = fold_batchnorm(model, calibration)
    order = layers_in_order(model, calibration)
    ends = end_layers(model, order, calibration) if ends_bits is not None else set()
    fp = copy.deepcopy(model)
    outputs: dict[str, Tensor] = {}
    hooks = [fp.get_submodule(n).register_forward_hook(lambda _m, _a, out, n=n: outputs.__setitem__(n, out.detach())) for n in order]
    logits = fp(calibration)  # (B, classes, *S)
    for h in hooks:
        h.remove()
    attention = admm.attention_map(logits.argmax(1), logits.shape[1])  # (B, *S); rtn and gptq do not read it
    specs: dict[str, QuantSpec] = {}
    bar = tqdm(order, desc=f"{recipe.name} {recipe.describe()}", unit="layer", disable=not progress)
    for name in bar:
        t0 = time.perf_counter()
        layer = model.get_submodule(name)
        spec = specs[name] = dataclasses.replace(recipe.spec, bits=ends_bits) if name in ends else recipe.spec
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
            with result.timing(step.method):
                w_hat, scale, zero, bias, info = method(layer, x, y, attention, spec, step.options, seed)
        except ValueError as e:  # name the layer and what it saw: a tiny crop leaves deep layers a voxel or two
            raise ValueError(f"layer {name} (output {tuple(y.shape[2:])} on the calibration crop): {e}") from None
        set_weight_matrix(layer, w_hat)
        if bias is not None:
            layer.bias.data.copy_(bias.to(layer.bias.dtype))
        err = float(torch.sum((layer(x) - y) ** 2) / torch.sum(y**2).clamp(min=1e-30))
        kind = type(layer).__name__
        info = {"kind": kind, "shape": list(layer.weight.shape), **info}
        result.layers[name] = LayerResult(scale.cpu(), zero.cpu(), None, err, spec.bits, time.perf_counter() - t0, info)
        log.info(
            "%s (%s, W%d): relative output error %.3e, weight change %.3e", name, kind, spec.bits, err, float((w_hat - w).norm() / w.norm())
        )
        bar.set_postfix(err=f"{err:.2e}", rss_mb=f"{peak_rss_mb():.0f}")
    bar.close()
    for step in recipe.steps[1:]:  # a whole-network step (qft): every layer's DoF fine-tuned jointly, end to end
        grids = {n: (r.scale, r.zero) for n, r in result.layers.items()}
        ctx = NetworkContext(model, fp, calibration, attention, grids, specs, recipe.act, size_multiple(model), progress)
        t0 = time.perf_counter()
        with result.timing(step.method):
            grids = METHODS[step.method].conv_model(ctx, recipe.spec, step.options)
        for n, (scale, zero) in grids.items():
            result.layers[n] = dataclasses.replace(result.layers[n], scale=scale, zero=zero)
        result.model_steps[step.method] = ctx.notes | {"seconds": round(time.perf_counter() - t0, 2)}
