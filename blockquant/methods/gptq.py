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

from blockquant.capture import ERROR_ROWS, BlockContext, LayerResult, collect_hessians, output_error
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


def _inverse_cholesky(h: Tensor, perm: Tensor, dead: Tensor, damp: float, in_place: bool = False) -> tuple[Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹ with H's rows and columns in ``perm`` order (see
    ``_permuted``), raising the damping until H is positive definite; and the λ it took.

    LAPACK works on column-major matrices; given the column-major view of a matrix (H is
    symmetric: the same matrix), torch factors, inverts and factors again in its memory, where a
    row-major one costs a temporary of H's size per step (a 11008-wide fp32 H is 460 MiB). The
    factor is returned as that view: the same numbers as the out-of-place steps, bit for bit.
    The matrix is a permuted copy of ``h``, or with ``in_place`` (a contiguous fp32 ``h``) ``h``
    itself, permuted where it is: then half a matrix of H's size (its lower triangle, kept for a
    failed attempt, which overwrites the matrix) instead of a whole one."""
    info = torch.empty((), dtype=torch.int32, device=h.device)
    in_place = in_place and h.dtype == torch.float32 and h.is_contiguous()
    if in_place:
        _permute_in_place(h, perm)
        h.diagonal()[dead] = 1
        lower = [h[a : a + PERMUTE_ROWS, : a + PERMUTE_ROWS].clone() for a in range(0, len(h), PERMUTE_ROWS)]
    for attempt in range(6):
        if not in_place:
            f = _permuted(h, perm, dead).mT  # column-major: LAPACK's layout
        else:
            if attempt:  # the failed attempt's overwritten matrix, back from its lower triangle
                for a, rows in zip(range(0, len(h), PERMUTE_ROWS), lower):
                    h[a : a + len(rows), : a + len(rows)] = rows
                    h[: a + len(rows), a : a + len(rows)] = rows.t()
            f = h.mT
        lam = damp * 10**attempt * torch.mean(torch.diag(f))
        f.diagonal().add_(lam)
        torch.linalg.cholesky_ex(f, out=(f, info))
        if info == 0:
            if attempt:
                log.warning("GPTQ: Hessian needed damping %.3g to be positive definite", damp * 10**attempt)
            if in_place:
                del lower
            torch.cholesky_inverse(f, out=f)
            return torch.linalg.cholesky(f, upper=True, out=f), float(lam)
        del f
    raise ValueError("GPTQ: the Hessian is not positive definite even with 10⁵× damping")


def _permute_in_place(h: Tensor, perm: Tensor) -> None:
    """``h[perm][:, perm]`` of a symmetric ``h``, written into ``h``: rows permuted, the matrix
    transposed, rows permuted again (``P H Pᵀ = P (P H)ᵀ``), a row or a tile of memory at a time
    where the indexed copy costs a whole matrix."""
    _permute_rows_in_place(h, perm)
    for a in range(0, len(h), PERMUTE_ROWS):  # transpose, one pair of tiles at a time
        tile = h[a : a + PERMUTE_ROWS, a : a + PERMUTE_ROWS]
        tile.copy_(tile.t().clone())
        for b in range(a + PERMUTE_ROWS, len(h), PERMUTE_ROWS):
            upper = h[a : a + PERMUTE_ROWS, b : b + PERMUTE_ROWS].clone()
            h[a : a + PERMUTE_ROWS, b : b + PERMUTE_ROWS] = h[b : b + PERMUTE_ROWS, a : a + PERMUTE_ROWS].t()
            h[b : b + PERMUTE_ROWS, a : a + PERMUTE_ROWS] = upper.t()
    _permute_rows_in_place(h, perm)


def _permute_rows_in_place(h: Tensor, perm: Tensor) -> None:
    """``h[perm]`` written into ``h``, one cycle of the permutation at a time."""
    p, done = perm.tolist(), [False] * len(perm)
    for i in range(len(p)):
        if done[i] or p[i] == i:
            continue
        first, k = h[i].clone(), i
        while p[k] != i:
            h[k].copy_(h[p[k]])
            done[k], k = True, p[k]
        h[k].copy_(first)
        done[k] = True


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
    return gptq_quantize_group([w], h, spec, opts)[0].as_tuple()


@dataclass
class Quantized:
    """GPTQ's result for one weight."""

    w_hat: Tensor  # (out, in) fp32, on the grid
    scale: Tensor
    zero: Tensor
    g_idx: Tensor | None  # group of each input column when act-order made groups of permuted columns
    clip: bool  # whether the range search was used
    error: float  # tr(ΔW H ΔWᵀ) / tr(W H Wᵀ): the relative output error on the calibration inputs

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        return self.w_hat, self.scale, self.zero, self.g_idx


