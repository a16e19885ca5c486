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
    hessian_dtype: str = "float32"  # float64: Hessian sums that do not depend on how tokens are split over
    # processes (the same codes under torchrun as in one process), for about twice their arithmetic

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1:
            raise ValueError(f"gptq damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"gptq block_size must be >= 1, got {self.block_size}")
        if self.clip_search not in (True, False, "auto"):
            raise ValueError(f"gptq clip_search must be true, false or auto, got {self.clip_search!r}")
        if self.hessian_dtype not in ("float32", "float64"):
            raise ValueError(f"gptq hessian_dtype must be float32 or float64, got {self.hessian_dtype!r}")


def _inverse_cholesky(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, raising the damping until H is positive definite.

    ``h`` is the caller's to give away: its diagonal is damped in place, and it is released as
    soon as it is factored, so that no more than two matrices of H's size are alive at a time
    besides the caller's Hessian (a 11008-wide fp32 H is 460 MiB)."""
    diag = torch.diag(h).clone()
    mean_diag = torch.mean(diag)
    for attempt in range(6):
        h.diagonal().copy_(diag + damp * 10**attempt * mean_diag)
        chol, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            if attempt:
                log.warning("GPTQ: Hessian needed damping %.3g to be positive definite", damp * 10**attempt)
            del h
            inverse = torch.cholesky_inverse(chol)
            del chol
            return torch.linalg.cholesky(inverse, upper=True)
        del chol
    raise ValueError("GPTQ: the Hessian is not positive definite even with 10⁵× damping")


def _params(w: Tensor, spec: QuantSpec, rows: list[tuple[int, int, bool]], col_weight: Tensor) -> tuple[Tensor, Tensor]:
    """Scale and zero of ``w``'s groups, each run of rows ``(start, stop, clip)`` with its own range choice."""
    parts = [clip_search(w[a:b], spec, col_weight) if clip else compute_qparams(w[a:b], spec) for a, b, clip in rows]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# Rows swept at once: stacking bounds the Python loop over columns; the cap bounds the memory
# (the sweep holds about four fp32 copies of its rows).
SWEEP_ELEMENTS = 1 << 22


@torch.no_grad()
def gptq_quantize(w: Tensor, h: Tensor, spec: QuantSpec, opts: GPTQOptions | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Quantize ``w`` (out, in) against ``H`` (in, in); returns (ŵ, scale, zero, g_idx).

    ``g_idx`` maps each input column to its group; it is None unless act-order without
    static groups made groups of permuted columns.
    """
    return gptq_quantize_group([w], h, spec, opts)[0][:4]


@torch.no_grad()
def gptq_quantize_group(
    ws: list[Tensor], h: Tensor, spec: QuantSpec, opts: GPTQOptions | None = None
) -> list[tuple[Tensor, Tensor, Tensor, Tensor | None, bool]]:
    """GPTQ of weights that read the same inputs (q/k/v; gate/up) against their shared ``H``;
    per weight (ŵ, scale, zero, g_idx, whether the range search was used).

    The error feedback acts on each row alone, through the ``H⁻¹`` every row of the group shares.
    So the rows of all the weights, and under ``clip_search="auto"`` both range choices, are
    stacked and swept over the columns together: the arithmetic of one weight at a time, with
    one Python loop for them all instead of one per weight and choice. A per-tensor grid has one
    scale for all of a weight's rows: its weights are swept one at a time.
    """
    opts = opts or GPTQOptions()
    clips = (True, False) if opts.clip_search == "auto" else (bool(opts.clip_search),)
    ws = [w.float() for w in ws]
    candidates = [(i, clip) for i in range(len(ws)) for clip in clips]  # auto: both through the whole error feedback
    cols = ws[0].shape[1]
    step = max(1, SWEEP_ELEMENTS // cols)
    pieces = [(i, clip, a, min(a + step, len(ws[i]))) for i, clip in candidates for a in range(0, len(ws[i]), step)]
    if spec.per_tensor:
        pieces = [(i, clip, 0, len(ws[i])) for i, clip in candidates]
        chunks = [[p] for p in pieces]
    else:  # consecutive pieces, up to SWEEP_ELEMENTS per sweep
        chunks, rows = [[]], 0
        for p in pieces:
            if rows and rows + p[3] - p[2] > step:
                chunks.append([])
                rows = 0
            chunks[-1].append(p)
            rows += p[3] - p[2]
    hinv, perm, dead, diag_h = _prepare(h, opts)
    parts: dict[tuple[int, bool], list[tuple[Tensor, Tensor, Tensor]]] = {c: [] for c in candidates}
    pending = {i: sum(p[0] == i for p in pieces) for i in range(len(ws))}  # pieces of each weight not yet swept
    best: dict[int, tuple] = {}
    g_idx = None
    for chunk in chunks:
        w = torch.cat([ws[i][a:b] for i, _, a, b in chunk])
        runs, at = [], 0
        for _, clip, a, b in chunk:
            runs.append((at, at + b - a, clip))
            at += b - a
        w_hat, scale, zero, g_idx = _sweep(w, hinv, perm, dead, diag_h, spec, opts, runs)
        for (i, clip, _, _), (a, b, _) in zip(chunk, runs):
            parts[(i, clip)].append((w_hat[a:b], scale[a:b] if not spec.per_tensor else scale, zero[a:b] if not spec.per_tensor else zero))
            pending[i] -= 1
        del w, w_hat, scale, zero
        for i in [i for i, n in pending.items() if n == 0 and i not in best]:  # a weight's every choice is swept: keep the better
            best[i] = _better(ws[i], h, clips, [parts.pop((i, clip)) for clip in clips])
    return [(*best[i][:3], g_idx, best[i][3]) for i in range(len(ws))]


def _better(w: Tensor, h: Tensor, clips: tuple[bool, ...], parts: list[list[tuple[Tensor, Tensor, Tensor]]]) -> tuple:
    """(ŵ, scale, zero, range search used) of the range choice with the lower tr(ΔW H ΔWᵀ); the search on a tie."""
    best = None
    for clip, pieces in zip(clips, parts):
        w_hat, scale, zero = (torch.cat([p[k] for p in pieces]) for k in range(3))
        err = float(relative_error(w, w_hat, h)) if len(clips) > 1 else 0.0
        if best is None or err < best[0]:
            best = (err, w_hat, scale, zero, clip)
    return best[1:]


def _prepare(h: Tensor, opts: GPTQOptions) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What every row's sweep shares: the upper Cholesky factor of the permuted (H + λI)⁻¹, the
    column order, the never-excited columns and diag(H) (unpermuted)."""
    diag_h = torch.diag(h).float()
    dead = diag_h == 0  # columns never excited: any value is free, zero it
    diag_h[dead] = 1
    perm = torch.argsort(diag_h, descending=True) if opts.act_order else torch.arange(h.shape[0])
    return _inverse_cholesky(_permuted(h, perm, dead[perm]), opts.damp), perm, dead, diag_h


def _permuted(h: Tensor, perm: Tensor, dead: Tensor) -> Tensor:
    """A fp32 copy of ``H`` with rows and columns in ``perm`` order, 1 on the diagonal of the
    ``dead`` (never excited, in that order) columns."""
    H = h.float()[perm][:, perm]
    H.diagonal()[dead] = 1
    return H


def _sweep(
    w: Tensor,
    hinv: Tensor,
    perm: Tensor,
    dead: Tensor,
    diag_h: Tensor,
    spec: QuantSpec,
    opts: GPTQOptions,
    runs: list[tuple[int, int, bool]],
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """GPTQ's column sweep (Alg. 1) over the rows of ``w``; ``runs``: row ranges and their range choice."""
    out_f, cols = w.shape
    W = w.clone()
    W[:, dead] = 0

    width = group_width(spec, cols)
    grouped = not spec.per_tensor and spec.group_size != -1
    slice_spec = dataclasses.replace(spec, group_size=-1)  # params of one column slice
    upfront = not grouped or opts.static_groups
    if upfront:  # per-tensor / per-channel, or static groups: from the unpermuted weight
        scale, zero = _params(W, spec, runs, diag_h)
    else:
        scale = W.new_zeros(out_f, n_groups(spec, cols))
        zero = W.new_zeros(out_f, n_groups(spec, cols))

    W, diag_h = W[:, perm], diag_h[perm]
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
                    s, z = _params(W1[:, i : i + width], slice_spec, runs, diag_h[c : c + width])
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
        firsts = {g.linears[0]: ctx.linear(block, g.linears[0]) for g in stage}  # one input per group
        hessians = collect_hessians(block, ctx.inputs, firsts, getattr(torch, opts.hessian_dtype))
        for group in stage:
            h = hessians[group.linears[0]]
            layers = [ctx.linear(block, name) for name in group.linears]
            ws = [weight_matrix(layer) for layer in layers]
            for name, layer, w, (w_hat, scale, zero, g_idx, _) in zip(group.linears, layers, ws, gptq_quantize_group(ws, h, spec, opts)):
                set_weight_matrix(layer, w_hat)
                results[name] = LayerResult(scale.cpu(), zero.cpu(), g_idx, relative_error(w, w_hat, h))
    return results


def apply_conv(layer: nn.Module, x: Tensor, y: Tensor, attention: Tensor | None, spec: QuantSpec, opts: GPTQOptions, seed: int = 0):
    """GPTQ on the im2col rows of one layer of a convolution network: ``H = 2/N Σ x xᵀ`` over (sampled) output positions."""
    stats = layer_stats(layer, x, seed=seed)
    h = 2 * stats.gram
    w_hat, scale, zero, _, clip = gptq_quantize_group([weight_matrix(layer)], h, spec, opts)[0]  # "auto": the lower output error
    return w_hat, scale, zero, None, {"positions": stats.rows, "of_positions": stats.total, "clip_search": clip}
