"""GPTQ on hand-made layers: against brute force, against its own definition, and on-grid."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import assert_on_grid

from blockquant.methods.gptq import GPTQOptions, gptq_quantize
from blockquant.primitives import compute_qparams, fake_quantize, group_width, n_groups
from blockquant.recipe import QuantSpec


def correlated_hessian(cols: int, seed: int, shared: float = 1.0, n: int = 256) -> torch.Tensor:
    """``H = 2/N XᵀX`` of inputs that share a common component (like real activations)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g) + shared * torch.randn(n, 1, generator=g)
    x = x * (0.5 + torch.rand(cols, generator=g))  # unequal column scales: act-order matters
    return 2.0 / n * x.T @ x


def objective(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-row ``(w − ŵ)ᵀ H (w − ŵ)`` in float64."""
    d = w.double() - w_hat.double()
    return torch.einsum("ri,ij,rj->r", d, h.double(), d)


def brute_force_optimum(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-row minimum of the objective over ALL integer code vectors of the row's grid."""
    cols = w.shape[1]
    codes = torch.tensor(list(itertools.product(range(spec.qmin, spec.qmax + 1), repeat=cols)), dtype=torch.float64)
    codes = codes.T  # (cols, K)
    s, z = scale.double()[:, :1, None], zero.double()[:, :1, None]  # (out, 1, 1): per-channel grid
    d = w.double()[:, :, None] - s * (codes[None] - z)  # (out, cols, K)
    return torch.einsum("rik,ij,rjk->rk", d, h.double(), d).min(dim=1).values


# ---------------------------------------------------------------------------------------------
# Brute force


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act_order"])
def test_gptq_near_brute_force_and_beats_rtn(seed, act_order):
    """2-bit per-channel, 6 inputs: 4⁶ = 4096 code vectors per row, all tried."""
    spec = QuantSpec(bits=2, group_size=-1)
    g = torch.Generator().manual_seed(100 + seed)
    w = torch.randn(16, 6, generator=g)
    h = correlated_hessian(6, seed)

    w_hat, scale, zero, g_idx = gptq_quantize(w, h, spec, GPTQOptions(damp=1e-4, act_order=act_order, clip_search=False))
    assert g_idx is None  # per-channel: no groups to permute
    # the grid is the min–max grid of each row, as the brute force assumes
    s_ref, z_ref = compute_qparams(w, spec)
    assert torch.equal(scale, s_ref) and torch.equal(zero, z_ref)
    assert_on_grid(w_hat, scale, zero, spec)

    best = brute_force_optimum(w, h, scale, zero, spec)
    gptq = objective(w, w_hat, h)
    rtn = objective(w, fake_quantize(w, scale, zero, spec), h)
    assert torch.all(gptq >= best * (1 - 1e-6)), "brute force must be the optimum"
    # the layer objective tr(ΔW H ΔWᵀ): near the optimum, and no worse than rounding
    assert gptq.sum() <= 2.0 * best.sum()
    assert gptq.sum() <= rtn.sum()


def test_rtn_is_far_from_optimum_on_the_same_problems():
    """Guards the test above against being vacuous: on these problems, rounding alone is
    clearly worse than the optimum, so the bounds GPTQ meets are not met for free."""
    spec = QuantSpec(bits=2, group_size=-1)
    ratios = []
    for seed in range(8):
        g = torch.Generator().manual_seed(100 + seed)
        w = torch.randn(16, 6, generator=g)
        h = correlated_hessian(6, seed)
        scale, zero = compute_qparams(w, spec)
        best = brute_force_optimum(w, h, scale, zero, spec)
        ratios.append(float(objective(w, fake_quantize(w, scale, zero, spec), h).sum() / best.sum()))
    assert sum(ratios) / len(ratios) > 1.3


# ---------------------------------------------------------------------------------------------
# Against the definition: the optimal-brain-quantizer recursion, checked step by step


def check_gptq_definition(w, h, spec, damp, act_order, static_groups, w_hat, scale, zero, g_idx):
    """Replay GPTQ's decisions against its definition, in float64, without lazy batching.

    Before column c (in quantization order) is rounded, the columns not yet quantized R hold
    their exact optimum given the quantized ones F: ``w_R − H_RR⁻¹ H_RF (ŵ_F − w_F)`` (damped H).
    Column c must then be rounded to a nearest point of its grid, and a non-static group's grid
    must be the min–max grid of its columns' values at the moment its first column comes up.
    The check follows the implementation's own ŵ_F, so a float-noise tie (the symmetric grid
    puts a group's extreme value exactly half-way between two codes) cannot derail it.
    """
    w0 = w.double()
    hd = h.double().clone()
    hd.diagonal().add_(damp * hd.diagonal().mean())
    out, cols = w0.shape
    width = group_width(spec, cols)
    grouped = spec.group_size != -1 and not spec.per_tensor
    dynamic = grouped and not static_groups
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    if not dynamic:
        s_ref, z_ref = compute_qparams(w, spec)
        assert torch.equal(scale, s_ref) and torch.equal(zero, z_ref), "upfront grid is not min–max of W"
    col_spec = QuantSpec(bits=spec.bits, group_size=-1, sym=spec.sym)
    for pos, c in enumerate(order.tolist()):
        F, R = order[:pos], order[pos:]
        cur = w0[:, R]
        if pos:
            cur = cur - torch.linalg.solve(hd[R][:, R], hd[R][:, F] @ (w_hat.double()[:, F] - w0[:, F]).T).T
        if dynamic:
            j = pos // width
            assert g_idx is None or int(g_idx[c]) == j
            if pos % width == 0:
                lo = cur[:, :width].min(dim=1).values.clamp(max=0)
                hi = cur[:, :width].max(dim=1).values.clamp(min=0)
                s_exp, _ = compute_qparams(cur[:, :width].float(), col_spec)
                assert torch.allclose(scale[:, j].double(), s_exp[:, 0].double(), rtol=1e-4), f"grid of group {j}"
                if not spec.sym:  # z is a nearest integer to −lo / s
                    assert torch.all((zero[:, j].double() - (-lo / scale[:, j].double())).abs() <= 0.5 + 1e-4)
                else:
                    assert torch.all(zero[:, j] == 0)
                    assert torch.allclose(scale[:, j].double(), torch.maximum(-lo, hi) / ((spec.qmax - spec.qmin) / 2), rtol=1e-4)
        else:
            j = c // width if grouped else 0
        s, z = scale[:, j].double(), zero[:, j].double()
        code = w_hat.double()[:, c] / s + z
        assert torch.allclose(code, torch.round(code), atol=1e-4)
        target = (cur[:, 0] / s + z).clamp(spec.qmin, spec.qmax)
        assert torch.all((code - target).abs() <= 0.5 + 1e-4), f"column {c} is not rounded to nearest"


DEFINITION_CASES = [
    (QuantSpec(3, -1), False, False),
    (QuantSpec(4, -1, sym=True), True, False),
    (QuantSpec(4, 4), False, False),
    (QuantSpec(4, 4), True, False),
    (QuantSpec(4, 4), True, True),
    (QuantSpec(3, 4, sym=True), True, False),
    (QuantSpec(3, 4, sym=True), False, False),
    (QuantSpec(4, 5), True, False),  # 12 = 5 + 5 + 2: ragged last group
    (QuantSpec(3, 5, sym=True), False, True),
    (QuantSpec(2, -1, per_tensor=True), True, False),
]


@pytest.mark.parametrize(
    "spec,act_order,static_groups",
    DEFINITION_CASES,
    ids=[f"{s.describe().replace(' ', '-')}{'-act' if a else ''}{'-static' if st else ''}" for s, a, st in DEFINITION_CASES],
)
@pytest.mark.parametrize("block_size", [128, 4, 1])  # lazy batching must not change the maths
def test_gptq_follows_its_definition(spec, act_order, static_groups, block_size):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(8, 12, generator=g)
    h = correlated_hessian(12, seed=3, shared=0.7)
    opts = GPTQOptions(damp=0.01, act_order=act_order, static_groups=static_groups, block_size=block_size, clip_search=False)
    w_hat, scale, zero, g_idx = gptq_quantize(w, h, spec, opts)
    check_gptq_definition(w, h, spec, 0.01, act_order, static_groups, w_hat, scale, zero, g_idx)


def test_definition_check_catches_missing_error_feedback():
    """The replay above is not vacuous: rounding without error feedback (RTN) violates it."""
    spec = QuantSpec(3, -1)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(8, 12, generator=g)
    h = correlated_hessian(12, seed=3, shared=0.7)
    scale, zero = compute_qparams(w, spec)
    with pytest.raises(AssertionError, match="not rounded to nearest"):
        check_gptq_definition(w, h, spec, 0.01, False, False, fake_quantize(w, scale, zero, spec), scale, zero, None)


def test_gptq_with_diagonal_hessian_is_rtn():
    """Uncorrelated inputs: no error can be compensated, GPTQ must round to nearest."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 40, generator=g)
    h = torch.diag(torch.rand(40, generator=g) + 0.5)
    for spec in (QuantSpec(3, -1), QuantSpec(4, 16), QuantSpec(2, -1, per_tensor=True)):
        w_hat, scale, zero, _ = gptq_quantize(w, h, spec, GPTQOptions(act_order=False, clip_search=False))
        assert torch.equal(w_hat, fake_quantize(w, scale, zero, spec))


# ---------------------------------------------------------------------------------------------
# Grids, act-order, static groups, dead columns


VARIANTS = [
    dict(act_order=False, static_groups=False),
    dict(act_order=True, static_groups=False),
    dict(act_order=True, static_groups=True),
    dict(act_order=False, static_groups=True),
    dict(act_order=True, static_groups=False, clip_search=True),
    dict(act_order=False, static_groups=False, block_size=8),
]


@pytest.mark.parametrize("opts", VARIANTS, ids=lambda o: "-".join(k for k, v in o.items() if v) or "plain")
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(4, 32),
        QuantSpec(3, 32, sym=True),
        QuantSpec(2, 128),
        QuantSpec(4, -1),
        QuantSpec(8, 16, sym=False),
        QuantSpec(8, -1, per_tensor=True),
    ],
    ids=lambda s: s.describe().replace(" ", "-"),
)
def test_gptq_output_on_grid(spec, opts):
    cols = 100  # 3·32 + 4 and 100 < 128: ragged groups
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, cols, generator=g)
    h = correlated_hessian(cols, seed=1, shared=0.5)
    w_hat, scale, zero, g_idx = gptq_quantize(w, h, spec, GPTQOptions(**opts))
    assert w_hat.shape == w.shape
    expected = (1, 1) if spec.per_tensor else (12, n_groups(spec, cols))
    assert scale.shape == zero.shape == expected
    assert_on_grid(w_hat, scale, zero, spec, g_idx)
    assert objective(w, w_hat, h).sum() < objective(w, torch.zeros_like(w), h).sum()


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(3, 7, sym=True)], ids=["g32", "g7-ragged"])
def test_g_idx_only_for_act_order_without_static_groups(spec):
    cols = 100
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, cols, generator=g)
    h = correlated_hessian(cols, seed=2)
    width, groups = spec.group_size, n_groups(spec, cols)

    _, _, _, g_idx = gptq_quantize(w, h, spec, GPTQOptions(act_order=True, static_groups=False))
    assert g_idx is not None and g_idx.shape == (cols,) and g_idx.dtype == torch.long
    assert int(g_idx.min()) == 0 and int(g_idx.max()) == groups - 1
    # groups are runs of `width` columns in order of decreasing diag(H); the last one is ragged
    perm = torch.argsort(torch.diag(h), descending=True)
    assert torch.equal(g_idx[perm], torch.arange(cols) // width)
    counts = torch.bincount(g_idx, minlength=groups)
    assert counts[:-1].eq(width).all() and counts[-1] == cols - (groups - 1) * width
    assert not torch.equal(g_idx, torch.arange(cols) // width), "act-order should permute this layer"

    for opts in (
        GPTQOptions(act_order=False),
        GPTQOptions(act_order=True, static_groups=True),
        GPTQOptions(act_order=False, static_groups=True),
    ):
        assert gptq_quantize(w, h, spec, opts)[3] is None
    assert gptq_quantize(w, h, QuantSpec(4, -1), GPTQOptions(act_order=True))[3] is None


@pytest.mark.parametrize("opts", VARIANTS[:4], ids=["plain", "act", "act-static", "static"])
def test_dead_columns_give_zero_weight(opts):
    cols = 40
    g = torch.Generator().manual_seed(3)
    x = torch.randn(128, cols, generator=g)
    dead = [0, 5, 17, 39]
    x[:, dead] = 0.0  # inputs that are never excited
    h = 2.0 / 128 * x.T @ x
    assert torch.all(torch.diag(h)[dead] == 0)
    w = torch.randn(6, cols, generator=g) + 0.3
    spec = QuantSpec(4, 16)
    w_hat, scale, zero, g_idx = gptq_quantize(w, h, spec, GPTQOptions(**opts))
    assert torch.all(w_hat[:, dead] == 0.0)
    assert_on_grid(w_hat, scale, zero, spec, g_idx)
    assert torch.isfinite(w_hat).all()


def test_gptq_does_not_modify_inputs():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 20, generator=g)
    h = correlated_hessian(20, seed=4)
    h[3, :] = 0.0
    h[:, 3] = 0.0
    w0, h0 = w.clone(), h.clone()
    gptq_quantize(w, h, QuantSpec(4, 8), GPTQOptions())
    assert torch.equal(w, w0) and torch.equal(h, h0)


def test_gptq_options_validation():
    for bad in (dict(damp=0.0), dict(damp=1.0), dict(damp=-0.1), dict(block_size=0)):
        with pytest.raises(ValueError):
            GPTQOptions(**bad)


def test_singular_hessian_is_damped_not_fatal(caplog):
    """A rank-deficient Hessian (fewer tokens than inputs) still quantizes."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 16, generator=g)  # rank 3 < 16
    h = 2.0 / 3 * x.T @ x
    w = torch.randn(4, 16, generator=g)
    w_hat, scale, zero, g_idx = gptq_quantize(w, h, QuantSpec(4, 8), GPTQOptions(damp=0.01))
    assert torch.isfinite(w_hat).all()
    assert_on_grid(w_hat, scale, zero, QuantSpec(4, 8), g_idx)


# (seed, bits, group): the range search wins the first two, min–max the last two (after GPTQ's
# error feedback a narrower grid can lose), so "auto" must really try both
@pytest.mark.parametrize("seed,bits,group", [(2, 2, 16), (3, 3, 32), (2, 4, 16), (6, 4, -1)])
def test_auto_clip_search_keeps_the_lower_output_error(seed, bits, group):
    """clip_search='auto' returns whichever of with/without the range search has lower tr(ΔW H ΔWᵀ)."""
    from blockquant.capture import relative_error

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 64, generator=g)
    if seed % 3 == 0:
        w[:, :4] *= 8
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g) * 0.3 + torch.randn(512, 64, generator=g)
    h = 2 * x.T @ x / 512
    spec = QuantSpec(bits, group)
    errors = {c: relative_error(w, gptq_quantize(w, h, spec, GPTQOptions(clip_search=c))[0], h) for c in (True, False, "auto")}
    assert errors["auto"] == min(errors[True], errors[False])
    assert (errors[True] < errors[False]) == (bits < 4)  # the cases above cover both winners
    with pytest.raises(ValueError, match="clip_search"):
        GPTQOptions(clip_search="sometimes")


