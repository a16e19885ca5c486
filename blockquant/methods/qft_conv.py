"""QFT on convolution networks (segmentation U-Nets): the parameterisation of ``qft.py``, one
``QFTLinear`` per quantized conv / transposed conv / linear leaf (its ``(out, in·∏kernel)``
matrix), trained end to end through the whole network with ``finetune.train``.

Degrees of freedom per layer: log step sizes per output channel, zero points (asymmetric grids),
weight nudges (fp32 master weights through the STE), a bias correction (on layers that have a
bias: a MONAI state dict cannot take a new key), the static input scale when activations are
quantized per tensor, and equalization factors where a fold is exact (``equalizable_pairs``).

Loss (DESIGN.md §3 EfficientQ): the class-balanced self-adaptive attention loss on the logits,
``Σ A·‖z_q − z_fp‖² / Σ ‖z_fp‖²``, with ``A = (max_count / count_c)^0.5`` of the full-precision
network's own prediction on the calibration volume (``admm.attention_map``, computed once by
``segmentation.quantize_network``). The volume is cut into tiles (the training items; the last
one is held out for early stopping); the teacher's logits are the FP network's on each tile.
The tiles bound the activation memory, so ``checkpointing`` (a transformer-block knob) is not used.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from blockquant import activations
from blockquant.convnet import BATCHNORM, NetworkContext
from blockquant.finetune import swap_in, swap_out
from blockquant.layers import CONV, CONV_T, weight_matrix
from blockquant.methods.qft import (
    Equalizer,
    QFTLinear,
    QFTOptions,
    hw_preset,
    share_act_range,
    train_all,
    train_notes,
    trainable_kinds,
)
from blockquant.primitives import compute_qparams
from blockquant.spec import ActSpec, QuantSpec

log = logging.getLogger(__name__)

# per-element maps with f(c·x) = c·f(x) for every c > 0: a positive per-channel factor passes through them
HOMOGENEOUS = (nn.ReLU, nn.PReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def _passes_factors(m: nn.Module) -> bool:
    """True when ``m(x / e) = m(x) / e`` per channel for positive e: homogeneous maps, and an eval
    BatchNorm without shift (after folding: an identity); PReLU is homogeneous whatever its slopes."""
    if isinstance(m, HOMOGENEOUS):
        return True
    if isinstance(m, BATCHNORM) and not m.training and m.running_mean is not None:
        return bool((m.running_mean == 0).all()) and (not m.affine or bool((m.bias == 0).all()))
    return False


def _pipeline(prefix: str, seq: nn.Sequential) -> list[tuple[str, nn.Module]]:
    """A plain Sequential's leaves in order, nested plain Sequentials inlined: each one's output feeds only the next."""
    out = []
    for name, child in seq.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.Sequential) and type(child).forward is nn.Sequential.forward:
            out += _pipeline(full, child)
        else:
            out.append((full, child))
    return out


def equalizable_pairs(model: nn.Module, layers: list[str]) -> list[tuple[str, str]]:
    """(producer, consumer) layers where the producer's output reaches only the consumer, through
    per-channel positively homogeneous modules, inside a plain ``nn.Sequential``: there a factor
    ``e`` per channel divides the producer's rows and bias and multiplies the consumer's columns
    exactly. Residual sums, skip concatenations and other ops break the chain (no pair)."""
    names, pairs = set(layers), {}
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential) or type(module).forward is not nn.Sequential.forward:
            continue
        items = _pipeline(prefix, module)
        for i, (name, layer) in enumerate(items):
            if name not in names:
                continue
            j = i + 1
            while j < len(items) and _passes_factors(items[j][1]):
                j += 1
            if j == len(items) or items[j][0] not in names:
                continue
            consumer = items[j][1]
            is_conv = isinstance(layer, (*CONV, *CONV_T)), isinstance(consumer, (*CONV, *CONV_T))
            width = layer.out_channels if is_conv[0] else layer.out_features
            reads = consumer.in_channels if is_conv[1] else consumer.in_features
            if is_conv[0] == is_conv[1] and width == reads:
                pairs[name] = items[j][0]
    return list(pairs.items())


def attention_loss(pred: Tensor, target: Tensor, attention: Tensor) -> Tensor:
    """``Σ A·‖pred − target‖² / Σ ‖target‖²`` over voxels; logits ``(B, classes, *S)``, ``A`` ``(B, *S)``."""
    err = (pred.float() - target.float()).pow(2).sum(1)  # (B, *S)
    return (attention * err).sum() / target.float().pow(2).sum().clamp(min=1e-12)


def tiles(shape: tuple[int, ...], multiple: int, max_voxels: int = 2**17) -> list[tuple[slice, ...]]:
    """Spatial tiles of a volume: halve the largest axis (keeping sizes multiples of ``multiple``)
    until a tile holds at most ``max_voxels`` voxels or no axis can be halved."""
    size = list(shape)
    while math.prod(size) > max_voxels:
        axes = [i for i, s in enumerate(size) if s % (2 * multiple) == 0]
        if not axes:
            break
        i = max(axes, key=lambda a: size[a])
        size[i] //= 2
    starts = itertools.product(*[range(0, n, s) for n, s in zip(shape, size)])
    return [tuple(slice(o, o + s) for o, s in zip(start, size)) for start in starts]


def check(opts: QFTOptions) -> None:
    """Refuse the options a convolution network cannot honour (before any work)."""
    if opts.feature_weight:
        raise ValueError(
            "qft feature_weight is a token-level term of transformer models; convolution networks train on the logits only: drop it"
        )


def setup(
    model: nn.Module,
    layers: list[str],
    grids: dict[str, tuple[Tensor, Tensor]],
    specs: dict[str, QuantSpec],
    opts: QFTOptions,
    act: ActSpec | None,
) -> tuple[dict[str, QFTLinear], dict[str, list], list[Callable], dict]:
    """Swap every layer for a QFTLinear on its grid (from the earlier step, else min–max); the trainable tensors by kind."""
    pow2 = hw_preset(opts, next(iter(specs.values()))) == "pow2"
    no_bias = [n for n in layers if model.get_submodule(n).bias is None] if opts.bias else []
    if no_bias:
        log.warning("qft: no bias correction on %s: the network builds them without a bias", ", ".join(no_bias))

    def build(name: str, layer: nn.Module) -> QFTLinear:
        scale, zero = grids[name] if name in grids else compute_qparams(weight_matrix(layer), specs[name])
        device = layer.weight.device
        return QFTLinear(layer, specs[name], scale.to(device), zero.to(device), pow2, opts.bias and layer.bias is not None)

    pairs = equalizable_pairs(model, layers) if opts.equalize else []  # on the plain layers, before the swap
    wrapped = swap_in(model, layers, build)
    kinds, undo = trainable_kinds(list(wrapped.values()), opts), []
    notes: dict = {"no_bias_correction": no_bias}
    if opts.equalize:
        kinds["equalize"], notes["no_equalization"] = _attach_equalizers(pairs, layers, wrapped)
        notes["equalized"] = [list(p) for p in pairs]
    if act is not None and opts.act_ranges:
        kinds["act"] = [share_act_range([fq.layer], pow2, undo) for fq in wrapped.values() if hasattr(fq.layer, activations.ATTR)]
    return wrapped, kinds, undo, notes


def _attach_equalizers(pairs: list[tuple[str, str]], layers: list[str], wrapped: dict[str, QFTLinear]) -> tuple[list, list[str]]:
    """One Equalizer per exact producer → consumer pair; a warning names every layer whose output stays unequalized."""
    params = []
    for producer, consumer in pairs:
        fq_p, fq_c = wrapped[producer], wrapped[consumer]
        width = fq_p.scale0.shape[0]
        eq = Equalizer(width, fq_p.scale0.device)
        fq_p.eq_out = (eq, slice(0, width))
        index = torch.arange(fq_c.in_features, device=eq.log_e.device) // (fq_c.in_features // width)  # (K,): channel of each column
        fq_c.eq_in = (eq, index)
        params.append(eq.log_e)
    skipped = [n for n in layers if n not in dict(pairs)]
    if skipped:
        log.warning(
            "qft: no equalization for the outputs of %s: each reaches the next layer through a residual sum, a skip "
            "concatenation, a non-homogeneous op or the network output (only conv → [shift-free BatchNorm, dropout, "
            "ReLU/PReLU/LeakyReLU] → conv chains inside a Sequential fold exactly)",
            ", ".join(skipped),
        )
    return params, skipped


@torch.no_grad()
def fold(model: nn.Module, wrapped: dict[str, QFTLinear], undo: list[Callable]) -> dict[str, tuple[Tensor, Tensor]]:
    """Write every trained DoF into the plain network: grid weights, scales (÷ e on producer rows), biases, static input scales."""
    grids = {}
    for name, fq in wrapped.items():
        scale, zero = fq.commit()
        grids[name] = (scale.cpu(), zero.cpu())
    swap_out(model, wrapped)
    for fn in undo:
        fn()
    model.eval()  # training switched the wrapped layers to train mode
    return grids


def apply(ctx: NetworkContext, spec: QuantSpec, opts: QFTOptions) -> dict[str, tuple[Tensor, Tensor]]:
    """Fine-tune every DoF of the quantized ``ctx.model`` jointly against ``ctx.fp_model`` on the
    calibration images ``(B, C, *S)``; leave it folded on its grids. Returns the grids (name ->
    (scale, zero)); what it did goes into ``ctx.notes``."""
    model, fp, calibration, attention, grids, specs = ctx.model, ctx.fp_model, ctx.calibration, ctx.attention, ctx.grids, ctx.specs
    check(opts)
    layers = list(specs)
    parts = tiles(tuple(calibration.shape[2:]), ctx.size_multiple, opts.tile_voxels)
    inputs = [calibration[(slice(None), slice(None), *t)] for t in parts]
    weights = [attention[(slice(None), *t)] for t in parts]
    with torch.no_grad():
        targets = [fp(x) for x in inputs]  # (B, classes, *tile)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    wrapped, kinds, undo, notes = setup(model, layers, grids, specs, opts, ctx.act)
    for p in kinds["equalize"] + kinds["act"]:
        p.requires_grad_(True)

    def loss_on(i: int) -> Tensor:
        return attention_loss(model(inputs[i]), targets[i], weights[i])

    n = len(inputs)
    try:
        result = train_all(list(wrapped.values()), kinds, loss_on, n, opts, ctx.progress)
        out = fold(model, wrapped, undo)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    ctx.notes.update(notes)
    ctx.notes.update(
        hw=hw_preset(opts, next(iter(specs.values()))),
        tiles=[[s.stop - s.start for s in parts[0]], n, opts.train.held_out(n)],
        **train_notes(result, kinds),
    )
    return out
