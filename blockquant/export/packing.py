"""Dense int32 bit packing shared by both checkpoint formats (DESIGN.md §4 "Export").

A row of n unsigned ``bits``-bit codes is one bit stream: code k occupies bits
``[k·bits, (k+1)·bits)`` of the row, word 0 holding the stream's least significant 32 bits
(least-significant element first). 32 codes fill exactly ``bits`` words, so 3-bit codes
straddle word boundaries; a row takes ``⌈n·bits/32⌉`` words, the last one zero-padded. This
is compressed-tensors' ``pack-quantized`` layout (≥ 0.20, which packs 3-bit codes densely)
and, per column and for n a multiple of 32, GPTQ's ``qweight`` / ``qzeros`` layout.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor

_WORD = 32
_MASK32 = (1 << _WORD) - 1


def packed_words(n: int, bits: int) -> int:
    """Words of one packed row of ``n`` codes."""
    return math.ceil(n * bits / _WORD)


def _stream_positions(bits: int) -> tuple[Tensor, Tensor]:
    """For the 32 codes of one block: the word each starts in and its bit offset there."""
    start = torch.arange(_WORD, dtype=torch.int64) * bits
    return start // _WORD, start % _WORD


def pack_int32(codes: Tensor, bits: int) -> Tensor:
    """Pack ``(rows, n)`` unsigned codes in ``[0, 2^bits)`` into ``(rows, ⌈n·bits/32⌉)`` int32."""
    if not 1 <= bits <= 8:
        raise ValueError(f"can pack 1 to 8 bits per code, got {bits}")
    rows, n = codes.shape
    values = codes.to(torch.int64)
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] to pack into {bits} bits")
    blocks = math.ceil(n / _WORD)
    padded = values.new_zeros(rows, blocks * _WORD)
    padded[:, :n] = values
    padded = padded.view(rows, blocks, _WORD)  # (rows, blocks, 32)
    words = values.new_zeros(rows, blocks, bits)  # 32 codes -> `bits` words
    word_of, offset = _stream_positions(bits)
    for k in range(_WORD):
        w, o = int(word_of[k]), int(offset[k])
        words[:, :, w] |= (padded[:, :, k] << o) & _MASK32
        spill = o + bits - _WORD  # high bits that continue in the next word
        if spill > 0:
            words[:, :, w + 1] |= padded[:, :, k] >> (bits - spill)
    words = words.view(rows, blocks * bits)[:, : packed_words(n, bits)]
    return torch.where(words >= 1 << 31, words - (1 << _WORD), words).to(torch.int32)


def unpack_int32(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_int32`: ``(rows, words)`` int32 -> ``(rows, n)`` uint8 codes."""
    rows, words = packed.shape
    if packed.dtype != torch.int32 or words != packed_words(n, bits):
        raise ValueError(
            f"packed codes must be int32 of shape (rows, {packed_words(n, bits)}) for {n} {bits}-bit "
            f"codes per row, got {packed.dtype} {tuple(packed.shape)}"
        )
    if bits in (2, 4, 8) and sys.byteorder == "little":
        return _unpack_bytes(packed.contiguous(), bits, n)
    blocks = math.ceil(n / _WORD)
    stream = packed.to(torch.int64) & _MASK32
    stream = torch.cat([stream, stream.new_zeros(rows, blocks * bits + 1 - words)], dim=1)
    word_of, offset = _stream_positions(bits)
    first = torch.arange(blocks).unsqueeze(1) * bits + word_of  # (blocks, 32) word of each code
    low = stream[:, first] >> offset  # (rows, blocks, 32)
    high = stream[:, first + 1] << (_WORD - offset)  # bits that spilled into the next word
    spills = (offset + bits > _WORD).to(torch.int64)
    codes = (low | high * spills) & ((1 << bits) - 1)
    return codes.reshape(rows, blocks * _WORD)[:, :n].to(torch.uint8)


def _unpack_bytes(packed: Tensor, bits: int, n: int) -> Tensor:
    """Fast path when codes never straddle a byte: split the little-endian bytes."""
    rows = packed.shape[0]
    raw = packed.view(torch.uint8)  # (rows, 4·words), least significant byte first
    if bits == 8:
        return raw[:, :n].clone()
    mask = (1 << bits) - 1
    parts = [(raw >> shift) & mask for shift in range(0, 8, bits)]
    return torch.stack(parts, dim=-1).reshape(rows, -1)[:, :n]


def check_tensor(layer: str, key: str, t: Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """A checkpoint tensor of a packed layer has the dtype and shape its format prescribes."""
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise ValueError(
            f"{layer}.{key} must be {dtype} of shape {shape}, got {t.dtype} {tuple(t.shape)}; the checkpoint does not match its config"
        )
