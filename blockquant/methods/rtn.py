"""Round-to-nearest with optional clipping search — the baseline every table includes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from blockquant.capture import BlockContext, LayerResult, collect_hessians, relative_error
from blockquant.convnet import layer_stats
from blockquant.layers import set_weight_matrix, weight_matrix
from blockquant.primitives import clip_search, compute_qparams, fake_quantize
from blockquant.spec import QuantSpec


@dataclass(frozen=True)
class RTNOptions:
    clip_search: bool = False  # search a per-group range shrink minimising the error
    input_weighted: bool = True  # with clip_search: weight each column's error by E[x²]


def rtn_quantize(w: Tensor, spec: QuantSpec, search: bool = False, col_weight: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Fake-quantized ``w`` (fp32) with its scale and zero point (min–max or searched)."""
    w = w.float()
    scale, zero = clip_search(w, spec, col_weight) if search else compute_qparams(w, spec)
    return fake_quantize(w, scale, zero, spec), scale, zero


def data_free(opts: RTNOptions) -> bool:
    """Whether RTN needs no calibration inputs: all but the input-weighted range search."""
    return not (opts.clip_search and opts.input_weighted)


@torch.no_grad()
def apply(block: nn.Module, ctx: BlockContext, spec: QuantSpec, opts: RTNOptions) -> dict[str, LayerResult]:
    """RTN of every linear of ``block``. With calibration inputs, one pass before quantizing
    collects the Hessians that serve the error record (and the weighted search); without
    (``ctx.inputs`` None), the layers' errors are not measured (NaN)."""
    hessians = {}
    if ctx.inputs is not None:
        firsts = {g.linears[0]: ctx.linear(block, g.linears[0]) for g in ctx.groups}
        hessians = collect_hessians(block, ctx.inputs, firsts)
    results = {}
    for group in ctx.groups:
        h = hessians.get(group.linears[0])
        for name in group.linears:
            layer = ctx.linear(block, name)
            w = weight_matrix(layer)
            col_weight = torch.diag(h) if opts.input_weighted and h is not None else None
            w_hat, scale, zero = rtn_quantize(w, spec, opts.clip_search, col_weight)
            set_weight_matrix(layer, w_hat)
            results[name] = LayerResult(scale.cpu(), zero.cpu(), None, math.nan if h is None else relative_error(w, w_hat, h))
    return results


def apply_conv(layer: nn.Module, x: Tensor, y: Tensor, attention: Tensor | None, spec: QuantSpec, opts: RTNOptions, seed: int = 0):
    """RTN on one layer of a convolution network (its im2col matrix); the weighted search reads E[x²] per im2col column."""
    col_weight = None
    if opts.clip_search and opts.input_weighted:
        col_weight = torch.diag(layer_stats(layer, x, seed=seed).gram)
    w_hat, scale, zero = rtn_quantize(weight_matrix(layer), spec, opts.clip_search, col_weight)
    return w_hat, scale, zero, None, {}
