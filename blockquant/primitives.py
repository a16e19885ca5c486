"""Pure tensor math of the uniform affine quantizer (DESIGN.md §2).

``q = clamp(round(w / s) + z, qmin, qmax)`` and ``ŵ = s · (q − z)``. Weights are 2-D
``(out, in)``; scales and zero points are ``(out, n_groups)`` where group j covers input
columns ``[j·g, min((j+1)·g, in))`` — the last group is shorter when g does not divide ``in``.
Per-channel is one group of the whole width, per-tensor a single (1, 1) scale.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from blockquant.spec import QuantSpec

_MIN_SCALE = 1e-10


def group_width(spec: QuantSpec, in_features: int) -> int:
    """Columns per group: the whole row for per-channel and per-tensor specs, and for a group
    size wider than the row (one group per row, not a padded one)."""
    return in_features if spec.group_size == -1 or spec.per_tensor else min(spec.group_size, in_features)


def n_groups(spec: QuantSpec, in_features: int) -> int:
    return math.ceil(in_features / group_width(spec, in_features))


def expand(params: Tensor, in_features: int, width: int) -> Tensor:
    """Repeat per-group params ``(out|1, n_groups)`` over their columns ``(out|1, in)``."""
    return params.repeat_interleave(width, dim=1)[:, :in_features]


def _group_minmax(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Per-group min and max, each ``(out, n_groups)`` (``(1, 1)`` per tensor)."""
    if spec.per_tensor:
        return w.min().reshape(1, 1), w.max().reshape(1, 1)
    out, cols = w.shape
    g = group_width(spec, cols)
    pad = n_groups(spec, cols) * g - cols
    if pad:  # pad the ragged last group with copies of its own first column (changes no min/max)
        w = torch.cat([w, w[:, cols - (cols % g) :][:, :1].expand(out, pad)], dim=1)
    w = w.reshape(out, -1, g)
    return w.amin(dim=2), w.amax(dim=2)


def round_scale(scale: Tensor, spec: QuantSpec) -> Tensor:
    """``scale`` (fp32) rounded to the nearest value ``spec.scale_dtype`` holds, kept in fp32.

    A checkpoint stores scales in that dtype: codes computed against the rounded scale make the
    fake-quant weights exactly the ones the checkpoint reloads. Clamped to the dtype's normal
    range first, so a tiny scale never becomes 0 (fp16 flushes below 6e-5) nor a huge one inf.
    """
    if spec.scale_dtype is None or spec.scale_dtype == "float32":
        return scale
    dtype = getattr(torch, spec.scale_dtype)
    info = torch.finfo(dtype)
    return scale.clamp(min=info.tiny, max=info.max).to(dtype).float()


def round_scale_ste(scale: Tensor, spec: QuantSpec) -> Tensor:
    """:func:`round_scale` forward, gradient 1 (learned step sizes, ``finetune.FakeQuantLinear``)."""
    return scale + (round_scale(scale, spec) - scale).detach()


def storage_ste(t: Tensor, spec: QuantSpec) -> Tensor:
    """``t`` rounded to the checkpoint's dtype (``spec.scale_dtype``), straight-through; signed values
    too. For the float tensors a fine-tuning step trains (norms, biases): training sees what is saved."""
    if spec.scale_dtype in (None, "float32"):
        return t
    return t + (t.to(getattr(torch, spec.scale_dtype)).float() - t).detach()


