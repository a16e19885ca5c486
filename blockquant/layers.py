"""Every quantizable layer kind seen as one ``(out, K)`` weight matrix, the shape a grid is defined on.

``nn.Linear``: ``(out, in)``. GPT-2's ``Conv1D`` stores its weight transposed, ``(in, out)``.
Convolutions: ``(out, in·∏kernel)``, the im2col matrix. A transposed convolution is the
stride-1 convolution of its zero-inserted input with the flipped, transposed kernel,
``W'[o, i, k] = W[i, o, flip(k)]``. Methods read and write weights only through these functions,
so that one method serves transformer linears and convolution layers alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LAYER_TYPES = (*CONV, *CONV_T, nn.Linear)  # what a convolution network is walked by


def is_conv(layer: nn.Module) -> bool:
    return isinstance(layer, (*CONV, *CONV_T))


def weight_matrix(layer: nn.Module) -> Tensor:
    """The weight as its ``(out, K)`` fp32 matrix; always a copy (methods keep it as the original
    weight after writing ŵ back)."""
    w = layer.weight.detach()
    if not is_conv(layer):
        return (w.t() if isinstance(layer, Conv1D) else w).to(torch.float32, copy=True)
    w = w.float()
    if isinstance(layer, CONV_T):
        w = w.transpose(0, 1).flip(list(range(2, w.ndim)))
    return w.reshape(w.shape[0], -1).clone()


def weight_view(layer: nn.Module) -> Tensor:
    """The weight as its ``(out, K)`` matrix, for reading only: a view in the layer's own dtype for
    Linear and Conv1D (no fp32 copy of a wide layer just to read its shape or score it), the
    fp32 copy of ``weight_matrix`` for convolutions."""
    if is_conv(layer):
        return weight_matrix(layer)
    w = layer.weight.detach()
    return w.t() if isinstance(layer, Conv1D) else w


def matrix_to_weight(layer: nn.Module, w: Tensor) -> Tensor:
    """An ``(out, K)`` matrix in the layer's own weight layout (the inverse of ``weight_matrix``), w's dtype."""
    if isinstance(layer, Conv1D):
        return w.t()
    if isinstance(layer, CONV_T):
        i, o, *k = layer.weight.shape
        w = w.reshape(o, i, *k).flip(list(range(2, 2 + len(k)))).transpose(0, 1)
    return w.reshape(layer.weight.shape)


def set_weight_matrix(layer: nn.Module, w: Tensor) -> None:
    """Write an ``(out, K)`` matrix back in the layer's own layout and dtype."""
    layer.weight.data.copy_(matrix_to_weight(layer, w).to(layer.weight.dtype))


def run_with_weight(layer: nn.Module, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """The layer's own operation (stride, padding, dilation, output padding) with weight matrix
    ``w`` (out, K) and ``bias``: a linear map for Linear / Conv1D."""
    if not is_conv(layer):
        return F.linear(x, w, bias)
    weight = matrix_to_weight(layer, w)
    if isinstance(layer, CONV):
        return layer._conv_forward(x, weight, bias)
    nd = weight.ndim - 2
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    return fn(x, weight, bias, layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation)
