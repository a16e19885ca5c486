"""The methods a recipe can chain, listed in one literal dict (no registry, no import magic).

A method is an options dataclass plus ``apply(block, ctx, spec, options) -> {layer: LayerResult}``
that quantizes one block in place, given the block's captured calibration inputs; a windowed
method's ``apply(window_ctx, spec, options) -> {full layer name: LayerResult}`` fine-tunes a
window of consecutive blocks that the earlier steps initialised; a model-level method's
``apply(model_ctx, spec, options) -> {full layer name: LayerResult}`` runs once, after every
block, on the whole model (QFT: end-to-end fine-tuning).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blockquant.methods import admm, awq, blockft, gptq, qft, rtn, smoothquant, zeroquant


@dataclass(frozen=True)
class Method:
    options: type
    apply: Callable[..., dict[str, Any]]
    summary: str
    windowed: bool = False  # apply(window_ctx, spec, options): trains a window of blocks, last in a recipe
    activations: str | None = None  # the recipe must quantize activations: "any" granularity, or "token" only
    folds: bool = False  # folds scales into each group's feeder: needs the table's feeder → linears mapping
    model_level: bool = False  # apply(model_ctx, spec, options): the whole model, once, after every block's steps
    check: Callable[..., None] | None = None  # check(options, spec, act): refuses a recipe it cannot run, before any work


METHODS: dict[str, Method] = {
    "rtn": Method(rtn.RTNOptions, rtn.apply, "round-to-nearest, optional clipping search"),
    "gptq": Method(gptq.GPTQOptions, gptq.apply, "GPTQ: Hessian-aware column-wise error feedback"),
    "admm": Method(admm.ADMMOptions, admm.apply, "EfficientQ: per-layer ADMM with self-adaptive attention (convolution networks)"),
    "blockft": Method(
        blockft.BlockFTOptions, blockft.apply, "block-wise fine-tuning (joint windows, downstream objectives)", windowed=True
    ),
    "awq": Method(awq.AWQOptions, awq.apply, "AWQ: activation-aware channel scales folded into the feeder, then a clip search", folds=True),
    "smoothquant": Method(
        smoothquant.SmoothQuantOptions,
        smoothquant.apply,
        "SmoothQuant: migrate activation outliers into the weights (W8A8)",
        activations="any",
        folds=True,
    ),
    "zeroquant": Method(
        zeroquant.ZeroQuantOptions, zeroquant.apply, "ZeroQuant: group-wise weights, token-wise dynamic activations", activations="token"
    ),
    "lkd": Method(zeroquant.LKDOptions, zeroquant.apply_lkd, "ZeroQuant's layer-by-layer distillation (blockft's training)", windowed=True),
    "qft": Method(
        qft.QFTOptions,
        qft.apply,
        "QFT: every quantization degree of freedom fine-tuned jointly, end to end, folded at the end",
        model_level=True,
        check=qft.check,
    ),
}
