"""The Triton W4A16 kernel, run by the Triton interpreter on CPU tensors (no GPU needed).

Reference: ``QuantLinear``'s plain-torch path — dequantize to the activation dtype, multiply in
fp32. The kernel computes the same products (exact in fp32) and sums them in another order, so
it must agree to the rounding of the output dtype. Skipped when triton is not installed
(``pip install -c constraints.txt -e ".[gpu]"``).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from blockquant.export.qlinear import QuantLinear, pack_linear
from blockquant.primitives import compute_qparams, fake_quantize
from blockquant.recipe import QuantSpec

GROUPS = (32, 64, 128, -1)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# (out, in, tokens, split_k): aligned and ragged widths (in % 8 != 0: a half-filled last word)
SHAPES = [(96, 256, 1, 1), (96, 256, 16, 3), (70, 200, 7, 1), (70, 200, 1, 2), (33, 100, 4, 1)]


@pytest.fixture(scope="module")
def kernel():
    """The kernel module decorated under ``TRITON_INTERPRET=1`` (read when ``@triton.jit`` runs)."""
    pytest.importorskip("triton")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import blockquant.export.triton_w4a16 as module

    try:
        yield importlib.reload(module)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
        importlib.reload(module)


def packed_layer(out: int, cols: int, spec: QuantSpec, seed: int = 0, bias: bool = False) -> QuantLinear:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=gen) * 0.05
    scale, zero = compute_qparams(w, spec)
    b = torch.randn(out, generator=gen) if bias else None
    return pack_linear("L", fake_quantize(w, scale, zero, spec), scale, zero, None, spec, b)[0]


def reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The torch path's math with fp32 sums (what the kernel's fp32 accumulator holds)."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype).float()
    return F.linear(x.float(), layer.dequantize(x.dtype).float(), bias)


def assert_matches(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal up to rounding the fp32 result to ``dtype`` (plus fp32 summation order)."""
    assert y.dtype == dtype and y.shape == ref.shape
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.float(), ref, rtol=eps, atol=eps * float(ref.abs().max()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_kernel_matches_dequantize_then_matmul(kernel, sym, group, dtype):
    dt = DTYPES[dtype]
    for i, (out, cols, tokens, split_k) in enumerate(SHAPES):
        layer = packed_layer(out, cols, QuantSpec(4, group, sym=sym), seed=i)
        x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(100 + i)).to(dt)
        y = kernel.w4a16_linear(x, layer.qweight, layer.scales, layer.zeros, layer.group_size, layer.sym, split_k=split_k)
        assert_matches(y, reference(layer, x), dt)


def test_unaligned_groups_bias_bf16_scales_and_leading_dims(kernel):
    """Groups no K tile divides (48, and a ragged last group), bf16 scales with fp16 activations."""
    layer = packed_layer(40, 120, QuantSpec(4, 48, sym=False), bias=True)
    layer.scales = layer.scales.to(torch.bfloat16)
    assert kernel.block_k(48) == 64 and 48 % kernel.block_k(48)
    x = torch.randn(2, 3, 120, generator=torch.Generator().manual_seed(5)).to(torch.float16)
    y = kernel.w4a16_linear(x, layer.qweight, layer.scales, layer.zeros, layer.group_size, layer.sym, layer.bias)
    assert y.shape == (2, 3, 40)
    assert_matches(y, reference(layer, x), torch.float16)


def test_kernel_refuses_what_it_cannot_multiply(kernel):
    layer = packed_layer(32, 64, QuantSpec(4, 32, sym=True))
    args = (layer.qweight, layer.scales, layer.zeros, layer.group_size, layer.sym)
    with pytest.raises(ValueError, match="1 to 16 tokens, got 17"):
        kernel.w4a16_linear(torch.randn(17, 64, dtype=torch.float16), *args)
    with pytest.raises(ValueError, match="int32 qweight of shape"):
        kernel.w4a16_linear(torch.randn(1, 72, dtype=torch.float16), *args)


def test_quantlinear_uses_the_kernel_only_where_it_applies():
    """CPU activations, more than 16 tokens, other widths, act-order groups: the torch path."""
    layer = packed_layer(32, 64, QuantSpec(4, 32, sym=True))
    x = torch.randn(4, 64, dtype=torch.float16)
    assert not layer.uses_kernel(x)  # CPU
    assert torch.equal(layer(x), F.linear(x, layer.dequantize(torch.float16)))
    assert QuantLinear.kernel_applies("cuda", 4, False, torch.bfloat16, 16)
    assert not QuantLinear.kernel_applies("cuda", 4, False, torch.bfloat16, 17)
    assert not QuantLinear.kernel_applies("cuda", 3, False, torch.bfloat16, 1)
    assert not QuantLinear.kernel_applies("cuda", 4, True, torch.float16, 1)
    assert not QuantLinear.kernel_applies("cuda", 4, False, torch.float32, 1)
    assert not QuantLinear.kernel_applies("cpu", 4, False, torch.float16, 1)
