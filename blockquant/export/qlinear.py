"""``QuantLinear``: a Linear that keeps its weight packed (DESIGN.md §4 "Export").

The module holds what a low-bit kernel executes — int32 words of unsigned codes, one scale
and one zero point per group — so a loaded model really is smaller in memory. Its forward
unpacks, dequantizes per group and multiplies in plain torch; on CUDA, 4-bit layers with
contiguous groups multiply 1–16 tokens of fp16/bf16 activations with the fused Triton W4A16
kernel (``triton_w4a16``, the ``gpu`` extra) — decoding, where reading the weight dominates.
On CPU, 4-bit groups and symmetric 8-bit channels multiply up to 128 tokens of bf16
activations with PyTorch's int4 / int8 weight-only kernels (``cpu_kernels``), from weights
converted on the first such call and kept beside the packed buffers (not in the state dict).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blockquant.export import cpu_kernels
from blockquant.export.packing import pack_int32, packed_words, unpack_int32
from blockquant.primitives import group_width
from blockquant.recipe import QuantSpec


class QuantLinear(nn.Module):
    """``y = x Ŵᵀ + b`` with ``Ŵ[o, i] = s[o, g(i)] · (q[o, i] − z[o, g(i)])``.

    Buffers: ``qweight`` int32 ``(out, ⌈in·bits/32⌉)``, the unsigned codes packed along the
    input dimension (see ``packing``); ``scales`` ``(out, n_groups)`` in the checkpoint dtype;
    ``zeros`` uint8 ``(out, n_groups)``, unsigned zero points (``2^(bits−1)`` when symmetric);
    ``g_idx`` int32 ``(in,)`` the group of each input column, or None for contiguous groups of
    ``group_size`` columns (the last one shorter when it does not divide ``in``); ``bias``.

    ``cpu_kernels`` (default True) lets CPU calls use ``cpu_kernels`` where they apply; set it
    False (or :func:`set_cpu_kernels`) for dequantize + matmul in plain torch everywhere.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        sym: bool,
        qweight: Tensor,
        scales: Tensor,
        zeros: Tensor,
        g_idx: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        n_groups = math.ceil(in_features / group_size)
        expect = {
            "qweight": (qweight, torch.int32, (out_features, packed_words(in_features, bits))),
            "scales": (scales, None, (out_features, n_groups)),
            "zeros": (zeros, torch.uint8, (out_features, n_groups)),
        }
        for name, (t, dtype, shape) in expect.items():
            if tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype):
                raise ValueError(f"QuantLinear {name} must be {dtype or 'float'} of shape {shape}, got {t.dtype} {tuple(t.shape)}")
        if g_idx is not None and (g_idx.shape != (in_features,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
            raise ValueError(f"QuantLinear g_idx must be ({in_features},) group indices in [0, {n_groups})")
        if bias is not None and bias.shape != (out_features,):
            raise ValueError(f"QuantLinear bias must have shape ({out_features},), got {tuple(bias.shape)}")
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("g_idx", None if g_idx is None else g_idx.to(torch.int32))
        self.register_buffer("bias", bias)
        self.cpu_kernels = True
        self._cpu_cache: tuple[tuple, cpu_kernels.Converted | None] | None = None  # (buffers key, weights)

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    def codes(self) -> Tensor:
        """Unsigned integer codes ``(out, in)`` uint8."""
        return unpack_int32(self.qweight, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``Ŵ`` ``(out, in)`` in ``dtype``: ``s·(q − z)`` computed exactly in fp32, then rounded to ``dtype``.

        Where the scales are stored in ``dtype`` itself (bf16 or fp16), it is computed in ``dtype``
        with the same result: ``q − z`` is an integer it holds exactly, and each product is rounded
        once, as the cast would round it. That path moves a third of the bytes, which matters here:
        the plain forward dequantizes every weight on every call, and a fresh fp32 copy of a large
        layer costs more in page faults than in arithmetic.
        """
        q = self.codes()
        work = dtype if dtype in (torch.bfloat16, torch.float16) and self.scales.dtype == dtype else torch.float32
        if self.g_idx is not None:
            cols = self.g_idx.long()
            return ((q.to(work) - self.zeros[:, cols].to(work)) * self.scales[:, cols].to(work)).to(dtype)
        out, cols, g = self.out_features, self.in_features, self.group_size
        pad = self.n_groups * g - cols  # ragged last group: pad, dequantize, cut
        if pad:
            q = torch.cat([q, q.new_zeros(out, pad)], dim=1)
        w = q.view(out, self.n_groups, g).to(work)  # (out, G, g), in place from here: this runs every forward
        w.sub_(self.zeros.unsqueeze(2)).mul_(self.scales.unsqueeze(2))
        w = w.view(out, -1)[:, :cols]
        return w.to(dtype) if w.dtype != dtype else w.contiguous()

    @staticmethod
    def kernel_applies(device_type: str, bits: int, has_g_idx: bool, dtype: torch.dtype, tokens: int) -> bool:
        """Whether the Triton W4A16 kernel covers a call: CUDA, 4 bits, contiguous groups,
        fp16/bf16 activations, 1–16 tokens (decoding; larger batches are compute-bound, where
        dequantize + cuBLAS is the better plan)."""
        return device_type == "cuda" and bits == 4 and not has_g_idx and dtype in (torch.float16, torch.bfloat16) and 1 <= tokens <= 16

    def uses_kernel(self, x: Tensor) -> bool:
        """Whether ``forward(x)`` runs the Triton kernel (it also needs triton installed)."""
        tokens = x.numel() // max(self.in_features, 1)
        return self.kernel_applies(x.device.type, self.bits, self.g_idx is not None, x.dtype, tokens) and triton_available()

    def cpu_weights(self, x: Tensor) -> cpu_kernels.Converted | None:
        """The weights a CPU kernel multiplies ``x`` with, converted on first use; None where
        none applies (then ``forward`` takes the plain-torch path).

        Cached until a buffer is replaced, changed in place, moved or cast; never with autograd
        on ``x``, which the kernels do not differentiate.
        """
        buffers = self._buffers  # read once: a buffer through nn.Module.__getattr__ costs about a microsecond, per call
        qweight, g_idx = buffers["qweight"], buffers["g_idx"]
        autograd = x.requires_grad and torch.is_grad_enabled()
        if not self.cpu_kernels or autograd or x.device.type != "cpu" or qweight.device.type != "cpu":
            return None
        tokens = x.numel() // max(self.in_features, 1)
        kind = cpu_kernels.cpu_kernel_for(
            self.bits, self.group_size, self.in_features, self.out_features, self.sym, g_idx is not None, x.dtype, tokens
        )
        if kind is None or not cpu_kernels.kernels_available():
            return None
        tensors = [t for t in (qweight, buffers["scales"], buffers["zeros"], buffers["bias"]) if t is not None]
        key = (kind, x.dtype, *[(t.data_ptr(), t._version, t.dtype) for t in tensors])
        if self._cpu_cache is None or self._cpu_cache[0] != key:
            with torch.no_grad():
                args = (self.qweight, self.scales, self.zeros, self.in_features, self.group_size, self.bias, x.dtype)
                self._cpu_cache = (key, cpu_kernels.convert(kind, *args))
        return self._cpu_cache[1]

    def uses_cpu_kernel(self, x: Tensor) -> bool:
        """Whether ``forward(x)`` runs a CPU kernel (converting the weights if it does)."""
        return self.cpu_weights(x) is not None

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu":
            converted = self.cpu_weights(x)
            if converted is not None:
                return cpu_kernels.cpu_linear(x, converted)
        elif self.uses_kernel(x):
            from blockquant.export.triton_w4a16 import w4a16_linear

            return w4a16_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.sym, self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half(): converted weights follow the buffers
        self._cpu_cache = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:  # torch.save / deepcopy carry the packed buffers only
        return {**super().__getstate__(), "_cpu_cache": None}

    def extra_repr(self) -> str:
        gran = "channel" if self.group_size >= self.in_features else f"g{self.group_size}"
        order = ", g_idx" if self.g_idx is not None else ""
        return f"in={self.in_features}, out={self.out_features}, W{self.bits} {gran} {'sym' if self.sym else 'asym'}{order}"


def set_cpu_kernels(model: nn.Module, enabled: bool) -> int:
    """Turn the CPU kernels of every ``QuantLinear`` in ``model`` on or off (off: dequantize +
    matmul in plain torch, e.g. to compare speeds); returns how many layers it set."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m.cpu_kernels = enabled
        m._cpu_cache = None  # off frees the converted weights
    return len(layers)


def triton_available() -> bool:
    """Whether triton is importable (the ``gpu`` extra); cheap once it is imported."""
    return importlib.util.find_spec("triton") is not None


@dataclass
class ScaleRounding:
    """What storing the fp32 scales in a narrower dtype changed (all zero when it was exact)."""

    weights_changed: int = 0
    weights_total: int = 0
    max_relative_change: float = 0.0


def pack_linear(
    name: str,
    weight: Tensor,
    scale: Tensor,
    zero: Tensor,
    g_idx: Tensor | None,
    spec: QuantSpec,
    bias: Tensor | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[QuantLinear, ScaleRounding]:
    """Pack a fake-quantized ``weight`` ``(out, in)`` with the grid ``quantize()`` recorded for it.

    The integer codes are recovered by rounding and then checked: every weight must be exactly
    ``s·(q − z)`` (in the weight's dtype), so a model edited after quantization is refused
    instead of exported wrong.
    """
    out, cols = weight.shape
    width = group_width(spec, cols)
    scale, zero = scale.float().expand(out, -1), zero.float().expand(out, -1)  # per-tensor -> per-row
    if scale.shape[1] != math.ceil(cols / width):
        raise ValueError(f"layer {name}: {scale.shape[1]} scale columns for {cols} inputs in groups of {width}")
    if not torch.equal(zero, torch.round(zero)) or zero.min() < spec.qmin or zero.max() > spec.qmax:
        raise ValueError(f"layer {name}: zero points must be integers in [{spec.qmin}, {spec.qmax}]")
    groups = g_idx.long() if g_idx is not None else torch.arange(cols) // width
    s, z = scale[:, groups], zero[:, groups]  # (out, in)
    q = torch.clamp(torch.round(weight.float() / s + z), spec.qmin, spec.qmax)
    off_grid = (s * (q - z)).to(weight.dtype) != weight
    if off_grid.any():
        gap = float((s * (q - z) - weight.float()).abs().max())
        raise ValueError(
            f"layer {name}: {int(off_grid.sum())} of {weight.numel()} weights are not on its quantization grid "
            f"(largest gap {gap:.3g}); export the model exactly as quantize() left it"
        )
    stored = scale.to(scale_dtype)
    rounding = ScaleRounding(weights_total=weight.numel())
    if not torch.equal(stored.float(), scale):
        w2 = (stored.float()[:, groups] * (q - z)).to(weight.dtype)
        changed = w2 != weight
        rounding.weights_changed = int(changed.sum())
        rel = ((w2.float() - weight.float()).abs() / weight.float().abs().clamp(min=1e-30))[changed]
        rounding.max_relative_change = float(rel.max()) if rel.numel() else 0.0
    codes = (q - spec.qmin).to(torch.uint8)  # unsigned: [0, 2^bits)
    zeros = (zero - spec.qmin).to(torch.uint8)
    module = QuantLinear(
        cols,
        out,
        spec.bits,
        width,
        spec.sym,
        pack_int32(codes, spec.bits),
        stored.contiguous(),
        zeros.contiguous(),
        None if g_idx is None else g_idx.clone(),
        None if bias is None else bias.detach().clone(),
    )
    return module, rounding
