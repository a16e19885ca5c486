"""CPU int4 / int8 kernels of ``QuantLinear`` against dequantize + matmul, fallbacks, caching.

Reference: ``layer.dequantize()`` (exact in fp32) multiplied in fp32 with the bias, rounded to
bf16 once: the kernels sum exact products in fp32, so they must agree to that rounding.
``F.linear(x, layer.dequantize(bf16))`` is no such reference: it rounds every weight
``s·(q − z)`` to bf16 first (up to 12 significant bits into 8), which alone moves a layer's
output by ~2.5e-3 of its norm. Scales are bf16 here, as in a bf16 model's checkpoint.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from conftest import packable_llama

import blockquant
from blockquant import QuantSpec, parse_recipe, quantize
from blockquant.export import QuantLinear, save_packed
from blockquant.export.cpu_kernels import cpu_kernel_for, cpu_linear
from blockquant.export.qlinear import pack_linear, set_cpu_kernels
from blockquant.primitives import compute_qparams, fake_quantize

BF16 = torch.bfloat16
TOKENS = (1, 5, 16)


def packed_layer(out: int, cols: int, spec: QuantSpec, seed: int = 0, bias: bool = False) -> QuantLinear:
    """A random layer on ``spec``'s grid with bf16 scales (``scale_dtype``: exact in the checkpoint)."""
    spec = QuantSpec(spec.bits, spec.group_size, spec.sym, scale_dtype="bfloat16")
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=gen) * 0.05
    scale, zero = compute_qparams(w, spec)
    b = torch.randn(out, generator=gen) * 0.1 if bias else None
    layer, rounding = pack_linear("L", fake_quantize(w, scale, zero, spec), scale, zero, None, spec, b, BF16)
    assert rounding.weights_changed == 0
    return layer.eval()


def tokens_of(layer: QuantLinear, tokens: int, seed: int = 100) -> torch.Tensor:
    return torch.randn(tokens, layer.in_features, generator=torch.Generator().manual_seed(seed)).to(BF16)


