"""ZeroQuant (Yao et al. 2022, "ZeroQuant: Efficient and Affordable Post-Training Quantization for
Large-Scale Transformers", §4.1–4.2): group-wise weight quantization with token-wise dynamic
activation quantization, and LKD, layer-by-layer knowledge distillation (§4.3, eq. 4):

    L_LKD,k = MSE( L_k(X_{k−1}), L̂_k(X_{k−1}) ),  X_{k−1} = L_{k−1} ∘ … ∘ L_1(X)

— the quantized block L̂_k is trained to reproduce the full-precision block L_k from the same
input, without the original training data. ``zeroquant`` is the first part (min–max group-wise
weights; the recipe must quantize activations per token); ``lkd`` the second, run as a window
step after it (``zeroquant,lkd``). LKD is block-wise fine-tuning with the same input on both
sides, so it runs ``blockft``'s training (``finetune.train``, STE weights and LSQ step sizes,
through the activation quantizers): ``input: fp`` feeds both the full-precision stream as in
eq. 4; ``input: quantized`` feeds both the quantized stream (the FP block's target is then
taken on the quantized input).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from blockquant.capture import BlockContext, LayerResult, WindowContext
from blockquant.methods import blockft, rtn
from blockquant.recipe import QuantSpec


@dataclass
class ZeroQuantOptions:
    pass  # min–max group-wise weights; the group size and symmetry are the recipe's


def apply(block: nn.Module, ctx: BlockContext, spec: QuantSpec, opts: ZeroQuantOptions) -> dict[str, LayerResult]:
    return rtn.apply(block, ctx, spec, rtn.RTNOptions(clip_search=False))


@dataclass
class LKDOptions:
    steps: int = 100  # optimizer steps per block, one calibration batch each
    lr_scale: float = 1e-2  # step sizes and zero points, relative to the block's mean step size (any bit width)
    lr_weight: float = 2e-2  # master weights, in code units of the initial grid
    input: str = "fp"  # "fp": both blocks read the full-precision stream (eq. 4); "quantized": both the quantized one
    holdout: float = 0.1
    eval_every: int = 25
    patience: int = 4

    def __post_init__(self) -> None:
        if self.input not in ("fp", "quantized"):
            raise ValueError(f"lkd input must be 'fp' (the teacher's input, as in ZeroQuant) or 'quantized', got {self.input!r}")
        self.blockft_options()  # validates the training options

    window = 1  # layer by layer: the api loop reads these of a window step
    stride = 1

    def blockft_options(self) -> blockft.BlockFTOptions:
        return blockft.BlockFTOptions(
            steps=self.steps,
            lr_scale=self.lr_scale,
            lr_weight=self.lr_weight,
            target="fp-input" if self.input == "fp" else "quantized-input",
            holdout=self.holdout,
            eval_every=self.eval_every,
            patience=self.patience,
        )


def apply_lkd(ctx: WindowContext, spec: QuantSpec, opts: LKDOptions) -> dict[str, LayerResult]:
    """Distil each quantized block to its full-precision copy on the same input (blockft's loop)."""
    if opts.input == "fp":
        ctx = dataclasses.replace(ctx, q_inputs=ctx.fp_inputs)  # the student reads the teacher's input
    return blockft.apply(ctx, spec, opts.blockft_options())
