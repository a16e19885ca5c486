"""The methods a recipe can chain, listed in one literal dict (no registry filled at import time).

A method is one file: an options dataclass and one function per kind of model it can work on.
Its entry says which of these it has:

- ``block(block, ctx: BlockContext, spec, options) -> {layer: LayerResult}``: quantizes one
  transformer block in place, given the block's captured calibration inputs (None for a method
  whose ``data_free(options)`` says it needs none, when the run has no calibration);
- ``window(ctx: WindowContext, spec, options) -> {full layer name: LayerResult}``: fine-tunes a
  window of consecutive transformer blocks that the earlier steps initialised;
- ``model(ctx: ModelContext, spec, options) -> {full layer name: LayerResult}``: the whole
  transformer, once, after every block (QFT: end-to-end fine-tuning);
- ``conv_layer(layer, x, y, attention, spec, options, seed) -> (Ŵ, scale, zero, bias | None, info)``:
  one layer of a convolution network, from its input ``x`` on the already-quantized network and
  the full-precision output ``y``;
- ``conv_model(ctx: NetworkContext, spec, options) -> {layer: (scale, zero)}``: the whole
  convolution network, once, after the layer-by-layer pass.

Adding a method is one file and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blockquant.methods import admm, awq, blockft, gptq, lkd, qft, qft_conv, rtn, smoothquant, zeroquant


@dataclass(frozen=True)
class Method:
    options: type
    summary: str
    block: Callable[..., dict[str, Any]] | None = None
    window: Callable[..., dict[str, Any]] | None = None
    model: Callable[..., dict[str, Any]] | None = None
    conv_layer: Callable[..., tuple] | None = None
    conv_model: Callable[..., dict[str, Any]] | None = None
    activations: str | None = None  # the recipe must quantize activations: "any" granularity, or "token" only
    folds: bool = False  # folds scales into each group's feeder: needs the table's feeder → linears mapping
    check: Callable[..., None] | None = None  # check(options, spec, act): refuses a recipe it cannot run, before any work
    data_free: Callable[[Any], bool] | None = None  # data_free(options): runs on a transformer block without calibration inputs

    @property
    def stage(self) -> int:
        """Where it sits in a chain: 0 per block / per layer, 1 a fine-tuning window, 2 the whole model."""
        return 2 if self.model or self.conv_model else 1 if self.window else 0

    def kinds(self) -> list[str]:
        """The kinds of model it works on, in words."""
        return [k for k, on in (("transformer", self.block or self.window or self.model), ("convolution network", self.conv_layer or self.conv_model)) if on]


METHODS: dict[str, Method] = {
    "rtn": Method(
        rtn.RTNOptions,
        "round-to-nearest, optional clipping search",
        block=rtn.apply,
        conv_layer=rtn.apply_conv,
        data_free=rtn.data_free,
    ),
    "gptq": Method(gptq.GPTQOptions, "GPTQ: Hessian-aware column-wise error feedback", block=gptq.apply, conv_layer=gptq.apply_conv),
    "awq": Method(awq.AWQOptions, "AWQ: activation-aware channel scales folded into the feeder, then a clip search", block=awq.apply, folds=True),
    "smoothquant": Method(
        smoothquant.SmoothQuantOptions,
        "SmoothQuant: migrate activation outliers into the weights (W8A8)",
        block=smoothquant.apply,
        activations="any",
        folds=True,
    ),
    "zeroquant": Method(
        zeroquant.ZeroQuantOptions, "ZeroQuant: group-wise weights, token-wise dynamic activations", block=zeroquant.apply, activations="token"
    ),
    "admm": Method(admm.ADMMOptions, "EfficientQ: per-layer ADMM with self-adaptive attention (convolution networks)", conv_layer=admm.apply_conv),
    "blockft": Method(blockft.BlockFTOptions, "block-wise fine-tuning (joint windows, downstream objectives)", window=blockft.apply),
    "lkd": Method(lkd.LKDOptions, "ZeroQuant's layer-by-layer distillation (block-wise fine-tuning's training)", window=lkd.apply),
    "qft": Method(
        qft.QFTOptions,
        "QFT: every quantization degree of freedom fine-tuned jointly, end to end, folded at the end",
        model=qft.apply,
        conv_model=qft_conv.apply,
        check=qft.check,
    ),
}
