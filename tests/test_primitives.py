"""The uniform affine quantizer against an element-by-element reference written here.

The reference works on numpy float32 scalars one element at a time, with the rules of
DESIGN.md §2 spelled out: each group's range is widened to include 0; symmetric grids use
``absmax / ((qmax − qmin) / 2)`` and zero point 0; asymmetric ones ``(hi − lo) / (qmax − qmin)``
and ``z = clamp(round(−lo / s))``; ``q = clamp(round(w / s) + z)``, ``ŵ = s·(q − z)``. IEEE
float32 arithmetic with round-half-even is what torch does too, so results must be bit-equal.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import assert_on_grid

from blockquant.primitives import (
    clip_search,
    compute_qparams,
    dequantize,
    fake_quantize,
    group_width,
    n_groups,
    quantize,
    round_scale,
    round_scale_ste,
    round_ste,
)
from blockquant.recipe import QuantSpec

F32 = np.float32
MIN_SCALE = F32(1e-10)


def _round_half_even(x: np.float32) -> np.float32:
    return F32(np.round(x))


def reference_fake_quantize(w: torch.Tensor, spec: QuantSpec) -> tuple[list, list, list, list]:
    """Plain loops: (codes, dequantized, scale, zero) as nested lists of float32 scalars."""
    rows = [[F32(v) for v in row] for row in w.tolist()]
    out, cols = len(rows), len(rows[0])
    if spec.per_tensor:
        spans = [(0, cols)]
    else:
        width = cols if spec.group_size == -1 else spec.group_size
        spans = [(a, min(a + width, cols)) for a in range(0, cols, width)]

    def params(values: list) -> tuple[np.float32, np.float32]:
        lo = min(min(values), F32(0.0))
        hi = max(max(values), F32(0.0))
        if spec.sym:
            absmax = max(-lo, hi)
            scale = max(absmax / F32((spec.qmax - spec.qmin) / 2), MIN_SCALE)
            return scale, F32(0.0)
        scale = max((hi - lo) / F32(spec.qmax - spec.qmin), MIN_SCALE)
        zero = min(max(_round_half_even(-lo / scale), F32(spec.qmin)), F32(spec.qmax))
        return scale, zero

    if spec.per_tensor:
        s, z = params([v for row in rows for v in row])
        scales, zeros = [[s]], [[z]]
    else:
        scales = [[params(row[a:b])[0] for a, b in spans] for row in rows]
        zeros = [[params(row[a:b])[1] for a, b in spans] for row in rows]

    codes = [[F32(0.0)] * cols for _ in range(out)]
    deq = [[F32(0.0)] * cols for _ in range(out)]
    for r in range(out):
        for j, (a, b) in enumerate(spans):
            s = scales[0][0] if spec.per_tensor else scales[r][j]
            z = zeros[0][0] if spec.per_tensor else zeros[r][j]
            for c in range(a, b):
                q = _round_half_even(rows[r][c] / s) + z
                q = min(max(q, F32(spec.qmin)), F32(spec.qmax))
                codes[r][c] = q
                deq[r][c] = s * (q - z)
    return codes, deq, scales, zeros


def _as_tensor(nested: list) -> torch.Tensor:
    return torch.tensor(np.array(nested, dtype=np.float32))


def make_weight(out: int, cols: int, seed: int) -> torch.Tensor:
    """Random weights with the awkward cases: exact zeros, an all-zero row, an all-positive
    row, an all-negative row and an outlier."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g) * 0.05
    w[0, ::7] = 0.0
    w[1] = 0.0
    w[2] = w[2].abs() + 0.01
    w[3] = -w[3].abs() - 0.01
    w[4, cols // 2] = 0.9
    return w


GRANULARITIES = {
    "tensor": dict(group_size=-1, per_tensor=True),
    "channel": dict(group_size=-1),
    "g32": dict(group_size=32),
    "g128": dict(group_size=128),
}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("gran", list(GRANULARITIES))
@pytest.mark.parametrize("cols", [100, 688, 64])
def test_quantizer_matches_loop_reference(bits, sym, gran, cols):
    spec = QuantSpec(bits=bits, sym=sym, **GRANULARITIES[gran])
    w = make_weight(6, cols, seed=bits * 7 + cols)
    ref_codes, ref_deq, ref_scale, ref_zero = reference_fake_quantize(w, spec)

    scale, zero = compute_qparams(w, spec)
    expected_groups = 1 if spec.per_tensor else math.ceil(cols / (cols if spec.group_size == -1 else spec.group_size))
    assert scale.shape == zero.shape == ((1, 1) if spec.per_tensor else (6, expected_groups))
    assert n_groups(spec, cols) == expected_groups
    assert torch.equal(scale, _as_tensor(ref_scale))
    assert torch.equal(zero, _as_tensor(ref_zero))

    codes = quantize(w, scale, zero, spec)
    assert torch.equal(codes, torch.round(codes)), "codes must be integers"
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    assert torch.equal(codes, _as_tensor(ref_codes))

    deq = dequantize(codes, scale, zero, spec)
    assert torch.equal(deq, _as_tensor(ref_deq))
    assert torch.equal(fake_quantize(w, scale, zero, spec), _as_tensor(ref_deq))
    assert_on_grid(deq, scale, zero, spec)


def test_ragged_last_group_uses_only_its_own_columns():
    """688 = 5·128 + 48: the last group's range comes from its 48 columns only."""
    spec = QuantSpec(bits=4, group_size=128)
    w = torch.zeros(2, 688)
    w[:, :640] = 10.0  # big values in the full groups must not leak into the ragged one
    w[:, 640:] = torch.linspace(-1.0, 2.0, 48)
    scale, zero = compute_qparams(w, spec)
    assert scale.shape == (2, 6)
    assert torch.allclose(scale[:, 5], torch.full((2,), 3.0 / 15))
    # min-max grid: both ends of the ragged group are (nearly) exact
    deq = fake_quantize(w, scale, zero, spec)
    assert (deq[:, 640:] - w[:, 640:]).abs().max() <= scale[0, 5] / 2 + 1e-6
    assert group_width(spec, 688) == 128 and n_groups(spec, 688) == 6


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("gran", list(GRANULARITIES))
def test_zero_is_exactly_representable(bits, sym, gran):
    spec = QuantSpec(bits=bits, sym=sym, **GRANULARITIES[gran])
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(5, 100, generator=g)
    w[2] = w[2].abs() + 0.5  # all-positive row: range [0.5, …] must be widened to include 0
    w[3] = -w[3].abs() - 0.5
    zeros_at = torch.rand(5, 100, generator=g) < 0.2
    w[zeros_at] = 0.0
    for shrink in (1.0, 0.6):
        scale, zero = compute_qparams(w, spec, shrink)
        deq = fake_quantize(w, scale, zero, spec)
        assert torch.all(deq[zeros_at] == 0.0)
    scale, zero = clip_search(w, spec, grid=20)
    assert torch.all(fake_quantize(w, scale, zero, spec)[zeros_at] == 0.0)


def test_all_zero_weight_stays_zero():
    for spec in (QuantSpec(4, 32), QuantSpec(3, -1, sym=True), QuantSpec(2, -1, per_tensor=True)):
        w = torch.zeros(3, 40)
        scale, zero = compute_qparams(w, spec)
        assert torch.all(scale > 0)
        deq = fake_quantize(w, scale, zero, spec)
        assert torch.equal(deq, w)


def _group_error(w, w_hat, spec, col_weight, norm=2.4):
    """Σ over each group of c_j |w − ŵ|^norm, computed with explicit group slices."""
    err = (w - w_hat).abs().pow(norm)
    if col_weight is not None:
        err = err * col_weight.reshape(1, -1)
    if spec.per_tensor:
        return err.sum().reshape(1, 1)
    width = group_width(spec, w.shape[1])
    return torch.stack([err[:, a : a + width].sum(1) for a in range(0, w.shape[1], width)], dim=1)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("gran", list(GRANULARITIES))
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_clip_search_never_worse_than_minmax(bits, sym, gran, weighted):
    spec = QuantSpec(bits=bits, sym=sym, **GRANULARITIES[gran])
    torch.manual_seed(bits + 10 * sym)
    g = torch.Generator().manual_seed(bits + 10 * sym)
    # heavy-tailed weights: clipping the outliers pays off for most groups
    w = torch.distributions.StudentT(2.0).sample((8, 100)) * 0.02
    col_weight = torch.rand(100, generator=g) + 0.1 if weighted else None

    s0, z0 = compute_qparams(w, spec)
    s1, z1 = clip_search(w, spec, col_weight)
    assert s1.shape == s0.shape and z1.shape == z0.shape
    e0 = _group_error(w, fake_quantize(w, s0, z0, spec), spec, col_weight)
    e1 = _group_error(w, fake_quantize(w, s1, z1, spec), spec, col_weight)
    assert torch.all(e1 <= e0), "the search returned a range worse than min-max"
    if not spec.per_tensor:
        assert torch.any(e1 < e0 * 0.99), "the search never found a better range on heavy-tailed weights"
    # the searched scales are shrunk min-max scales, never wider
    assert torch.all(s1 <= s0 * (1 + 1e-6))
    assert_on_grid(fake_quantize(w, s1, z1, spec), s1, z1, spec)


def test_clip_search_weights_columns():
    """With all the weight on one column, the search minimises that column's error alone."""
    spec = QuantSpec(bits=3, group_size=-1)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g) * 0.02
    w[:, 0] = 0.5  # an outlier column
    only_outlier = torch.zeros(32)
    only_outlier[0] = 1.0
    s, z = clip_search(w, spec, only_outlier)
    s_plain, z_plain = clip_search(w, spec)
    e_weighted = (fake_quantize(w, s, z, spec) - w)[:, 0].abs().sum()
    e_plain = (fake_quantize(w, s_plain, z_plain, spec) - w)[:, 0].abs().sum()
    # per row, the weighted search minimises exactly column 0's error over the same candidates
    assert e_weighted <= e_plain


