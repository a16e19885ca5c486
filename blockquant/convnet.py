"""Convolution networks without a chain of blocks (3-D U-Nets with skips), walked leaf by leaf.

Every Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear is a layer, in the order a full forward
pass calls it; its input is captured by a hook during that pass, so skip connections need no
table (DESIGN.md §4). BatchNorm is folded into the conv that feeds it before quantization.

A layer is the linear map ``y = W·x + b`` over im2col rows: ``W`` is ``(out, K)`` with
``K = in·∏kernel``. A transposed convolution is the stride-1 convolution of its zero-inserted,
re-padded input with the flipped, transposed kernel; its rows are mostly zeros, so the Gram
matrix is accumulated per output-position residue class over the kernel taps that class reads
(for 3³ kernels of stride 2, 125 of the 216 dense tap pairs: 47x fewer flops than dense rows).
Statistics use at most ``max_positions`` output positions, drawn uniformly with a fixed seed.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blockquant.layers import CONV, CONV_T, LAYER_TYPES, weight_matrix
from blockquant.spec import ActSpec, QuantSpec

BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _Stop(Exception):
    pass


@torch.no_grad()
def layers_in_order(model: nn.Module, x: Tensor) -> list[str]:
    """Names of every quantizable leaf in the order one forward pass on ``x`` calls it."""
    order: list[str] = []

    def hook(name: str) -> Callable:
        def fn(_m: nn.Module, _args: tuple) -> None:
            if name in order:
                raise ValueError(f"layer {name} runs twice in one forward pass; shared (re-used) layers cannot be quantized layer by layer")
            order.append(name)

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    for name in order:
        check_layer(name, model.get_submodule(name))
    return order


def check_layer(name: str, layer: nn.Module) -> None:
    """The im2col view covers ungrouped, zero-padded convolutions with integer padding."""
    if isinstance(layer, nn.Linear):
        return
    if layer.groups != 1:
        raise ValueError(f"{name}: grouped convolutions (groups={layer.groups}) are not supported; only groups=1")
    if layer.padding_mode != "zeros":
        raise ValueError(f"{name}: padding_mode {layer.padding_mode!r} is not supported; only 'zeros'")
    if isinstance(layer.padding, str):
        raise ValueError(f"{name}: padding={layer.padding!r} is not supported; give integer padding")


# ---------------------------------------------------------------- BatchNorm folding


@torch.no_grad()
def fold_batchnorm(model: nn.Module, x: Tensor, rtol: float = 1e-4) -> list[tuple[str, str]]:
    """Fold every eval-mode BatchNorm whose input is a conv's output into that conv; in place.

    ``W' = W·γ/σ`` and ``b' = (b − μ)·γ/σ + β`` per output channel; the BatchNorm becomes an
    exact identity (γ=1, β=0, μ=0, var=1−eps), so the state dict keeps its layout. Checked on
    ``x``: if the output moved by more than ``rtol`` of its range (the conv's output also fed
    another path), everything is restored and a ValueError raised. Returns (conv, bn) pairs.
    """
    produced: dict[int, str] = {}
    pairs: list[tuple[str, str]] = []

    def conv_hook(name: str) -> Callable:
        return lambda _m, _a, out: produced.__setitem__(id(out), name)

    def bn_hook(name: str) -> Callable:
        def fn(_m: nn.Module, args: tuple) -> None:
            if id(args[0]) in produced:
                pairs.append((produced[id(args[0])], name))

        return fn

    handles = [m.register_forward_hook(conv_hook(n)) for n, m in model.named_modules() if isinstance(m, (*CONV, *CONV_T))]
    handles += [m.register_forward_pre_hook(bn_hook(n)) for n, m in model.named_modules() if isinstance(m, BATCHNORM)]
    try:
        reference = model(x)
    finally:
        for h in handles:
            h.remove()
    saved = copy.deepcopy(model.state_dict())
    for conv_name, bn_name in pairs:
        _fold_one(model.get_submodule(conv_name), model.get_submodule(bn_name))
    err = float((model(x) - reference).abs().max())
    span = float(reference.abs().max()) or 1.0
    if err > rtol * span:
        model.load_state_dict(saved)
        raise ValueError(
            f"folding BatchNorm changed the network output by {err:.3g} (of {span:.3g}): a conv output feeds a BatchNorm and another path"
        )
    return pairs


def _fold_one(conv: nn.Module, bn: nn.Module) -> None:
    if bn.training or bn.running_mean is None:
        raise ValueError("BatchNorm folding needs eval mode with running statistics; call model.eval() first")
    factor = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)  # (out,)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    out_dim = 1 if isinstance(conv, CONV_T) else 0
    shape = [1] * conv.weight.ndim
    shape[out_dim] = -1
    conv.weight.mul_(factor.reshape(shape).to(conv.weight.dtype))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = (bias - bn.running_mean) * factor + shift
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
    else:
        conv.bias.copy_(new_bias)
    if bn.affine:
        bn.weight.fill_(1)
        bn.bias.zero_()
    bn.running_mean.zero_()
    bn.running_var.fill_(1 - bn.eps)  # 1/sqrt(1 − eps + eps) is exactly 1 in fp32


@dataclass
class NetworkContext:
    """What a whole-network step (QFT on a convolution network) sees after the layer-by-layer pass."""

    model: nn.Module  # quantized in place by the layer pass (weights on their grids)
    fp_model: nn.Module  # the full-precision network (BatchNorm folded)
    calibration: Tensor  # (B, C, *S) images
    attention: Tensor  # (B, *S) self-adaptive attention from the full-precision prediction
    grids: dict[str, tuple[Tensor, Tensor]]  # layer -> (scale, zero) chosen by the layer pass
    specs: dict[str, QuantSpec]  # layer -> its grid (the first and last layers may keep 8 bits)
    act: ActSpec | None = None
    size_multiple: int = 1  # spatial sizes the network takes are multiples of this
    progress: bool = True
    notes: dict[str, Any] = field(default_factory=dict)  # what the step reports into blockquant.json


def size_multiple(model: nn.Module) -> int:
    """Spatial sizes that pass every down- and up-sampling level of a MONAI U-Net are multiples
    of this (the product of its strides; four 2× poolings for BasicUNet); 1 for other networks."""
    strides = getattr(model, "strides", None)
    if type(model).__name__ == "UNet" and strides is not None:
        return math.prod(int(s) if isinstance(s, int) else int(max(s)) for s in strides)
    return 16 if type(model).__name__ == "BasicUNet" else 1


# ---------------------------------------------------------------- im2col statistics


@dataclass
class _Geometry:
    """Windows of the (padded / zero-inserted) input and which kernel taps each residue class reads."""

    view: Tensor  # (B, C, *out, *window): no copy
    out_shape: tuple[int, ...]
    modulus: tuple[int, ...]  # the output stride of the residue classes (1 per dim for a plain conv)
    taps: dict[tuple[int, ...], tuple[slice, ...]]  # residue -> slice of the window per dim (None: no tap)
    kernel: tuple[int, ...]


def _geometry(layer: nn.Module, x: Tensor) -> _Geometry:
    nd = x.ndim - 2
    k, s, p, d = (tuple(layer.kernel_size), tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation))
    if isinstance(layer, CONV_T):
        op = tuple(layer.output_padding)
        up = x.new_zeros(*x.shape[:2], *[(n - 1) * si + 1 for n, si in zip(x.shape[2:], s)])
        up[(slice(None), slice(None), *[slice(None, None, si) for si in s])] = x
        left = [di * (ki - 1) - pi for ki, di, pi in zip(k, d, p)]
        right = [lf + o for lf, o in zip(left, op)]
        x, conv_stride, modulus = _pad(up, left, right), (1,) * nd, s
    else:
        x, conv_stride, modulus, left = _pad(x, list(p), list(p)), s, (1,) * nd, [0] * nd
    view = x
    for i in range(nd):
        view = view.unfold(2 + i, (k[i] - 1) * d[i] + 1, conv_stride[i])
    taps: dict[tuple[int, ...], tuple[slice, ...]] = {}
    for residue in itertools.product(*[range(m) for m in modulus]):
        per_dim = []
        for r, m, ki, di, lf in zip(residue, modulus, k, d, left):
            active = [kk for kk in range(ki) if (r + kk * di - lf) % m == 0]  # taps landing on real (not inserted) samples
            step = active[1] - active[0] if len(active) > 1 else 1
            per_dim.append(slice(active[0] * di, active[-1] * di + 1, step * di) if active else None)
        taps[residue] = tuple(per_dim)
    return _Geometry(view, tuple(view.shape[2 : 2 + nd]), modulus, taps, k)


def _pad(x: Tensor, left: list[int], right: list[int]) -> Tensor:
    """Zero-pad (negative amounts crop) spatial dims; F.pad takes the last dim first."""
    pads = [v for lf, rt in zip(reversed(left), reversed(right)) for v in (lf, rt)]
    return F.pad(x, pads) if any(pads) else x


@dataclass
class LayerStats:
    """Weighted im2col statistics of one layer: ``Σ a·x xᵀ / Σ a`` etc., in fp32 (sums in fp64)."""

    gram: Tensor  # (K, K) uncentred
    x_mean: Tensor  # (K,)
    cross: Tensor | None  # (K, out) uncentred Σ a·x yᵀ / Σ a
    y_mean: Tensor | None  # (out,)
    y_sq: float  # Σ a·‖y‖² / Σ a (uncentred)
    rows: int  # output positions used
    total: int  # output positions there were

    def centred(self) -> tuple[Tensor, Tensor]:
        """Gram and cross term of the centred rows: the bias is then solved exactly as ``ȳ − W x̄``."""
        g = self.gram.double() - torch.outer(self.x_mean.double(), self.x_mean.double())
        c = self.cross.double() - torch.outer(self.x_mean.double(), self.y_mean.double())
        return g.float(), c.float()

    def centred_y_sq(self) -> float:
        return self.y_sq - float(torch.sum(self.y_mean.double() ** 2))


@torch.no_grad()
def layer_stats(
    layer: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    weight: Tensor | None = None,
    max_positions: int = 65536,
    seed: int = 0,
    chunk: int = 4096,
) -> LayerStats:
    """Statistics of ``layer`` on input ``x`` (and target output ``y``, per-position ``weight``).

    ``y`` is ``(B, out, *S)`` (``(..., out)`` for Linear), ``weight`` ``(B, *S)`` at the layer's
    output resolution. At most ``max_positions`` output positions are used (seeded, uniform).
    """
    if isinstance(layer, nn.Linear):
        rows = x.reshape(-1, x.shape[-1]).float()
        geo = None
        total, out = rows.shape[0], layer.out_features
    else:
        geo = _geometry(layer, x.float())
        total, out = x.shape[0] * math.prod(geo.out_shape), layer.out_channels
    k_cols = weight_matrix(layer).shape[1]
    pick = (
        torch.arange(total)
        if total <= max_positions
        else torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:max_positions]
    )
    pick = pick.sort().values
    y_flat = None if y is None else (y.reshape(-1, out) if geo is None else y.float().movedim(1, -1).reshape(-1, out))
    w_flat = None if weight is None else weight.float().reshape(-1)
    gram = torch.zeros(k_cols, k_cols, dtype=torch.float64)
    xsum = torch.zeros(k_cols, dtype=torch.float64)
    cross = None if y is None else torch.zeros(k_cols, out, dtype=torch.float64)
    ysum = None if y is None else torch.zeros(out, dtype=torch.float64)
    ysq, wsum = 0.0, 0.0
    for cls_pick, cols, gather in _classes(geo, rows if geo is None else None, pick, k_cols, x.shape[0]):
        local = torch.zeros(cols.numel(), cols.numel(), dtype=torch.float64)  # this class's columns only
        for part in cls_pick.split(chunk):
            a = torch.ones(part.numel()) if w_flat is None else w_flat[part]  # (n,)
            wsum += float(a.sum(dtype=torch.float64))
            if y_flat is not None:
                yp = y_flat[part].float()  # (n, out)
                ysum += (a[:, None] * yp).sum(0).double()
                ysq += float((a[:, None] * yp * yp).sum(dtype=torch.float64))
            if cols.numel() == 0:
                continue
            r = gather(part)  # (n, |cols|)
            ra = r * a[:, None]
            local += (ra.t() @ r).double()
            xsum[cols] += ra.sum(0).double()
            if cross is not None:
                cross[cols] += (ra.t() @ yp).double()
        if cols.numel() == k_cols:  # every column (a plain conv): no scatter
            gram += local
        elif cols.numel():
            gram[cols[:, None], cols[None, :]] += local
    wsum = max(wsum, 1e-30)
    return LayerStats(
        (gram / wsum).float(),
        (xsum / wsum).float(),
        None if cross is None else (cross / wsum).float(),
        None if ysum is None else (ysum / wsum).float(),
        ysq / wsum,
        int(pick.numel()),
        int(total),
    )


def _classes(geo: _Geometry | None, rows: Tensor | None, pick: Tensor, k_cols: int, batch: int):
    """Yield (positions of a residue class, the columns it reads, rows(positions) -> (n, |cols|))."""
    if geo is None:  # Linear: rows are the inputs themselves
        yield pick, torch.arange(k_cols), lambda part: rows[part]
        return
    nd = len(geo.out_shape)
    coords = torch.stack(torch.unravel_index(pick, (batch, *geo.out_shape)), dim=1)  # (n, 1 + nd)
    spatial_k = math.prod(geo.kernel)
    channels = k_cols // spatial_k
    for residue, slices in geo.taps.items():
        mask = torch.ones(pick.numel(), dtype=torch.bool)
        for i, m in enumerate(geo.modulus):
            mask &= coords[:, 1 + i] % m == residue[i]
        cls = mask.nonzero().squeeze(1)
        if cls.numel() == 0:
            continue
        if any(sl is None for sl in slices):
            yield pick[cls], torch.zeros(0, dtype=torch.long), None
            continue
        taps = [torch.arange(geo.kernel[i])[_tap_index(sl, geo.kernel[i], geo.view.shape[2 + nd + i])] for i, sl in enumerate(slices)]
        flat_taps = torch.zeros(1, dtype=torch.long)
        for i, t in enumerate(taps):  # row-major index of each active tap in the kernel
            flat_taps = (flat_taps[:, None] * geo.kernel[i] + t[None, :]).reshape(-1)
        cols = (torch.arange(channels)[:, None] * spatial_k + flat_taps[None, :]).reshape(-1)  # (C·|taps|,) in (C, *taps) order
        view = geo.view[(slice(None), slice(None), *[slice(None)] * nd, *slices)]  # (B, C, *out, *taps)
        cls_coords = coords[cls]

        def gather(part_pos: Tensor, view: Tensor = view, cls_coords: Tensor = cls_coords, cls_pick: Tensor = pick[cls]) -> Tensor:
            idx = cls_coords[torch.searchsorted(cls_pick, part_pos)]  # (n, 1 + nd)
            sel = view[(idx[:, 0], slice(None), *[idx[:, 1 + i] for i in range(nd)])]  # (n, C, *taps)
            return sel.reshape(sel.shape[0], -1).float()

        yield pick[cls], cols, gather


def _tap_index(sl: slice, k: int, window: int) -> slice:
    """The kernel taps a window slice reads: window positions are ``tap · dilation``."""
    dil = (window - 1) // (k - 1) if k > 1 else 1
    return slice(sl.start // dil, (sl.stop - 1) // dil + 1, sl.step // dil)