@torch.no_grad()
def gptq_quantize_group(
    ws: list[Tensor], h: Tensor, spec: QuantSpec, opts: GPTQOptions | None = None, free_hessian: bool = False
) -> list[Quantized]:
    """GPTQ of weights that read the same inputs (q/k/v; gate/up) against their shared ``H``.

    The error feedback acts on each row alone, through the ``H⁻¹`` every row of the group shares.
    So the rows of all the weights, and under ``clip_search="auto"`` both range choices, are
    stacked and swept over the columns together: the arithmetic of one weight at a time, with
    one Python loop for them all instead of one per weight and choice. A per-tensor grid has one
    scale for all of a weight's rows: its weights are swept one at a time.

    The sweep itself yields each row's output error (``_sweep``), so ``H`` is needed only up to
    its factor: with ``free_hessian`` the factor is computed in H's own memory, which is released
    after the last sweep (the caller's tensor is left empty): the sweep then runs beside one
    matrix of H's size instead of two.
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
    totals = [output_error(w, h) for w in ws]  # tr(W H Wᵀ), the relative errors' denominators
    sweep = _prepare(h, opts, in_place=free_hessian)
    parts: dict[tuple[int, bool], list[tuple[Tensor, Tensor, Tensor, Tensor]]] = {c: [] for c in candidates}
    pending = {i: sum(p[0] == i for p in pieces) for i in range(len(ws))}  # pieces of each weight not yet swept
    best: dict[int, Quantized] = {}
    grouped = not spec.per_tensor and spec.group_size != -1
    for k, chunk in enumerate(chunks):
        w = torch.cat([ws[i][a:b].float() for i, _, a, b in chunk])
        runs, at = [], 0
        for _, clip, a, b in chunk:
            runs.append((at, at + b - a, clip))
            at += b - a
        codes, scale, zero, group_of, e2 = _sweep(w, sweep, spec, opts, runs)
        if k == len(chunks) - 1:  # every row is swept: H⁻¹'s factor goes before the last weight is joined
            del sweep
            if free_hessian:
                h.untyped_storage().resize_(0)
        for (i, clip, _, _), (a, b, _) in zip(chunk, runs):  # a per-tensor grid: one scale for all rows
            parts[(i, clip)].append((codes[a:b], scale if spec.per_tensor else scale[a:b], zero if spec.per_tensor else zero[a:b], e2[a:b]))
            pending[i] -= 1
        del w, codes, scale, zero, e2
        for i in [i for i, n in pending.items() if n == 0 and i not in best]:  # a weight's every choice is swept: keep the better
            best[i] = _better(clips, [parts.pop((i, clip)) for clip in clips], group_of, totals[i])
    g_idx = group_of if grouped and opts.act_order and not opts.static_groups else None  # groups of permuted columns
    return [dataclasses.replace(best[i], g_idx=g_idx) for i in range(len(ws))]


def _better(clips: tuple[bool, ...], parts: list[list[tuple[Tensor, Tensor, Tensor, Tensor]]], group_of: Tensor, total: float) -> Quantized:
    """The range choice with the lower tr(ΔW H ΔWᵀ) (the search on a tie), from the sweeps' row
    errors (``_row_errors``), piece by piece; only the better one is joined."""
    best = None
    for clip, pieces in zip(clips, parts):
        err = sum(float(p[3].sum()) for p in pieces)
        if best is None or err < best[0]:
            best = (err, pieces, clip)
    err, pieces, clip = best
    w_hat = torch.cat([_dequantized(*p[:3], group_of) for p in pieces])
    scale, zero = (torch.cat([p[k] for p in pieces]) for k in (1, 2))
    return Quantized(w_hat, scale, zero, None, clip, max(err, 0.0) / max(total, 1e-30))


def _dequantized(codes: Tensor, scale: Tensor, zero: Tensor, group_of: Tensor) -> Tensor:
    """ŵ = s · (q − z) of the sweep's integer codes, column ``c`` on group ``group_of[c]``: the
    sweep's own arithmetic, so the same fp32 values bit for bit."""
    return scale[:, group_of] * (codes.float() - zero[:, group_of])


