"""Fused W4A16 matmul for a packed ``QuantLinear`` on CUDA (DESIGN.md §4 "Export").

Decoding runs 1–16 tokens through every layer, so a 4-bit layer is bound by reading its weight:
dequantizing it to a bf16 matrix first (the plain-torch path) writes and re-reads 4× the packed
bytes. This kernel reads the int32 words once, unpacks the eight 4-bit codes of each word
(least-significant first, the layout of ``packing.pack_int32``), applies the group's scale and
zero point in registers and feeds ``tl.dot`` — ``y = x Ŵᵀ`` with ``Ŵ = s·(q − z)`` computed in
fp32 and rounded to the activation dtype, as ``QuantLinear.dequantize`` does, fp32 accumulation.

Grid: one program per ``BLOCK_N`` output features and per split of the input dimension (split-K,
so that a layer with few output tiles still occupies every SM at batch 1; the partial sums are
added atomically in fp32). Tokens are padded to one ``BLOCK_M = 16`` tile (``tl.dot``'s minimum).

This module imports triton; ``QuantLinear`` imports it only on CUDA. It was verified in the
Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors, tests/test_triton_w4a16.py); no GPU
was available to this project when it was written, so its GPU speed is unmeasured
(``bench/export.py`` measures it where CUDA is present).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_TOKENS = 16  # BLOCK_M: one tl.dot tile of tokens
BLOCK_N = 64


@triton.jit
def _w4a16_kernel(
    x_ptr,  # (M, K) activations, row stride stride_xm
    qw_ptr,  # (N, KW) int32, 8 codes per word, least-significant first
    s_ptr,  # (N, G) scales
    z_ptr,  # (N, G) uint8 unsigned zero points (unused when SYM: 8)
    out_ptr,  # (M, N): x dtype (SPLIT_K == 1) or zeroed fp32 (atomic partial sums)
    M,
    N,
    K,
    KW,
    G,
    group_size,
    stride_xm,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SYM: tl.constexpr,
    GROUP_ALIGNED: tl.constexpr,  # group_size % BLOCK_K == 0: one scale per row for a whole K tile
    SPLIT_K: tl.constexpr,
    FP32_DOT: tl.constexpr,  # interpreter only: numpy has no bf16 matmul (and the output is stored in fp32)
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    shifts = tl.arange(0, 8) * 4  # bit offset of each code in its word
    # only builtins here, no @jit helpers of triton.language (tl.cdiv, tl.zeros): those are decorated when
    # triton is imported, so with them the interpreter would work only if TRITON_INTERPRET was set before that
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    k_tiles = (K + BLOCK_K - 1) // BLOCK_K
    per_split = (k_tiles + SPLIT_K - 1) // SPLIT_K
    first = pid_k * per_split
    last = tl.minimum(first + per_split, k_tiles)
    for kt in range(first, last):
        # 1. activations (BLOCK_M, BLOCK_K), zero outside the matrix
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        # 2. packed words (BLOCK_N, BLOCK_K // 8), contiguous along K, unpacked to codes (BLOCK_N, BLOCK_K)
        offs_w = kt * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
        words = tl.load(qw_ptr + offs_n[:, None] * KW + offs_w[None, :], mask=n_mask[:, None] & (offs_w[None, :] < KW), other=0)
        q = (words[:, :, None] >> shifts[None, None, :]) & 0xF  # (BLOCK_N, BLOCK_K // 8, 8)
        q = tl.reshape(q, (BLOCK_N, BLOCK_K)).to(tl.float32)
        # 3. the group's scale and zero point, in fp32
        if GROUP_ALIGNED:
            g = (kt * BLOCK_K) // group_size
            s = tl.load(s_ptr + offs_n * G + g, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            if SYM:
                z = 8.0
            else:
                z = tl.load(z_ptr + offs_n * G + g, mask=n_mask, other=0).to(tl.float32)[:, None]
        else:
            g = offs_k // group_size
            gmask = n_mask[:, None] & k_mask[None, :]
            s = tl.load(s_ptr + offs_n[:, None] * G + g[None, :], mask=gmask, other=0.0).to(tl.float32)
            if SYM:
                z = 8.0
            else:
                z = tl.load(z_ptr + offs_n[:, None] * G + g[None, :], mask=gmask, other=0).to(tl.float32)
        w = tl.where(k_mask[None, :], (q - z) * s, 0.0)  # (BLOCK_N, BLOCK_K)
        # 4. round Ŵ to the activation dtype, multiply, accumulate in fp32
        if FP32_DOT:  # the interpreter: the same 16-bit values, exact products in fp32
            if x.dtype == tl.bfloat16:  # its fp32 -> bf16 cast truncates; round to nearest even as the GPU does
                bits = w.to(tl.uint32, bitcast=True)
                bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
                w = bits.to(tl.float32, bitcast=True)
            else:
                w = w.to(x.dtype).to(tl.float32)
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


def block_k(group_size: int) -> int:
    """K tile: the largest of 128/64/32 that divides the group (one scale per tile), else 64."""
    return next((b for b in (128, 64, 32) if group_size % b == 0), 64)


def default_split_k(n: int, k: int, group_size: int, device: torch.device) -> int:
    """Splits of K so that about two programs run per SM (a batch-1 GEMV has few N tiles)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    n_tiles, k_tiles = triton.cdiv(n, BLOCK_N), triton.cdiv(k, block_k(group_size))
    return max(1, min(k_tiles, 16, triton.cdiv(2 * sms, n_tiles)))


