"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Alg. 1): quantize columns left to right and push each column's
error onto the remaining ones through the upper Cholesky factor of H⁻¹.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from blockquant.capture import BlockContext, LayerResult, collect_hessians, relative_error
from blockquant.convnet import layer_stats
from blockquant.layers import set_weight_matrix, weight_matrix
from blockquant.primitives import clip_search, compute_qparams, group_width, n_groups, quantize_column
from blockquant.spec import QuantSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQOptions:
    damp: float = 0.01  # H += damp · mean(diag H) · I
    block_size: int = 128  # lazy-batch width (rounded to a multiple of the group size)
    act_order: bool = True  # quantize columns in order of decreasing diag(H)
    static_groups: bool = True  # group params from the unpermuted weight, up front (plain groups, no g_idx)
    true_sequential: bool = True  # each linear group sees inputs from the already-quantized ones
    clip_search: bool | str = "auto"  # range search per group: True, False, or "auto" = per layer, whichever
    # of the two gives the lower output error tr(ΔW H ΔWᵀ) on the calibration inputs

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1:
            raise ValueError(f"gptq damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"gptq block_size must be >= 1, got {self.block_size}")
        if self.clip_search not in (True, False, "auto"):
            raise ValueError(f"gptq clip_search must be true, false or auto, got {self.clip_search!r}")


def _inverse_cholesky(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, raising the damping until H is positive definite."""
    mean_diag = torch.mean(torch.diag(h))
    for attempt in range(6):
        damped = h.clone()
        damped.diagonal().add_(damp * 10**attempt * mean_diag)
        chol, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            if attempt:
                log.warning("GPTQ: Hessian needed damping %.3g to be positive definite", damp * 10**attempt)
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    raise ValueError("GPTQ: the Hessian is not positive definite even with 10⁵× damping")


def _params(w: Tensor, spec: QuantSpec, clip: bool, col_weight: Tensor) -> tuple[Tensor, Tensor]:
    return clip_search(w, spec, col_weight) if clip else compute_qparams(w, spec)


@torch.no_grad()
def gptq_quantize(w: Tensor, h: Tensor, spec: QuantSpec, opts: GPTQOptions | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Quantize ``w`` (out, in) against ``H`` (in, in); returns (ŵ, scale, zero, g_idx).

    ``g_idx`` maps each input column to its group; it is None unless act-order without
    static groups made groups of permuted columns.
    """
    opts = opts or GPTQOptions()
    if opts.clip_search == "auto":  # both grids through the whole error feedback; keep the lower tr(ΔW H ΔWᵀ)
        tries = [gptq_quantize(w, h, spec, dataclasses.replace(opts, clip_search=c)) for c in (True, False)]
        return min(tries, key=lambda t: float(relative_error(w, t[0], h)))
    out_f, cols = w.shape
    W, H = w.clone().float(), h.clone().float()
    dead = torch.diag(H) == 0  # columns never excited: any value is free, zero it
    H[dead, dead] = 1
    W[:, dead] = 0
    diag_h = torch.diag(H).clone()

    width = group_width(spec, cols)
    grouped = not spec.per_tensor and spec.group_size != -1
    slice_spec = dataclasses.replace(spec, group_size=-1)  # params of one column slice
    upfront = not grouped or opts.static_groups
    if upfront:  # per-tensor / per-channel, or static groups: from the unpermuted weight
        scale, zero = _params(W, spec, opts.clip_search, diag_h)
    else:
        scale = W.new_zeros(out_f, n_groups(spec, cols))
        zero = W.new_zeros(out_f, n_groups(spec, cols))

    perm = torch.argsort(diag_h, descending=True) if opts.act_order else torch.arange(cols)
    W, H, diag_h = W[:, perm], H[perm][:, perm], diag_h[perm]
    hinv = _inverse_cholesky(H, opts.damp)
    group_of = torch.zeros(cols, dtype=torch.long)

    bs = opts.block_size if not grouped else max(1, opts.block_size // width) * width
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1, Err1, hinv1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c, orig = i1 + i, int(perm[i1 + i])
            # 1. the grid of this column: per tensor/channel, static group, or a new group here
            if not grouped:
                j = 0
            elif opts.static_groups:
                j = orig // width
            else:
                j = c // width
                if c % width == 0:  # groups start at lazy-block starts, so W1 is up to date
                    s, z = _params(W1[:, i : i + width], slice_spec, opts.clip_search, diag_h[c : c + width])
                    scale[:, j], zero[:, j] = s[:, 0], z[:, 0]
            group_of[orig] = j
            # 2. quantize the column and spread its scaled error over the columns to its right
            col = W1[:, i]
            q = quantize_column(col, scale[:, j], zero[:, j], spec)
            Q[:, c] = q
            err = (col - q) / hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        # 3. lazy update of every column after this block
        W[:, i2:] -= Err1 @ hinv[i1:i2, i2:]

    w_hat = Q[:, torch.argsort(perm)]
    permuted_groups = grouped and opts.act_order and not opts.static_groups
    return w_hat, scale, zero, group_of if permuted_groups else None


@torch.no_grad()
def apply(block: nn.Module, ctx: BlockContext, spec: QuantSpec, opts: GPTQOptions) -> dict[str, LayerResult]:
    stages = [[g] for g in ctx.groups] if opts.true_sequential else [list(ctx.groups)]
    results = {}
    for stage in stages:
        # Hessians from the current block, whose earlier stages are already quantized.
        hessians = collect_hessians(block, ctx.inputs, {g.linears[0]: ctx.linear(block, g.linears[0]) for g in stage})
        for group in stage:
            h = hessians[group.linears[0]]
            for name in group.linears:
                layer = ctx.linear(block, name)
                w = weight_matrix(layer)
                w_hat, scale, zero, g_idx = gptq_quantize(w, h, spec, opts)
                set_weight_matrix(layer, w_hat)
                results[name] = LayerResult(scale.cpu(), zero.cpu(), g_idx, relative_error(w, w_hat, h))
    return results


def apply_conv(layer: nn.Module, x: Tensor, y: Tensor, attention: Tensor | None, spec: QuantSpec, opts: GPTQOptions, seed: int = 0):
    """GPTQ on the im2col rows of one layer of a convolution network: ``H = 2/N Σ x xᵀ`` over (sampled) output positions."""
    stats = layer_stats(layer, x, seed=seed)
    h, w = 2 * stats.gram, weight_matrix(layer)
    tries = [True, False] if opts.clip_search == "auto" else [bool(opts.clip_search)]
    best = None
    for clip in tries:  # "auto": whichever range choice gives the lower calibration output error
        w_hat, scale, zero, _ = gptq_quantize(w, h, spec, dataclasses.replace(opts, clip_search=clip))
        err = relative_error(w, w_hat, h)
        if best is None or err < best[0]:
            best = (err, w_hat, scale, zero, clip)
    return best[1], best[2], best[3], None, {"positions": stats.rows, "of_positions": stats.total, "clip_search": best[4]}