def _code_dtype(spec: QuantSpec) -> torch.dtype:
    """A byte per code (the sweep keeps codes, not fp32 ŵ): grids are at most 8 bits wide."""
    return torch.uint8 if spec.qmin >= 0 else torch.int8


@dataclass
class _Factored:
    """What every row's sweep shares."""

    hinv: Tensor  # upper Cholesky factor of the permuted (H + λI)⁻¹
    damping: float  # λ
    perm: Tensor  # the column order
    dead: Tensor  # columns never excited (unpermuted)
    diag_h: Tensor  # diag(H), unpermuted, 1 on the dead columns


def _prepare(h: Tensor, opts: GPTQOptions, in_place: bool = False) -> _Factored:
    """The column order, the dead columns and the factor (in ``h``'s own memory with ``in_place``)."""
    diag_h = torch.diag(h).float()
    dead = diag_h == 0  # columns never excited: any value is free, zero it
    diag_h[dead] = 1
    perm = torch.argsort(diag_h, descending=True) if opts.act_order else torch.arange(h.shape[0])
    hinv, damping = _inverse_cholesky(h, perm, dead[perm], opts.damp, in_place)
    return _Factored(hinv, damping, perm, dead, diag_h)


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
    w: Tensor, f: _Factored, spec: QuantSpec, opts: GPTQOptions, runs: list[tuple[int, int, bool]]
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """GPTQ's column sweep (Alg. 1) over the rows of ``w`` (the caller's own copy: overwritten);
    ``runs``: row ranges and their range choice. Returns the integer codes (a quarter or less of
    ŵ's fp32 bytes), scale, zero, each column's group and each row's output error ``tr(ΔW H ΔWᵀ)``
    (fp64, ``_row_errors``)."""
    hinv, perm, dead, diag_h = f.hinv, f.perm, f.dead, f.diag_h
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
    # The column loop works on transposed copies, where a column is a contiguous row: reading, quantizing
    # and updating a column of a row-major block strides across every row's cache line.
    codes_t = torch.zeros(W.shape[::-1], dtype=_code_dtype(spec), device=W.device)
    scale_t, zero_t = (scale.t().contiguous(), zero.t().contiguous()) if upfront else (None, None)
    e2 = torch.zeros(out_f, dtype=torch.float64, device=W.device)  # Σ of each row's scaled errors²
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1, hinv1 = W[:, i1:i2].t().contiguous(), hinv[i1:i2, i1:i2]  # W1: (columns, rows)
        Err1 = torch.zeros_like(W1)
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
                    s, z = _params(W1[i : i + width].t(), slice_spec, runs, diag_h[c : c + width])
                    scale[:, j], zero[:, j] = s[:, 0], z[:, 0]
            group_of[orig] = j
            s_j, z_j = (scale_t[j], zero_t[j]) if upfront else (scale[:, j], zero[:, j])
            # 2. quantize the column and spread its scaled error over the columns to its right
            col = W1[i]
            code = column_codes(col, s_j, z_j, spec)
            q = s_j * (code - z_j)  # ŵ of the column; the code is kept
            codes_t[c] = code
            err = (col - q) / hinv1[i, i]
            W1[i:] -= hinv1[i, i:].unsqueeze(1) * err.unsqueeze(0)
            Err1[i] = err
        # 3. lazy update of every column after this block
        Err1 = Err1.t().contiguous()
        W[:, i2:] -= Err1 @ hinv[i1:i2, i2:]
        e2 += torch.sum(Err1.double() ** 2, dim=1)

    codes = codes_t.t()[:, torch.argsort(perm)]
    return codes, scale, zero, group_of, _row_errors(e2, w, codes, scale, zero, group_of, f)