def w4a16_linear(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int,
    sym: bool,
    bias: Tensor | None = None,
    split_k: int | None = None,
) -> Tensor:
    """``x Ŵᵀ (+ bias)`` for 4-bit ``QuantLinear`` buffers with contiguous groups, 1–16 tokens.

    ``x`` ``(..., K)`` fp16/bf16 (fp32 works too, at tl.dot's fp32 precision); ``qweight``
    ``(N, ⌈K/8⌉)`` int32; ``scales`` / ``zeros`` ``(N, ⌈K/group_size⌉)``. ``split_k`` (default:
    from the SM count) splits the input dimension over programs.
    """
    k = x.shape[-1]
    n, kw = qweight.shape
    tokens = x.numel() // max(k, 1)
    if qweight.dtype != torch.int32 or kw != triton.cdiv(k, 8):
        raise ValueError(
            f"w4a16 needs int32 qweight of shape (out, {triton.cdiv(k, 8)}) for {k} inputs, got {qweight.dtype} {tuple(qweight.shape)}"
        )
    groups = triton.cdiv(k, group_size)
    if scales.shape != (n, groups) or zeros.shape != (n, groups) or zeros.dtype != torch.uint8:
        raise ValueError(
            f"w4a16 needs scales and uint8 zeros of shape ({n}, {groups}), got {tuple(scales.shape)} and {zeros.dtype} {tuple(zeros.shape)}"
        )
    if not 1 <= tokens <= MAX_TOKENS:
        raise ValueError(f"w4a16 multiplies 1 to {MAX_TOKENS} tokens, got {tokens}; use QuantLinear's torch path for more")
    split_k = split_k or default_split_k(n, k, group_size, x.device)
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()  # row-major (N, ·), as indexed
    x2 = x.reshape(tokens, k).contiguous()
    interpreted = x.device.type != "cuda"  # only the Triton interpreter runs CPU tensors
    if split_k > 1:  # atomic fp32 partial sums
        out = torch.zeros(tokens, n, device=x.device, dtype=torch.float32)
    else:  # the interpreter's fp32 -> bf16 cast truncates: torch rounds the fp32 result instead
        out = x.new_empty(tokens, n, dtype=torch.float32 if interpreted else x.dtype)
    bk = block_k(group_size)
    grid = (triton.cdiv(n, BLOCK_N), split_k)
    _w4a16_kernel[grid](
        x2,
        qweight,
        scales,
        zeros,
        out,
        tokens,
        n,
        k,
        kw,
        groups,
        group_size,
        x2.stride(0),
        out.stride(0),
        BLOCK_M=MAX_TOKENS,
        BLOCK_N=BLOCK_N,
        BLOCK_K=bk,
        SYM=sym,
        GROUP_ALIGNED=group_size % bk == 0,
        SPLIT_K=split_k,
        FP32_DOT=interpreted,
    )
    y = out.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], n)