@pytest.mark.parametrize("bits", [1, 5, 6, 16, 0])
def test_quantspec_rejects_unsupported_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("group_size", [0, -2, -128])
def test_quantspec_rejects_bad_group_size(group_size):
    with pytest.raises(ValueError, match="group size"):
        QuantSpec(bits=4, group_size=group_size)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantspec_code_range(bits):
    asym, sym = QuantSpec(bits=bits), QuantSpec(bits=bits, sym=True)
    assert (asym.qmin, asym.qmax) == (0, 2**bits - 1)
    assert (sym.qmin, sym.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert QuantSpec(bits=bits, group_size=-1).group_size == -1


def test_round_ste_forward_rounds_and_gradient_passes():
    x = torch.tensor([0.4, 1.5, -2.6], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y.detach(), torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_scales_are_representable_in_scale_dtype_and_codes_use_them(dtype, sym):
    """Scales round to the stored dtype before the codes: the fp32 fake-quant equals the reload."""
    spec = QuantSpec(4, 32, sym=sym, scale_dtype=dtype)
    w = torch.randn(16, 100, generator=torch.Generator().manual_seed(0))
    for scale, zero in (compute_qparams(w, spec), clip_search(w, spec, grid=10)):
        stored = scale.to(getattr(torch, dtype))
        assert torch.equal(stored.float(), scale)
        assert torch.equal(
            fake_quantize(w, scale, zero, spec), dequantize(quantize(w, stored.float(), zero, spec), stored.float(), zero, spec)
        )
        assert_on_grid(fake_quantize(w, scale, zero, spec), scale, zero, spec)
    unrounded, _ = compute_qparams(w, QuantSpec(4, 32, sym=sym))
    assert torch.equal(unrounded, compute_qparams(w, QuantSpec(4, 32, sym=sym, scale_dtype="float32"))[0])
    assert not torch.equal(unrounded, scale)


def test_round_scale_keeps_scales_positive_and_finite():
    tiny = torch.tensor([1e-10, 1e-7, 3e5])
    half = round_scale(tiny, QuantSpec(scale_dtype="float16"))
    assert (half > 0).all() and torch.isfinite(half).all() and half[0] == torch.finfo(torch.float16).tiny
    assert torch.equal(round_scale(tiny, QuantSpec(scale_dtype="bfloat16")), tiny.to(torch.bfloat16).float())
    x = torch.tensor([0.0123], requires_grad=True)
    round_scale_ste(x, QuantSpec(scale_dtype="bfloat16")).sum().backward()
    assert torch.equal(x.grad, torch.ones(1))


@pytest.mark.parametrize("dtype", ["float64", "bf16", "int8"])
def test_quantspec_rejects_unknown_scale_dtype(dtype):
    with pytest.raises(ValueError, match="scale_dtype must be one of float32, bfloat16, float16"):
        QuantSpec(scale_dtype=dtype)


@pytest.mark.parametrize("group_size, per_tensor", [(32, False), (-1, False), (-1, True)])
def test_range_search_in_row_slices_equals_the_whole_search(monkeypatch, group_size, per_tensor):
    """``clip_search`` searches a few rows at a time (cache-sized slices): each row's groups are
    searched alone, so the slices find what one search over the whole weight finds."""
    from blockquant import primitives

    spec = QuantSpec(bits=3, group_size=group_size, sym=False, per_tensor=per_tensor)
    w = torch.randn(37, 70, generator=torch.Generator().manual_seed(0))
    col_weight = torch.rand(70, generator=torch.Generator().manual_seed(1))
    whole = primitives.clip_search(w, spec, col_weight)
    monkeypatch.setattr(primitives, "SEARCH_ELEMENTS", 3 * 70)  # slices of 3 rows, the last one of 1
    sliced = primitives.clip_search(w, spec, col_weight)
    assert all(torch.equal(a, b) for a, b in zip(whole, sliced))
