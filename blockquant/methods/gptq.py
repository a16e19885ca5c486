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

from blockquant.capture import BlockContext, LayerResult, collect_hessians, output_error, relative_error
from blockquant.convnet import layer_stats
from blockquant.layers import set_weight_matrix, weight_matrix, weight_view
from blockquant.primitives import clip_search, column_codes, compute_qparams, group_width, n_groups
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


def _inverse_cholesky(h: Tensor, perm: Tensor, dead: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ with H's rows and columns in ``perm`` order (see
    ``_permuted``), raising the damping until H is positive definite.

    One matrix of H's size besides ``h``: the permuted copy is factored, inverted and factored
    again in its own memory. LAPACK works on column-major matrices; given the column-major view
    of the copy (H is symmetric: the same matrix), torch runs each step in place, where a
    row-major one costs a temporary of H's size per step (a 11008-wide fp32 H is 460 MiB). The
    factor is returned as that view: the same numbers as the out-of-place steps, bit for bit.
    A failed factorization has overwritten the copy: each attempt permutes ``h`` anew."""
    info = torch.empty((), dtype=torch.int32, device=h.device)
    for attempt in range(6):
        f = _permuted(h, perm, dead).mT  # column-major: LAPACK's layout
        f.diagonal().add_(damp * 10**attempt * torch.mean(torch.diag(f)))
        torch.linalg.cholesky_ex(f, out=(f, info))
        if info == 0:
            if attempt:
                log.warning("GPTQ: Hessian needed damping %.3g to be positive definite", damp * 10**attempt)
            torch.cholesky_inverse(f, out=f)
            return torch.linalg.cholesky(f, upper=True, out=f)
        del f
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
    grouped = not spec.per_tensor and spec.group_size != -1
    for k, chunk in enumerate(chunks):
        w = torch.cat([ws[i][a:b].float() for i, _, a, b in chunk])
        runs, at = [], 0
        for _, clip, a, b in chunk:
            runs.append((at, at + b - a, clip))
            at += b - a
        codes, scale, zero, group_of = _sweep(w, hinv, perm, dead, diag_h, spec, opts, runs)
        if k == len(chunks) - 1:
            del hinv  # every row is swept: H⁻¹'s factor goes before the last weight is scored
        for (i, clip, _, _), (a, b, _) in zip(chunk, runs):
            parts[(i, clip)].append((codes[a:b], scale[a:b] if not spec.per_tensor else scale, zero[a:b] if not spec.per_tensor else zero))
            pending[i] -= 1
        del w, codes, scale, zero
        for i in [i for i, n in pending.items() if n == 0 and i not in best]:  # a weight's every choice is swept: keep the better
            best[i] = _better(ws[i], h, clips, [parts.pop((i, clip)) for clip in clips], group_of)
    g_idx = group_of if grouped and opts.act_order and not opts.static_groups else None  # groups of permuted columns
    return [(*best[i][:3], g_idx, best[i][3]) for i in range(len(ws))]


def _better(
    w: Tensor, h: Tensor, clips: tuple[bool, ...], parts: list[list[tuple[Tensor, Tensor, Tensor]]], group_of: Tensor
) -> tuple:
    """(ŵ, scale, zero, range search used) of the range choice with the lower tr(ΔW H ΔWᵀ); the search on a tie.
    Each choice is scored piece by piece (the error adds up over rows); only the better one is joined."""
    best = None
    for clip, pieces in zip(clips, parts):
        err, at = 0.0, 0
        for codes, scale, zero in pieces if len(clips) > 1 else []:
            err += output_error(w[at : at + len(codes)], h, _dequantized(codes, scale, zero, group_of))
            at += len(codes)
        if best is None or err < best[0]:
            best = (err, pieces, clip)
    pieces = best[1]
    w_hat = torch.cat([_dequantized(*p, group_of) for p in pieces])
    return (w_hat, *(torch.cat([p[k] for p in pieces]) for k in (1, 2)), best[2])


def _dequantized(codes: Tensor, scale: Tensor, zero: Tensor, group_of: Tensor) -> Tensor:
    """ŵ = s · (q − z) of the sweep's integer codes, column ``c`` on group ``group_of[c]``: the
    sweep's own arithmetic, so the same fp32 values bit for bit."""
    return scale[:, group_of] * (codes.float() - zero[:, group_of])


def _code_dtype(spec: QuantSpec) -> torch.dtype:
    """A byte per code (the sweep keeps codes, not fp32 ŵ): grids are at most 8 bits wide."""
    return torch.uint8 if spec.qmin >= 0 else torch.int8


