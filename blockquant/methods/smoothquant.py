"""SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models", eq. 4): migrate activation outliers into the weights before W8A8.

Per group of linears sharing an input X with an exact feeder (architecture table):
``s_j = max|X_j|^α / max|W_j|^(1−α)`` (max over calibration tokens, and over the output rows of
every linear of the group), folded exactly (``fold.fold_scales``): the feeder's output channels —
a LayerNorm/RMSNorm's weight (and a LayerNorm's bias), or a linear's rows and bias — are divided
by s, the linears' input columns multiplied by it. Then the weights are quantized with the recipe's
spec (RTN; int8 per output channel is ``--wbits 8 --group-size -1``) and the recipe's activation
quantizer reads the smoothed inputs. Note: α = 0 is not "no smoothing" under eq. 4 — it sets
s = 1/max|W_j|, moving the weights' range into the activations; α = 0.5 balances the two maxima.

BERT-style post-norm blocks read LayerNorm outputs that are also the residual, so no exact fold
reaches their outliers; ``fold: quantizer`` smooths those groups too by keeping s⁻¹ in front of
the linears' input quantizer — a per-channel factor that a deployment must fuse into the kernel
quantizing that activation (e.g. the LayerNorm's int8 output); the dequantized checkpoint layout
stores it beside the weights (``activations.SMOOTHING_FILE``).

``alpha: auto`` sweeps ``alphas`` per block: each candidate is smoothed, quantized (weights and
activations) on a copy, fitted on the first calibration batches and scored by the block's output
error against the full-precision block on held-out calibration batches; the best is applied.
Under several processes the statistics are reduced over the processes and the sweep adds up its
errors over them, so every process applies the same α as one process would.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from blockquant import activations, dist
from blockquant.capture import BlockContext, BlockInputs, LayerResult, collect_input_stats, run_block
from blockquant.fold import fold_problem, fold_scales
from blockquant.layers import set_weight_matrix, weight_matrix
from blockquant.methods import rtn
from blockquant.spec import QuantSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SmoothQuantOptions:
    alpha: float | str = 0.5  # migration strength in [0, 1] (0.8–0.9 for Llama-like models), or "auto"
    alphas: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # the "auto" sweep
    holdout: float = 0.25  # share of calibration batches that score the sweep
    fit_batches: int = 4  # calibration batches the sweep smooths and calibrates on (at most)
    fold: str = "exact"  # "exact": only groups with a feeder to fold into; "quantizer": the others too, s⁻¹ in their input quantizer

    def __post_init__(self) -> None:
        if self.alpha != "auto" and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1):
            raise ValueError(
                f"smoothquant alpha must be in [0, 1] (0.5 default, 0.8-0.9 for Llama-like models) or 'auto', got {self.alpha!r}"
            )
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))  # YAML gives a list
        if not self.alphas or any(not 0 <= a <= 1 for a in self.alphas):
            raise ValueError(f"smoothquant alphas (the auto sweep) must be values in [0, 1], got {self.alphas}")
        if not 0 < self.holdout < 1:
            raise ValueError(f"smoothquant holdout must be in (0, 1), got {self.holdout}")
        if self.fold not in ("exact", "quantizer"):
            raise ValueError(f"smoothquant fold must be 'exact' (into the feeding norm / linear) or 'quantizer', got {self.fold!r}")
        if self.fit_batches < 1:
            raise ValueError(f"smoothquant fit_batches must be >= 1, got {self.fit_batches}")


def smoothing_scales(x_absmax: Tensor, w_absmax: Tensor, alpha: float) -> Tensor:
    """Eq. 4: ``s_j = max|X_j|^α / max|W_j|^(1−α)`` (C,); 1 on dead channels."""
    x, w = x_absmax.float(), w_absmax.float()
    s = x.pow(alpha) / w.pow(1 - alpha)
    dead = (x == 0) | (w == 0) | ~torch.isfinite(s)
    return torch.where(dead, torch.ones_like(s), s.clamp(min=1e-5))


@torch.no_grad()
def smooth(block: nn.Module, ctx: BlockContext, inputs: BlockInputs, alpha: float, fold: str = "exact") -> list[str]:
    """Apply the eq. 4 scales of ``block``'s groups (stats from ``inputs``); the linears smoothed.

    Groups with an exact feeder fold s⁻¹ into it; with ``fold="quantizer"`` the others keep s⁻¹
    in front of their input quantizer (``activations.smooth_input``).
    """
    groups = [g for g in ctx.groups if fold == "quantizer" or fold_problem(block, g) is None]
    if not groups:
        return []
    stats = collect_input_stats(block, inputs, {g.linears[0]: ctx.linear(block, g.linears[0]) for g in groups}, max_tokens=1)
    for group in groups:
        w_absmax = torch.stack([weight_matrix(ctx.linear(block, n)).abs().amax(0) for n in group.linears]).amax(0)
        s = smoothing_scales(stats[group.linears[0]].absmax, w_absmax, alpha)
        if fold_problem(block, group) is None:
            fold_scales(block, group, s)
            continue
        for name in group.linears:  # W·diag(s) here, x/s in front of the input quantizer
            layer = ctx.linear(block, name)
            set_weight_matrix(layer, weight_matrix(layer) * s.unsqueeze(0))
            activations.smooth_input(layer, s)
    return [n for g in groups for n in g.linears]


@torch.no_grad()
def sweep(block: nn.Module, ctx: BlockContext, spec: QuantSpec, opts: SmoothQuantOptions) -> float:
    """The α of ``opts.alphas`` with the lowest held-out W·A-quantized block output error."""
    n = ctx.inputs.n_batches
    if n < 2:
        raise ValueError(
            "smoothquant alpha: auto needs at least 2 calibration batches (one to fit, one held out); add samples or lower --batch-size"
        )
    n_eval = max(1, round(opts.holdout * n))
    fit = ctx.inputs.subset(list(range(min(opts.fit_batches, n - n_eval))))
    held = ctx.inputs.subset(list(range(n - n_eval, n)))
    target = run_block(block, held)
    fit_ctx = BlockContext(ctx.index, fit, ctx.groups, ctx.device, ctx.act, True)
    errors = {}
    for alpha in opts.alphas:
        trial = copy.deepcopy(block)
        smooth(trial, fit_ctx, fit, alpha, opts.fold)
        rtn.apply(trial, fit_ctx, spec, rtn.RTNOptions())
        if ctx.act is not None:
            activations.attach(trial, [g.linears for g in ctx.groups], ctx.act, fit)
        out = run_block(trial, held)
        num, den = sum(float(torch.sum((y - t) ** 2)) for y, t in zip(out, target)), sum(float(torch.sum(t**2)) for t in target)
        if dist.world_size() > 1:  # sums over every process's part of the held-out batches
            num, den = dist.all_reduce_sum(torch.tensor([num, den], dtype=torch.float64)).tolist()
        errors[alpha] = num / den
    best = min(errors, key=errors.get)
    log.info("smoothquant block %d: held-out error by alpha %s -> %.2f", ctx.index, {a: f"{e:.3e}" for a, e in errors.items()}, best)
    return best


@torch.no_grad()
def apply(block: nn.Module, ctx: BlockContext, spec: QuantSpec, opts: SmoothQuantOptions) -> dict[str, LayerResult]:
    alpha = sweep(block, ctx, spec, opts) if opts.alpha == "auto" else float(opts.alpha)
    if ctx.index == 0 and opts.fold == "exact":
        unfolded = [",".join(g.linears) for g in ctx.groups if fold_problem(block, g) is not None]
        if unfolded:  # said once: every block of a model has the same groups
            log.warning(
                "smoothquant: the inputs of %s have no feeder to fold s into exactly (e.g. a post-norm LayerNorm output that is "
                "also the residual) and stay unsmoothed in every block; --smooth-fold quantizer (recipe: fold: quantizer) smooths "
                "them in their activation quantizer",
                " / ".join(unfolded),
            )
    smoothed = smooth(block, ctx, ctx.inputs, alpha, opts.fold)
    if not smoothed:
        log.info("smoothquant block %d: no group has an exact feeder to fold into; nothing smoothed", ctx.index)
    if not ctx.final:
        return {}  # a later step (gptq, blockft) quantizes the smoothed weights
    return rtn.apply(block, ctx, spec, rtn.RTNOptions())