def _row_errors(e2: Tensor, w: Tensor, codes: Tensor, scale: Tensor, zero: Tensor, group_of: Tensor, f: _Factored) -> Tensor:
    """Each row's ``tr(ΔW H ΔWᵀ)`` from the sweep's scaled errors ``E``, without ``H``.

    The sweep makes ``ΔW = E U`` (columns in sweep order; ``U``: the factor, ``Uᵀ U = H_λ⁻¹``),
    so ``ΔW H_λ ΔWᵀ = E Eᵀ``: the row's Σ E² is its error on the damped Hessian ``H_λ = H + λI``
    (plus 1 on the dead columns' diagonal). ``w`` (the swept rows, dead columns zeroed) and ŵ
    give the difference, ``λ‖ΔW‖²`` and the dead columns' share, subtracted here. Equal to the
    product with ``H`` up to the factor's rounding (about 1e-4 relative, tested)."""
    out = e2.clone()
    for a in range(0, len(w), ERROR_ROWS):
        rows = slice(a, a + ERROR_ROWS) if len(scale) > 1 else slice(None)  # a per-tensor grid: one row of params
        d = w[a : a + ERROR_ROWS] - _dequantized(codes[a : a + ERROR_ROWS], scale[rows], zero[rows], group_of)
        d2 = d.double() ** 2
        out[a : a + ERROR_ROWS] -= f.damping * d2.sum(1) + d2[:, f.dead].sum(1)
    return out


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


def _quantize_linears(
    block: nn.Module, ctx: BlockContext, names: tuple[str, ...], h: Tensor, spec: QuantSpec, opts: GPTQOptions
) -> dict[str, LayerResult]:
    """GPTQ of the linears ``names`` of ``block`` that read one input, whose Hessian is ``h``
    (consumed: its memory is released once factored); ŵ written back into each. The weights are
    read where they are (no fp32 copies): the temporaries of one group, and nothing of it
    outlives the call."""
    layers = [ctx.linear(block, name) for name in names]
    ws = [weight_view(layer) for layer in layers]
    results = {}
    for name, layer, q in zip(names, layers, gptq_quantize_group(ws, h, spec, opts, free_hessian=True)):
        set_weight_matrix(layer, q.w_hat)
        results[name] = LayerResult(q.scale.cpu(), q.zero.cpu(), q.g_idx, q.error)
    return results


def apply_conv(layer: nn.Module, x: Tensor, y: Tensor, attention: Tensor | None, spec: QuantSpec, opts: GPTQOptions, seed: int = 0):
    """GPTQ on the im2col rows of one layer of a convolution network: ``H = 2/N Σ x xᵀ`` over (sampled) output positions."""
    stats = layer_stats(layer, x, seed=seed)
    q = gptq_quantize_group([weight_matrix(layer)], 2 * stats.gram, spec, opts, free_hessian=True)[0]  # "auto": the lower output error
    return q.w_hat, q.scale, q.zero, None, {"positions": stats.rows, "of_positions": stats.total, "clip_search": q.clip}
