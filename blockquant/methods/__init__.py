"""The methods a recipe can chain, listed in one literal dict (no registry, no import magic).

A method is an options dataclass plus ``apply(block, ctx, spec, options) -> {layer: LayerResult}``
that quantizes one block in place, given the block's captured calibration inputs; a windowed
method's ``apply(window_ctx, spec, options) -> {full layer name: LayerResult}`` fine-tunes a
window of consecutive blocks that the earlier steps initialised.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blockquant.methods import blockft, gptq, rtn


@dataclass(frozen=True)
class Method:
    options: type
    apply: Callable[..., dict[str, Any]]
    summary: str
    windowed: bool = False  # apply(window_ctx, spec, options): trains a window of blocks, last in a recipe


METHODS: dict[str, Method] = {
    "rtn": Method(rtn.RTNOptions, rtn.apply, "round-to-nearest, optional clipping search"),
    "gptq": Method(gptq.GPTQOptions, gptq.apply, "GPTQ: Hessian-aware column-wise error feedback"),
    "blockft": Method(
        blockft.BlockFTOptions, blockft.apply, "block-wise fine-tuning (joint windows, downstream objectives)", windowed=True
    ),
}