@pytest.mark.parametrize("elements", [1 << 22, 700, 64], ids=["one-sweep", "chunks", "row-pieces"])
@pytest.mark.parametrize(
    "spec, opts",
    [
        (QuantSpec(bits=3, group_size=16), {}),
        (QuantSpec(bits=4, group_size=16, sym=False), {"act_order": True, "static_groups": False, "clip_search": "auto"}),
        (QuantSpec(bits=4, group_size=-1), {"clip_search": True}),
        (QuantSpec(bits=4, group_size=-1, per_tensor=True), {"act_order": False}),
    ],
    ids=["static-auto", "act-order-groups", "channel-clip", "tensor"],
)
def test_weights_sharing_an_input_quantize_as_they_do_alone(monkeypatch, elements, spec, opts):
    """q/k/v (or gate/up) are swept together, in chunks of rows: each weight as if quantized alone."""
    from blockquant.methods import gptq

    g = torch.Generator().manual_seed(7)
    ws = [torch.randn(rows, 48, generator=g) for rows in (24, 8, 8)]
    h = correlated_hessian(48, seed=3)
    options = GPTQOptions(**opts)
    alone = [gptq_quantize(w, h, spec, options) for w in ws]
    monkeypatch.setattr(gptq, "SWEEP_ELEMENTS", elements)
    together = gptq.gptq_quantize_group(ws, h, spec, options)
    for a, b in zip(alone, together, strict=True):
        for x, y in zip(a, b.as_tuple(), strict=True):
            assert (x is None and y is None) or torch.allclose(x.float(), y.float(), atol=1e-6, rtol=0)


