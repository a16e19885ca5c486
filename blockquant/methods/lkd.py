"""LKD, ZeroQuant's layer-by-layer knowledge distillation (Yao et al. 2022, §4.3, eq. 4):

    L_LKD,k = MSE( L_k(X_{k−1}), L̂_k(X_{k−1}) ),  X_{k−1} = L_{k−1} ∘ … ∘ L_1(X)

The quantized block L̂_k is trained to reproduce the full-precision block L_k from the same
input, without the original training data; it runs as a window step after a rounding method
(``zeroquant,lkd``). LKD is block-wise fine-tuning with the same input on both sides, so it runs
``blockft``'s training (STE weights and LSQ step sizes, through the activation quantizers):
``input: fp`` feeds both the full-precision stream as in eq. 4; ``input: quantized`` feeds both
the quantized stream (the FP block's target is then taken on the quantized input).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from blockquant.capture import LayerResult, WindowContext
from blockquant.finetune import TrainConfig
from blockquant.methods import blockft
from blockquant.spec import QuantSpec


@dataclass(frozen=True)
class LKDOptions:
    # optimizer steps per block (one calibration batch each); lr_scale is relative to the block's mean step size
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100, lr_scale=1e-2, lr_weight=2e-2))
    input: str = "fp"  # "fp": both blocks read the full-precision stream (eq. 4); "quantized": both the quantized one

    window: ClassVar[int] = 1  # block by block: what the driver reads of a window step
    stride: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if not isinstance(self.train, TrainConfig):
            raise TypeError(f"train must be a TrainConfig, got {self.train!r}")
        if self.input not in ("fp", "quantized"):
            raise ValueError(f"lkd input must be 'fp' (the teacher's input, as in ZeroQuant) or 'quantized', got {self.input!r}")

    def blockft_options(self) -> blockft.BlockFTOptions:
        return blockft.BlockFTOptions(train=self.train, target="fp-input" if self.input == "fp" else "quantized-input")


def apply(ctx: WindowContext, spec: QuantSpec, opts: LKDOptions) -> dict[str, LayerResult]:
    """Distil each quantized block to its full-precision copy on the same input (blockft's loop)."""
    if opts.input == "fp":
        ctx = dataclasses.replace(ctx, q_inputs=ctx.fp_inputs)  # the student reads the teacher's input
    return blockft.apply(ctx, spec, opts.blockft_options(), label_prefix="lkd")