def reference(layer: QuantLinear, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``x Ŵᵀ + b`` summed in fp32, rounded to ``x.dtype`` once; the bias rounded to it as the model holds it."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype).float()
    return F.linear(x.float(), layer.dequantize() if weight is None else weight, bias).to(x.dtype)


def int4_grid(layer: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
    """The weights the int4 kernel multiplies: ``s·(q − 8) + m`` with ``m = s·(8 − z)`` rounded to ``dtype``."""
    s = layer.scales.float().repeat_interleave(layer.group_size, 1)
    m = (layer.scales.float() * (8 - layer.zeros.float())).to(dtype).float().repeat_interleave(layer.group_size, 1)
    return s * (layer.codes().float() - 8) + m


def relative(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def plain(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``forward`` with the CPU kernels off: dequantize to ``x.dtype``, then ``F.linear``."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.dequantize(x.dtype), bias)


# ---------------------------------------------------------------------------------------------
# Where the kernels apply: a pure predicate


def test_predicate_names_the_kernel_for_each_shape():
    def kind(bits=4, group=128, cols=2048, out=2048, sym=True, g_idx=False, dtype=BF16, tokens=1):
        return cpu_kernel_for(bits, group, cols, out, sym, g_idx, dtype, tokens)

    assert kind() == "int4" and kind(group=32, cols=96, out=16, sym=False, tokens=128) == "int4" and kind(group=256) == "int4"
    assert kind(bits=8, group=2048) == "int8" and kind(bits=8, group=4096, cols=4096, out=7) == "int8"
    refused = [
        dict(group=16),  # the int4 kernel takes groups of 32, 64, 128 or 256
        dict(group=48, cols=96),
        dict(group=128, cols=200),  # a ragged last group
        dict(cols=2080, group=32, out=40),  # out not a multiple of 16
        dict(bits=8, group=2048, cols=2056),  # in not a multiple of 32: the bf16 int8 kernel reads past the row
        dict(bits=8, group=2048, sym=False),  # an asymmetric 8-bit grid: s·(q − z) is no s·q
        dict(bits=8, group=128),  # 8-bit groups: one scale per channel only
        dict(bits=3),
        dict(bits=2),
        dict(g_idx=True),
        dict(dtype=torch.float32),  # slower than dequantize + matmul (cpu_kernels docstring)
        dict(dtype=torch.float16),
        dict(tokens=129),
        dict(tokens=0),
    ]
    for case in refused:
        assert kind(**case) is None, case


# ---------------------------------------------------------------------------------------------
# The kernels against dequantize + matmul


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_int4_matches_dequantize_then_matmul(sym, group, tokens):
    layer = packed_layer(96, 256, QuantSpec(4, group, sym=sym), seed=group + tokens)
    x = tokens_of(layer, tokens)
    with torch.no_grad():
        assert layer.uses_cpu_kernel(x) and layer.cpu_weights(x).kind == "int4"
        y = layer(x)
        assert y.dtype == BF16 and y.shape == (tokens, 96)
        assert relative(y, reference(layer, x, int4_grid(layer, BF16))) <= 1e-3  # what the kernel is documented to compute
        assert relative(y, reference(layer, x)) <= 1e-3  # m = s·(8 − z) rounded to bf16 (asym) stays within it


def test_int4_bias_and_leading_dimensions():
    layer = packed_layer(64, 128, QuantSpec(4, 64, sym=True), bias=True)
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(7)).to(BF16)
    with torch.no_grad():
        assert layer.uses_cpu_kernel(x)
        y = layer(x)
        product = cpu_linear(x, layer.cpu_weights(x)._replace(bias=None))
    assert y.shape == (2, 3, 64)
    no_bias = copy.deepcopy(layer)
    no_bias.bias = None
    assert relative(product, reference(no_bias, x)) <= 1e-3
    # the bias is added to the kernel's bf16 output: one rounding more than the reference, at most one bf16 step
    ref = reference(layer, x).float()
    eps = torch.finfo(BF16).eps
    torch.testing.assert_close(y.float(), ref, rtol=eps, atol=eps * float(ref.abs().max()))


@pytest.mark.parametrize("tokens", TOKENS)
def test_int8_channels_match_dequantize_then_matmul(tokens):
    layer = packed_layer(80, 192, QuantSpec(8, -1, sym=True), seed=tokens)
    x = tokens_of(layer, tokens)
    with torch.no_grad():
        assert layer.uses_cpu_kernel(x) and layer.cpu_weights(x).kind == "int8"
        assert relative(layer(x), reference(layer, x)) <= 1e-3


# ---------------------------------------------------------------------------------------------
# Everything else keeps the plain-torch path, bit for bit


FALLBACKS = {  # (out, in, spec, activation dtype, tokens)
    "ragged last group": (64, 200, QuantSpec(4, 64, sym=True), BF16, 1),
    "group 48": (64, 192, QuantSpec(4, 48, sym=False), BF16, 1),
    "out 40": (40, 128, QuantSpec(4, 32, sym=True), BF16, 1),
    "3 bits": (64, 128, QuantSpec(3, 32, sym=False), BF16, 1),
    "2 bits": (64, 128, QuantSpec(2, 32, sym=False), BF16, 1),
    "8-bit asym": (64, 128, QuantSpec(8, -1, sym=False), BF16, 1),
    "8-bit groups": (64, 128, QuantSpec(8, 32, sym=True), BF16, 1),
    "fp32 activations": (64, 128, QuantSpec(4, 32, sym=True), torch.float32, 1),
    "fp16 activations": (64, 128, QuantSpec(4, 32, sym=True), torch.float16, 1),
    "129 tokens": (64, 128, QuantSpec(4, 32, sym=True), BF16, 129),
}


@pytest.mark.parametrize("case", FALLBACKS)
def test_other_shapes_fall_back_to_the_plain_path(case):
    out, cols, spec, dtype, tokens = FALLBACKS[case]
    layer = packed_layer(out, cols, spec)
    x = tokens_of(layer, tokens).to(dtype)
    with torch.no_grad():
        assert not layer.uses_cpu_kernel(x) and layer._cpu_cache is None
        assert torch.equal(layer(x), plain(layer, x))


def test_act_order_groups_fall_back():
    layer = packed_layer(64, 128, QuantSpec(4, 32, sym=True))
    layer.g_idx = torch.randperm(128, generator=torch.Generator().manual_seed(0)).to(torch.int32) // 32
    x = tokens_of(layer, 1)
    with torch.no_grad():
        assert not layer.uses_cpu_kernel(x)
        assert torch.equal(layer(x), plain(layer, x))


def test_autograd_and_the_switch_take_the_plain_path():
    layer = packed_layer(64, 128, QuantSpec(4, 32, sym=True))
    x = tokens_of(layer, 2).requires_grad_()
    assert not layer.uses_cpu_kernel(x)
    layer(x).sum().backward()  # the kernels have no derivative
    assert x.grad is not None
    model = torch.nn.Sequential(layer)
    assert set_cpu_kernels(model, False) == 1
    with torch.no_grad():
        assert not layer.uses_cpu_kernel(x) and torch.equal(layer(x), plain(layer, x))
        set_cpu_kernels(model, True)
        assert layer.uses_cpu_kernel(x)


# ---------------------------------------------------------------------------------------------
# The converted weights: cached, never saved, rebuilt when the buffers change


def test_converted_weights_are_cached_and_never_saved():
    layer = packed_layer(64, 128, QuantSpec(4, 32, sym=False), bias=True)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = tokens_of(layer, 1)
    with torch.no_grad():
        first = layer.cpu_weights(x)
        layer(x)
        assert layer.cpu_weights(x) is first  # converted once
    after = layer.state_dict()
    assert list(after) == list(before) == ["qweight", "scales", "zeros", "bias"]
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype for k in before)
    buf = io.BytesIO()
    torch.save(layer, buf)
    assert copy.deepcopy(layer)._cpu_cache is None
    assert torch.load(io.BytesIO(buf.getvalue()), weights_only=False)._cpu_cache is None


def test_conversion_follows_loaded_cast_and_moved_buffers():
    layer = packed_layer(64, 128, QuantSpec(4, 32, sym=False))
    other = packed_layer(64, 128, QuantSpec(4, 32, sym=False), seed=1)
    x = tokens_of(layer, 3)
    with torch.no_grad():
        layer(x)
        layer.load_state_dict(other.state_dict())  # copied in place: same storage, new version
        assert relative(layer(x), reference(other, x, int4_grid(other, BF16))) <= 1e-3
        layer.to(torch.float32)  # fp32 scales: converted again, rounded to the activations' bf16
        assert layer._cpu_cache is None and layer.scales.dtype == torch.float32
        assert relative(layer(x), reference(other, x, int4_grid(other, BF16))) <= 1e-3


# ---------------------------------------------------------------------------------------------
# A whole model: save_packed -> blockquant.load -> logits


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_loaded_llama_runs_every_linear_on_the_kernel(sym, tmp_path):
    """Logits against the same checkpoint with the kernels off, and computed in fp32.

    In bf16 the two paths do not agree to 1e-3: the plain path's bf16 logits are themselves
    ~5e-3 (of their norm) from the fp32 computation of the same checkpoint, and the kernels'
    logits are no farther from it.
    """
    model = packable_llama(dtype=BF16)  # widths multiples of 32 and 16: every linear takes the int4 kernel at g32 / g64
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    result = quantize(model, parse_recipe("rtn", QuantSpec(4, 32, sym=sym)), calib, progress=False)
    out = save_packed(model, result, tmp_path / "out")
    fast, slow, exact = blockquant.load(out), blockquant.load(out), blockquant.load(out, torch.float32)
    set_cpu_kernels(slow, False)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, plain_logits, ref = fast(ids).logits, slow(ids).logits, exact(ids).logits
    layers = [fast.get_submodule(n) for n in result.layers]
    assert all(m._cpu_cache is not None and m._cpu_cache[1].kind == "int4" for m in layers)
    assert all(m._cpu_cache is None for m in slow.modules() if isinstance(m, QuantLinear))
    assert relative(got, ref) <= 1.1 * relative(plain_logits, ref)
    assert relative(got, plain_logits) <= 1e-2
    saved, loaded = fast.state_dict(), slow.state_dict()
    assert list(saved) == list(loaded) and all(torch.equal(saved[k], loaded[k]) for k in saved)