def test_collect_hessians_is_the_mean_gram_of_each_input():
    """The panel-wise upper-triangle accumulation, mirrored, is ``2/N Σ x xᵀ`` over every batch."""
    from torch import nn

    from blockquant.capture import BlockInputs, collect_hessians

    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(300, 600), nn.ReLU(), nn.Linear(600, 20)).double()
    hidden = [torch.randn(2, 5, 300, dtype=torch.float64) for _ in range(3)]
    inputs = BlockInputs(hidden, [()] * 3, [{}] * 3)
    h = collect_hessians(block, inputs, {"first": block[0], "second": block[2]})
    x1 = torch.cat(hidden).reshape(-1, 300)
    x2 = torch.relu(block[0](x1))
    for name, x in (("first", x1), ("second", x2)):
        expected = 2.0 / len(x) * x.t().double() @ x.double()
        assert torch.allclose(h[name].double(), expected, rtol=1e-5, atol=1e-6), name
        assert torch.equal(h[name], h[name].t())


def test_gram_sum_over_token_slices_of_wide_inputs(monkeypatch):
    """A wide input's Gram sum converts a bounded number of values at a time (fewer tokens the wider
    the input, 64 at least): the sum over those token slices is still ``alpha · xᵀx`` above the diagonal."""
    from blockquant import capture

    monkeypatch.setattr(capture, "GRAM_ELEMENTS", 300 * 100)  # 100 tokens of a 300-wide input
    torch.manual_seed(0)
    x = torch.randn(1000, 300, dtype=torch.bfloat16)
    h = capture.mirror_upper(capture.add_gram(torch.zeros(300, 300), x, 0.5))
    expected = 0.5 * x.double().t() @ x.double()
    assert torch.allclose(h.double(), expected, rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(capture, "GRAM_ELEMENTS", 1)  # never fewer than 64 tokens at a time
    h64 = capture.mirror_upper(capture.add_gram(torch.zeros(300, 300), x, 0.5))
    assert torch.allclose(h64.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cols", [37, 300])
def test_inverse_factor_in_place_is_the_out_of_place_one(monkeypatch, cols):
    """H's permuted copy is factored, inverted and factored again in its own memory, with the
    same numbers, bit for bit, as the three out-of-place steps; ``h`` itself is left alone."""
    from blockquant.methods import gptq

    h = correlated_hessian(cols, seed=2)
    h[4, :] = h[:, 4] = 0.0
    dead = torch.diag(h) == 0
    perm = torch.argsort(torch.where(dead, 1.0, torch.diag(h)), descending=True)
    h0 = h.clone()
    copies = []
    permuted = gptq._permuted
    monkeypatch.setattr(gptq, "_permuted", lambda *a: copies.append(permuted(*a)) or copies[-1])
    factor, damping = gptq._inverse_cholesky(h, perm, dead[perm], 0.01)
    ref = h[perm][:, perm]
    ref.diagonal()[dead[perm]] = 1
    lam = 0.01 * torch.mean(torch.diag(ref))
    ref.diagonal().add_(lam)
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(ref)), upper=True)
    assert torch.equal(factor, expected) and damping == float(lam)
    assert len(copies) == 1 and factor.untyped_storage().data_ptr() == copies[0].untyped_storage().data_ptr()
    assert torch.equal(h, h0)