def _prepare(h: Tensor, opts: GPTQOptions) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What every row's sweep shares: the upper Cholesky factor of the permuted (H + λI)⁻¹, the
    column order, the never-excited columns and diag(H) (unpermuted)."""
    diag_h = torch.diag(h).float()
    dead = diag_h == 0  # columns never excited: any value is free, zero it
    diag_h[dead] = 1
    perm = torch.argsort(diag_h, descending=True) if opts.act_order else torch.arange(h.shape[0])
    return _inverse_cholesky(h, perm, dead[perm], opts.damp), perm, dead, diag_h


# Rows of H permuted at a time: the copy of H costs one matrix of its size, not three.
PERMUTE_ROWS = 256


def _permuted(h: Tensor, perm: Tensor, dead: Tensor) -> Tensor:
    """A fp32 copy of ``H`` with rows and columns in ``perm`` order, 1 on the diagonal of the
    ``dead`` (never excited, in that order) columns."""
    H = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    for a in range(0, len(perm), PERMUTE_ROWS):
        H[a : a + PERMUTE_ROWS] = h[perm[a : a + PERMUTE_ROWS]][:, perm]
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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """GPTQ's column sweep (Alg. 1) over the rows of ``w`` (the caller's own copy: overwritten);
    ``runs``: row ranges and their range choice. Returns the integer codes (a quarter or less of ŵ's fp32 bytes), scale, zero and each column's group."""
    out_f, cols = w.shape
    W = w  # the caller's fresh fp32 rows: swept in place, no copy
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
    codes = torch.zeros(W.shape, dtype=_code_dtype(spec), device=W.device)
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
            code = column_codes(col, scale[:, j], zero[:, j], spec)
            q = scale[:, j] * (code - zero[:, j])  # ŵ of the column; the code is kept
            codes[:, c] = code
            err = (col - q) / hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        # 3. lazy update of every column after this block
        W[:, i2:] -= Err1 @ hinv[i1:i2, i2:]

    return codes[:, torch.argsort(perm)], scale, zero, group_of


@torch.no_grad()
def apply(block: nn.Module, ctx: BlockContext, spec: QuantSpec, opts: GPTQOptions) -> dict[str, LayerResult]:
    stages = [[g] for g in ctx.groups] if opts.true_sequential else [list(ctx.groups)]
    results = {}
    for stage in stages:
        # Hessians from the current block, whose earlier stages are already quantized.
        firsts = {g.linears[0]: ctx.linear(block, g.linears[0]) for g in stage}  # one input per group
        hessians = collect_hessians(block, ctx.inputs, firsts, getattr(torch, opts.hessian_dtype))
        for group in stage:  # each H is handed over, so that it is freed with its group
            results.update(_quantize_linears(block, ctx, group.linears, hessians.pop(group.linears[0]), spec, opts))
    return results


def _quantize_linears(block: nn.Module, ctx: BlockContext, names: tuple[str, ...], h: Tensor, spec: QuantSpec, opts: GPTQOptions) -> dict[str, LayerResult]:
    """GPTQ of the linears ``names`` of ``block`` that read one input, whose Hessian is ``h``;
    ŵ written back into each. The weights are read where they are (no fp32 copies): the
    temporaries of one group, and nothing of it outlives the call."""
    layers = [ctx.linear(block, name) for name in names]
    ws = [weight_view(layer) for layer in layers]
    results = {}
    for name, layer, w, (w_hat, scale, zero, g_idx, _) in zip(names, layers, ws, gptq_quantize_group(ws, h, spec, opts)):
        error = relative_error(w, w_hat, h)  # before ŵ overwrites the weight ``w`` views
        set_weight_matrix(layer, w_hat)
        results[name] = LayerResult(scale.cpu(), zero.cpu(), g_idx, error)
    return results


def apply_conv(layer: nn.Module, x: Tensor, y: Tensor, attention: Tensor | None, spec: QuantSpec, opts: GPTQOptions, seed: int = 0):
    """GPTQ on the im2col rows of one layer of a convolution network: ``H = 2/N Σ x xᵀ`` over (sampled) output positions."""
    stats = layer_stats(layer, x, seed=seed)
    h = 2 * stats.gram
    w_hat, scale, zero, _, clip = gptq_quantize_group([weight_matrix(layer)], h, spec, opts)[0]  # "auto": the lower output error
    return w_hat, scale, zero, None, {"positions": stats.rows, "of_positions": stats.total, "clip_search": clip}
