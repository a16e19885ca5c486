"""Activation fake-quantization of the linears' inputs (DESIGN.md §2 "Activations").

Per-token dynamic: every token (row of the last dimension) gets its own scale from its own
range at run time, ``s_t = max|x_t| / qmax`` (symmetric) or ``(max x_t − min x_t)/(qmax − qmin)``
with an integer zero point (asymmetric). Per-tensor static: one scale per linear, fixed from the
calibration inputs' min–max or percentile. Rounding uses the straight-through estimator, so a
fine-tuning method (ZeroQuant's LKD) trains through it.

An ``ActQuantizer`` lives on its linear as ``layer.input_quantizer`` and runs from a forward
pre-hook (``attach``); the static range is a non-persistent buffer, so the state dict — and
every checkpoint format — is unchanged. ``finetune.FakeQuantLinear`` applies it too.

What a checkpoint holds of it: ``record`` (the scheme, the quantized layers and each static
range, in ``blockquant.json``) and, for SmoothQuant ``fold: quantizer``, the smoothing vectors in
``SMOOTHING_FILE``; ``restore`` puts both back on a loaded model so that ``blockquant eval``
measures what was quantized.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from blockquant.capture import BlockInputs, InputStats, collect_input_stats, whole_sample
from blockquant.layers import set_weight_matrix, weight_matrix
from blockquant.primitives import round_ste
from blockquant.spec import ActSpec

_MIN_SCALE = 1e-10
ATTR = "input_quantizer"


def range_qparams(lo: Tensor, hi: Tensor, spec: ActSpec) -> tuple[Tensor, Tensor]:
    """Scale and zero point of a range (broadcastable tensors); the range always holds 0."""
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    if spec.sym:
        scale = (torch.maximum(-lo, hi) / spec.qmax).clamp(min=_MIN_SCALE)
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp(min=_MIN_SCALE)
    return scale, torch.round(-lo / scale).clamp(spec.qmin, spec.qmax)


def per_token_qparams(x: Tensor, spec: ActSpec) -> tuple[Tensor, Tensor]:
    """``(..., 1)`` scale and zero of each token of ``x (..., C)`` from its own min / max."""
    x = x.detach().float()
    return range_qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), spec)


def fake_quant_act(x: Tensor, scale: Tensor, zero: Tensor, spec: ActSpec) -> Tensor:
    """``s·(clamp(⌊x/s⌉ + z, qmin, qmax) − z)`` in fp32, straight-through, back in x's dtype."""
    q = torch.clamp(round_ste(x.float() / scale) + zero, spec.qmin, spec.qmax)
    return (scale * (q - zero)).to(x.dtype)


def static_range(stats: InputStats, spec: ActSpec) -> tuple[float, float]:
    """(lo, hi) of a per-tensor static quantizer from calibration statistics."""
    if spec.range == "minmax":
        return stats.lo, stats.hi
    values = whole_sample(stats).flatten()  # under several processes: assembled from every process's rows
    if values.numel() > 2**24:  # torch.quantile's limit
        values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[: 2**24]]
    p = spec.percentile / 100
    if spec.sym:
        hi = float(torch.quantile(values.abs(), p))
        return -hi, hi
    return float(torch.quantile(values, 1 - p)), float(torch.quantile(values, p))