def test_output_error_adds_up_over_rows():
    """``tr(ΔW H ΔWᵀ)`` summed a few rows at a time is the whole product; pieces add up to it."""
    from blockquant.capture import ERROR_ROWS, output_error, relative_error

    g = torch.Generator().manual_seed(3)
    w = torch.randn(2 * ERROR_ROWS + 5, 40, generator=g)
    w_hat = w + 0.1 * torch.randn(w.shape, generator=g)
    h = correlated_hessian(40, seed=3)
    whole = float(objective(w, w_hat, h).sum())
    assert output_error(w, h, w_hat) == pytest.approx(whole, rel=1e-6)
    assert output_error(w[:7], h, w_hat[:7]) + output_error(w[7:], h, w_hat[7:]) == pytest.approx(whole, rel=1e-6)
    assert relative_error(w.bfloat16(), w_hat, h) == pytest.approx(
        float(objective(w.bfloat16().float(), w_hat, h).sum() / objective(w.bfloat16().float(), torch.zeros_like(w), h).sum()), rel=1e-6
    )


@pytest.mark.parametrize(
    "spec, opts",
    [
        (QuantSpec(bits=4, group_size=16), {}),
        (QuantSpec(bits=2, group_size=16, sym=False), {"act_order": True, "static_groups": False}),
        (QuantSpec(bits=3, group_size=-1), {"clip_search": True}),
        (QuantSpec(bits=4, group_size=-1, per_tensor=True), {"act_order": False}),
    ],
    ids=["static-auto", "act-order-groups", "channel-clip", "tensor"],
)
@pytest.mark.parametrize("tokens", [512, 20], ids=["full-rank", "rank-deficient"])
def test_errors_from_the_sweep_are_the_products_with_h(spec, opts, tokens):
    """GPTQ scores its range choices and reports ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` from the sweep's
    own scaled errors (so that H can be freed once factored): the product with H, up to rounding,
    with a never-excited column and with fewer tokens than inputs."""
    from blockquant.capture import relative_error
    from blockquant.methods import gptq

    h = correlated_hessian(48, seed=4, n=tokens)
    h[7, :] = h[:, 7] = 0.0
    w = torch.randn(40, 48, generator=torch.Generator().manual_seed(4))
    q = gptq.gptq_quantize_group([w], h, spec, GPTQOptions(**opts))[0]
    assert q.error == pytest.approx(relative_error(w, q.w_hat, h), rel=1e-4)