def qparams_from_range(lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and zero point for a range; the range always includes 0 so that 0 is exact.

    The scale is rounded to ``spec.scale_dtype`` before the zero point (and, by the caller,
    the codes) are computed against it.
    """
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    if spec.sym:
        absmax = torch.maximum(-lo, hi)
        scale = round_scale((absmax / ((spec.qmax - spec.qmin) / 2)).clamp(min=_MIN_SCALE), spec)
        return scale, torch.zeros_like(scale)
    scale = round_scale(((hi - lo) / (spec.qmax - spec.qmin)).clamp(min=_MIN_SCALE), spec)
    zero = torch.round(-lo / scale).clamp(spec.qmin, spec.qmax)
    return scale, zero


def compute_qparams(w: Tensor, spec: QuantSpec, shrink: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """Min–max scale and zero per group (``shrink`` < 1 clips the range, per group or scalar)."""
    lo, hi = _group_minmax(w.float(), spec)
    return qparams_from_range(lo * shrink, hi * shrink, spec)


def _per_group(t: Tensor, scale: Tensor, width: int) -> tuple[Tensor, Tensor | None]:
    """``t`` ``(out, in)`` viewed as ``(out|1, n_groups, width)`` with ``scale``'s shape ready to
    broadcast over it (``(…, n_groups, 1)``), when the groups tile the row exactly; else ``(t, None)``.
    Broadcasting a group's scale, rather than repeating it over its columns, allocates nothing."""
    cols = t.shape[1]
    if cols % width or scale.shape[1] != cols // width:
        return t, None
    return t.reshape(t.shape[0], -1, width), scale.unsqueeze(2)


def quantize(w: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """Integer codes (as float tensor) in ``[qmin, qmax]``."""
    width = group_width(spec, w.shape[1])
    wg, s = _per_group(w, scale, width)
    if s is None:  # a shorter last group: repeat the params over the columns
        s, z = expand(scale, w.shape[1], width), expand(zero, w.shape[1], width)
    else:
        z = zero.unsqueeze(2)
    q = torch.div(wg, s)
    return q.round_().add_(z).clamp_(spec.qmin, spec.qmax).reshape(w.shape)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec, in_place: bool = False) -> Tensor:
    """``s · (q − z)``; ``in_place`` overwrites ``q`` where the groups tile the row."""
    width = group_width(spec, q.shape[1])
    qg, s = _per_group(q, scale, width)
    if s is None:
        return expand(scale, q.shape[1], width) * (q - expand(zero, q.shape[1], width))
    shifted = qg.sub_(zero.unsqueeze(2)) if in_place else torch.sub(qg, zero.unsqueeze(2))
    return shifted.mul_(s).reshape(q.shape)


def fake_quantize(w: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """``dequantize(quantize(w))`` in fp32, one copy of ``w`` at a time."""
    return dequantize(quantize(w.float(), scale, zero, spec), scale, zero, spec, in_place=True)


def column_codes(w: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """Integer codes (as float tensor) of one column ``(out,)`` with its group's ``(out,)`` scale and zero (GPTQ)."""
    return torch.clamp(torch.round(w / scale) + zero, spec.qmin, spec.qmax)


# Weight values searched at a time by ``clip_search``: its hundred candidates pass over a 1 MiB slice of
# rows while it stays in the CPU's caches, not over the whole weight from memory (1.8x faster on a 2048x5632
# weight, and the search's temporaries are a slice's, not the weight's)
SEARCH_ELEMENTS = 1 << 18


def clip_search(
    w: Tensor,
    spec: QuantSpec,
    col_weight: Tensor | None = None,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
) -> tuple[Tensor, Tensor]:
    """Scale and zero per group minimising ``Σ c_j |w − ŵ|^norm`` over shrunk ranges.

    Tries ``grid`` shrink factors from 1 down to ``1 − max_shrink`` (the GPTQ reference's
    "mse" search); ``col_weight`` (e.g. ``diag(H)``, the mean squared input per column) turns
    it into an input-weighted error. Each row's groups are searched alone, so the rows are
    searched in slices of ``SEARCH_ELEMENTS`` values (the same result as all at once).
    """
    w = w.float()
    weights = None if col_weight is None else col_weight.float().reshape(1, -1)
    if spec.per_tensor:  # one range for the whole tensor
        return _search_rows(w, spec, weights, grid, max_shrink, norm)
    step = max(1, SEARCH_ELEMENTS // max(1, w.shape[1]))
    found = [_search_rows(w[a : a + step], spec, weights, grid, max_shrink, norm) for a in range(0, w.shape[0], step)]
    if len(found) == 1:
        return found[0]
    return torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])


def _search_rows(w: Tensor, spec: QuantSpec, weights: Tensor | None, grid: int, max_shrink: float, norm: float) -> tuple[Tensor, Tensor]:
    """``clip_search`` over all the rows of ``w`` at once (``weights``: the column weights, (1, in) or None)."""
    width = group_width(spec, w.shape[1])
    best_err = best_scale = best_zero = None
    for i in range(grid):
        p = 1 - max_shrink * i / grid
        scale, zero = compute_qparams(w, spec, p)
        err = fake_quantize(w, scale, zero, spec).sub_(w).abs_().pow_(norm)  # in place: one temporary of w's size
        if weights is not None:
            err.mul_(weights)
        # sum the error of each group: (out, n_groups), or (1, 1) per tensor
        err_g = _group_sums(err, spec, width)
        if best_err is None:
            best_err, best_scale, best_zero = err_g, scale, zero
            continue
        better = err_g < best_err
        best_err = torch.where(better, err_g, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _group_sums(err: Tensor, spec: QuantSpec, width: int) -> Tensor:
    if spec.per_tensor:
        return err.sum().reshape(1, 1)
    out, cols = err.shape
    pad = n_groups(spec, cols) * width - cols
    if pad:
        err = torch.cat([err, err.new_zeros(out, pad)], dim=1)
    return err.reshape(out, -1, width).sum(dim=2)


def round_ste(x: Tensor) -> Tensor:
    """Straight-through round: forward ``round(x)``, gradient 1 (for fine-tuning methods)."""
    return x + (torch.round(x) - x).detach()