class ActQuantizer(nn.Module):
    """Fake-quantizes a linear's input: per token (dynamic) or with a calibrated static range."""

    def __init__(self, spec: ActSpec, lo: float = 0.0, hi: float = 0.0) -> None:
        super().__init__()
        self.spec = spec
        scale, zero = range_qparams(torch.tensor(lo), torch.tensor(hi), spec)
        self.register_buffer("scale", scale, persistent=False)  # used when granularity == "tensor"
        self.register_buffer("zero", zero, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.spec.granularity == "token":
            scale, zero = per_token_qparams(x, self.spec)
        else:
            scale, zero = self.scale, self.zero
        return fake_quant_act(x, scale, zero, self.spec)

    def record(self) -> dict:
        static = self.spec.granularity == "tensor"
        return {"scale": float(self.scale) if static else None, "zero": float(self.zero) if static else None}

    def extra_repr(self) -> str:
        return self.spec.describe()


SMOOTHING_ATTR = "input_smoothing"
SMOOTHING_FILE = "activation_smoothing.safetensors"  # next to blockquant.json: s of each smoothed linear


def _smooth_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the layer sees ``x / s`` (per input channel), before any quantizer."""
    return (args[0] / getattr(module, SMOOTHING_ATTR).to(args[0].dtype), *args[1:])


def smooth_input(layer: nn.Module, s: Tensor) -> None:
    """Divide ``layer``'s input channels by ``s`` (C,) in front of its quantizer (SmoothQuant ``fold: quantizer``).

    The caller multiplies the weight's columns by ``s``, so the full-precision function is
    unchanged; the division belongs to the kernel that quantizes this input (fused into it, as
    per-channel factors of the quantization step). No checkpoint format stores it.
    """
    if hasattr(layer, SMOOTHING_ATTR):
        raise ValueError("this linear's input is already smoothed; smoothquant runs once per recipe")
    layer.register_buffer(SMOOTHING_ATTR, s.detach().float().to(_device(layer)), persistent=False)
    layer.register_forward_pre_hook(_smooth_input, prepend=True)


def has_input_smoothing(model: nn.Module) -> bool:
    return any(hasattr(m, SMOOTHING_ATTR) for m in model.modules())


def smoothing_vectors(model: nn.Module) -> dict[str, Tensor]:
    """``s`` of every smoothed layer, by its full name (what ``SMOOTHING_FILE`` holds)."""
    return {name: getattr(m, SMOOTHING_ATTR).detach().cpu().clone() for name, m in model.named_modules() if hasattr(m, SMOOTHING_ATTR)}


@contextmanager
def unsmoothed(model: nn.Module) -> Iterator[None]:
    """Inside, each smoothed layer's weight columns are divided by ``s`` again: ``Ŵ·diag(1/s)``.

    What a runtime that knows nothing of the smoothing must see: ``Ŵ·diag(1/s)·x = Ŵ·(x/s)``
    is the quantized weights' function with full-precision activations, as in any other
    dequantized checkpoint. ``restore`` multiplies the columns back. The original weights
    are put back exactly on exit.
    """
    saved = {}
    try:
        for name, module in model.named_modules():
            if hasattr(module, SMOOTHING_ATTR):
                saved[name] = module.weight.detach().clone()
                s = getattr(module, SMOOTHING_ATTR)
                set_weight_matrix(module, weight_matrix(module) / s.to(module.weight.device).unsqueeze(0))
        yield
    finally:
        for name, weight in saved.items():
            model.get_submodule(name).weight.data.copy_(weight)


def _device(layer: nn.Module) -> torch.device:
    """Where a layer's tensors live (a packed layer has buffers, maybe no parameter)."""
    return next(iter([*layer.parameters(), *layer.buffers()])).device


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the layer sees its quantizer's output (a plain function: survives deepcopy)."""
    return (getattr(module, ATTR)(args[0]), *args[1:])


def add_input_quantizer(layer: nn.Module, quantizer: ActQuantizer) -> None:
    """Put ``quantizer`` in front of ``layer`` (a forward pre-hook), e.g. a conv of a U-Net."""
    if hasattr(layer, ATTR):
        raise ValueError("this layer already quantizes its input; activation quantization is attached once")
    layer.add_module(ATTR, quantizer.to(_device(layer)))
    layer.register_forward_pre_hook(_quantize_input)


@torch.no_grad()
def attach(block: nn.Module, groups: list[tuple[str, ...]], spec: ActSpec, inputs: BlockInputs) -> dict[str, ActQuantizer]:
    """Put an input quantizer on each linear of ``block``; static ranges from ``inputs``.

    ``groups`` are the table's groups of linears sharing an input, in execution order. They are
    calibrated one after another (true-sequential), so each static range is taken with the
    earlier groups' inputs already quantized; a group's linears share one range.
    """
    out = {}
    for names in groups:
        layers = {name: block.get_submodule(name) for name in names}
        lo = hi = 0.0
        if spec.granularity == "tensor":
            stats = collect_input_stats(block, inputs, {names[0]: layers[names[0]]}, max_tokens=8192)[names[0]]
            lo, hi = static_range(stats, spec)
        for name, layer in layers.items():
            if hasattr(layer, ATTR):
                raise ValueError(f"{name} already quantizes its input; activation quantization is attached once per recipe")
            quantizer = ActQuantizer(spec, lo, hi).to(next(layer.parameters()).device)
            layer.add_module(ATTR, quantizer)
            layer.register_forward_pre_hook(_quantize_input)
            out[name] = quantizer
    return out


def detach(model: nn.Module) -> int:
    """Remove every input quantizer (and its hook) from ``model``; returns how many."""
    count = 0
    for module in model.modules():
        if hasattr(module, ATTR):
            delattr(module, ATTR)
            for key, hook in list(module._forward_pre_hooks.items()):
                if hook is _quantize_input:
                    del module._forward_pre_hooks[key]
            count += 1
    return count


def quantizers(model: nn.Module) -> dict[str, ActQuantizer]:
    """Every attached input quantizer, by its linear's full name."""
    return {name: getattr(m, ATTR) for name, m in model.named_modules() if isinstance(getattr(m, ATTR, None), ActQuantizer)}


def record(model: nn.Module, spec: ActSpec | None) -> dict | None:
    """What blockquant.json says about activations: the scheme, the layers whose input is
    quantized, each static range, and where the smoothing vectors are (None: no smoothing)."""
    if spec is None:
        return None
    found = quantizers(model)
    static = {n: q.record() for n, q in found.items()} if spec.granularity == "tensor" else None
    smoothed = sorted(smoothing_vectors(model))
    smoothing = {"file": SMOOTHING_FILE, "layers": smoothed} if smoothed else None
    return {**dataclasses.asdict(spec), "layers": sorted(found), "static_ranges": static, "smoothing": smoothing}


def restore(model: nn.Module, act: dict | None, model_dir: str | Path | None = None) -> int:
    """Put a saved model's recorded activation scheme back on it; returns the layers quantized.

    Smoothed layers (``fold: quantizer``) get their columns multiplied by ``s`` again and ``x/s``
    in front; then every recorded layer gets its quantizer (dynamic per token, or its static range).
    """
    if not act:
        return 0
    spec = ActSpec(**{f.name: act[f.name] for f in dataclasses.fields(ActSpec) if f.name in act})
    static = act.get("static_ranges") or {}
    layers = act.get("layers") or list(static)
    smoothing = act.get("smoothing")
    if smoothing:
        if model_dir is None:
            raise ValueError("this model's activations are smoothed; restoring them needs the directory of its smoothing file")
        path = Path(model_dir) / smoothing["file"]
        if not path.is_file():
            raise ValueError(
                f"{path} is missing: blockquant.json says the activations of {len(smoothing['layers'])} layers are smoothed by it"
            )
        for name, s in load_file(str(path)).items():
            layer = _recorded_layer(model, name)
            set_weight_matrix(layer, weight_matrix(layer) * s.to(layer.weight.device).unsqueeze(0))
            smooth_input(layer, s)
    for name in layers:
        quantizer = ActQuantizer(spec)
        if spec.granularity == "tensor":
            if name not in static:
                raise ValueError(f"blockquant.json records static activations but no range for {name}")
            quantizer.scale.fill_(static[name]["scale"])
            quantizer.zero.fill_(static[name]["zero"])
        add_input_quantizer(_recorded_layer(model, name), quantizer)
    return len(layers)


def _recorded_layer(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"blockquant.json's activation record names {name}, which this model has no layer for") from None