@pytest.mark.parametrize("indefinite", [False, True], ids=["first-try", "more-damping"])
def test_free_hessian_factors_in_place_and_releases_h(caplog, indefinite):
    """With ``free_hessian`` the factor is computed in H's own memory (permuted in place; a failed
    attempt restored from the kept lower triangle) and the caller's H is emptied: the results
    are those of the copy, bit for bit."""
    from blockquant.methods import gptq

    h = correlated_hessian(48, seed=5)
    h[9, :] = h[:, 9] = 0.0
    if indefinite:  # the default damping is not enough: a second attempt, from the restored matrix
        live = torch.arange(48) != 9
        lowest = torch.linalg.eigvalsh(h[live][:, live])[0]
        h -= (lowest + 0.05 * torch.mean(torch.diag(h))) * torch.eye(48)
        h[9, 9] = 0.0
    ws = [torch.randn(rows, 48, generator=torch.Generator().manual_seed(rows)) for rows in (16, 8)]
    spec, opts = QuantSpec(bits=3, group_size=16), GPTQOptions()
    kept = gptq.gptq_quantize_group(ws, h, spec, opts)
    assert ("needed damping" in caplog.text) == indefinite
    freed = gptq.gptq_quantize_group(ws, h, spec, opts, free_hessian=True)
    assert h.untyped_storage().nbytes() == 0
    for a, b in zip(kept, freed, strict=True):
        assert torch.equal(a.w_hat, b.w_hat) and a.error == b.error and a.clip == b.clip


@pytest.mark.parametrize("cols", [37, 600])
def test_permute_in_place_is_the_indexed_copy(cols):
    """Rows, tile-wise transpose, rows: the symmetric permutation, in the matrix's own memory."""
    from blockquant.methods import gptq

    h = torch.randn(cols, cols)
    h = h + h.t()
    perm = torch.randperm(cols, generator=torch.Generator().manual_seed(1))
    expected, at = h[perm][:, perm], h.data_ptr()
    gptq._permute_in_place(h, perm)
    assert torch.equal(h, expected) and h.data_ptr() == at


def test_block_forwards_in_parts_of_each_batch_are_the_whole_batch_ones(monkeypatch, tiny_model, calib_ids):
    """The Hessian passes and ``run_block`` run each batch a few samples at a time (masks,
    position ids and rotary tables cut with them): every family's Hessians and block outputs
    are those of the whole batches."""
    from blockquant import capture
    from blockquant.arch import arch_for, get_blocks

    _, model = tiny_model
    arch = arch_for(model)
    blocks = get_blocks(model, arch)
    mask = torch.ones_like(calib_ids)
    mask[1::2, :5] = 0  # padded samples: a per-sample attention mask goes with them
    batches = [{"input_ids": calib_ids[a : a + 4], "attention_mask": mask[a : a + 4]} for a in (0, 4)]
    inputs = capture.capture_block_inputs(model, blocks, batches, "cpu")
    layers = {g.linears[0]: blocks[0].get_submodule(g.linears[0]) for g in arch.groups}
    calls = []
    blocks[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    whole = capture.collect_hessians(blocks[0], inputs, layers), capture.run_block(blocks[0], inputs)
    monkeypatch.setattr(capture, "FORWARD_ELEMENTS", inputs.hidden[0][0].numel())  # one sample per forward
    parts = capture.collect_hessians(blocks[0], inputs, layers), capture.run_block(blocks[0], inputs)
    assert len(calls) == 2 * 2 + 2 * 8 and whole[0].keys() == parts[0].keys()
    for name in whole[0]:
        assert torch.allclose(parts[0][name], whole[0][name], rtol=1e-5, atol=1e-6), name
    for a, b in zip(whole[1], parts[1], strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
