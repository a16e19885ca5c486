"""Block-wise fine-tuning and its two multi-block extensions (DESIGN.md §3).

Single block (window 1): the quantized block, fed by the already-quantized blocks, learns its
step sizes, zero points and weights (STE) or rounding offsets (AdaRound) to reproduce the
full-precision block's output (BRECQ, Li et al. 2021; EfficientQAT Block-AP, Chen et al. 2024).
Joint window (K > 1): K consecutive blocks are trained together against the window's
full-precision output. Optionally (``train_float``) the window's float tensors, which the
checkpoint keeps unquantized (norm weights and biases, the linears' biases), train with them.
Downstream objective: the loss is taken at the normalised input of block b+k (``next:k``;
blocks in between stay full precision and frozen) or at the model's output (``logits``): KL
to the full-precision logits, or for an encoder the relative MSE of its mean-pooled sentence
embedding (``finetune.output_loss``, the loss QFT uses).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from blockquant.arch import block_linears, get_blocks
from blockquant.capture import BlockInputs, LayerResult, WindowContext, block_output, collect_hessians, relative_error, run_block
from blockquant.finetune import (
    FakeQuantLinear,
    PerSample,
    TrainConfig,
    batch_mean_squares,
    default_groups,
    mean_loss,
    output_loss,
    swap_in,
    swap_out,
    train,
)
from blockquant.layers import weight_matrix
from blockquant.primitives import compute_qparams, storage_ste
from blockquant.spec import QuantSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockFTOptions:
    # optimizer steps per window (one calibration batch each); lr_scale is relative to the window's mean initial step size
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=200, lr_scale=0.02, lr_weight=2e-2))
    rounding: str = "ste"  # "ste": train fp32 master weights; "adaround": train rounding offsets
    target: str = "fp-input"  # "fp-input": FP block on FP input; "quantized-input": on quantized input
    window: int = 1  # K consecutive blocks trained jointly
    stride: int = 1  # blocks the window slides by (1 … K)
    objective: str = "block"  # "block", "next:k" or "logits"
    train_float: bool = False  # also train the float tensors the checkpoint keeps: norm weights/biases, the linears' biases
    lr_float: float = 1e-3  # their learning rate (absolute)
    prox: float = 0.0  # pull of the master weights (STE) towards their start: prox · initial loss · mean squared move in code units

    def __post_init__(self) -> None:
        if not isinstance(self.train, TrainConfig):
            raise TypeError(f"train must be a TrainConfig, got {self.train!r}")
        if self.rounding not in ("ste", "adaround"):
            raise ValueError(f"rounding must be 'ste' or 'adaround', got {self.rounding!r}")
        if self.target not in ("fp-input", "quantized-input"):
            raise ValueError(f"target must be 'fp-input' or 'quantized-input', got {self.target!r}")
        if self.window < 1 or not 1 <= self.stride <= self.window:
            raise ValueError(f"need window >= 1 and 1 <= stride <= window, got window {self.window}, stride {self.stride}")
        if self.lr_float <= 0:
            raise ValueError(f"lr_float must be > 0, got {self.lr_float}")
        if self.prox < 0:
            raise ValueError(f"prox must be >= 0, got {self.prox}")
        if self.prox > 0 and self.rounding != "ste":
            raise ValueError("prox pulls the STE master weights towards their start; it does not apply to rounding 'adaround'")
        _ = self.downstream  # raises for a malformed objective

    @property
    def downstream(self) -> int | None:
        """k of ``next:k``; 0 for ``block``; None for ``logits``."""
        if self.objective == "block":
            return 0
        if self.objective == "logits":
            return None
        m = re.fullmatch(r"next:(\d+)", self.objective)
        if not m or int(m.group(1)) < 1:
            raise ValueError(f"objective must be 'block', 'next:k' (k >= 1) or 'logits', got {self.objective!r}")
        return int(m.group(1))


def _downstream_path(
    ctx: WindowContext, k: int | None
) -> tuple[Callable[[Tensor, tuple, dict], Tensor], nn.Module | None, list[nn.Module]]:
    """The frozen full-precision map from the window's output to where the loss is measured.

    Returns (path to the normalised hidden state, given the window's output and the block calls'
    other arguments; the LM head for ``logits`` or None (also for an encoder's ``logits``: its
    output is the pooled hidden state); the modules it moved to the device).
    """
    blocks = get_blocks(ctx.model, ctx.arch)
    last = ctx.first + len(ctx.blocks) - 1
    n = len(blocks)
    if k is None and ctx.arch.head is None and ctx.arch.kind != "encoder":
        raise ValueError(f"objective 'logits' needs a language-model head; {type(ctx.model).__name__} has none")
    if k is not None and k > n:
        raise ValueError(f"objective next:{k} points past the last block (the model has {n}); use k <= {n}")
    stop = n if k is None else min(last + k, n)  # loss at the input of block `stop` (n: the final norm)
    later = [blocks[j] for j in range(last + 1, stop)]
    if stop < n:
        norm = blocks[stop].get_submodule(ctx.arch.input_norm) if ctx.arch.input_norm else nn.Identity()
    else:
        norm = ctx.model.get_submodule(ctx.arch.final_norm) if ctx.arch.final_norm else nn.Identity()
    head = ctx.model.get_submodule(ctx.arch.head) if k is None and ctx.arch.head else None
    moved = [m for m in (*later, norm, head) if m is not None and k != 0]
    for m in moved:
        m.to(ctx.device)

    def path(h: Tensor, args: tuple, kwargs: dict) -> Tensor:
        if k == 0:
            return h
        for block in later:
            h = block_output(block(h, *args, **kwargs))
        return norm(h)

    return path, head, moved


class _Stored(nn.Module):
    """Parametrization of a trained float tensor: the value the checkpoint stores (``storage_ste``)."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, t: Tensor) -> Tensor:
        return storage_ste(t.float(), self.spec).to(t.dtype)


def float_tensors(blocks: list[nn.Module], names: list[list[str]]) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of every parameter of ``blocks`` but the quantized linears' weights: the
    norms' weights and biases and the linears' biases, which the checkpoint keeps in floating point."""
    found = []
    for block, block_names in zip(blocks, names):
        quantized = {f"{n}.weight" for n in block_names}
        for full, _ in block.named_parameters():
            if full not in quantized:
                owner, _, attr = full.rpartition(".")
                found.append((block.get_submodule(owner), attr))
    return found


def _window_forward(blocks: list[nn.Module], h: Tensor, args: tuple, kwargs: dict) -> Tensor:
    for block in blocks:
        h = block_output(block(h, *args, **kwargs))
    return h


def _call(inputs: BlockInputs, j: int, r: int | None = None) -> tuple[Tensor, tuple, dict]:
    """Entry ``j``'s block call: all its samples, or sample ``r`` alone."""
    return (inputs.hidden[j], inputs.args[j], inputs.kwargs[j]) if r is None else inputs.sample(j, r)


def _proximal(modules: list[FakeQuantLinear], start_loss: float, strength: float) -> Callable[[], Tensor]:
    """A penalty on how far the master weights move from their start (GPTQ's codes, say).

    ``strength · L₀ · mean((v − v₀)²)``, v in code units of the initial grid and L₀ the window's
    loss at the start on the first calibration batch: scaled by L₀, one strength is comparable
    across blocks and models. It damps code flips that only a few calibration batches ask for, a
    restoring force where a lower weight learning rate would only slow every move.
    """
    starts = [fq.weight.detach().clone() for fq in modules]
    count = sum(s.numel() for s in starts)
    scale = strength * start_loss

    def penalty() -> Tensor:
        return scale * sum(torch.sum((fq.weight - s) ** 2) for fq, s in zip(modules, starts)) / count

    return penalty


def apply(ctx: WindowContext, spec: QuantSpec, opts: BlockFTOptions, label_prefix: str = "blockft") -> dict[str, LayerResult]:
    """Fine-tune the window's quantization parameters and weights; leave them on the grid."""
    names = [list(block_linears(b, ctx.arch)) for b in ctx.blocks]
    for offset, block_names in enumerate(names):
        for name in block_names:
            prior = ctx.prior.get(ctx.layer_name(offset, name))
            if prior is not None and prior.g_idx is not None:
                raise ValueError("blockft needs contiguous groups: run gptq with static_groups: true (the default)")
    if opts.downstream == 1 and ctx.arch.input_norm is None and ctx.first == 0:
        log.warning("objective next:1 on a post-norm model is the single-block objective: block b+1 reads block b's output unchanged")
    path, head, moved = _downstream_path(ctx, opts.downstream)
    homes = [next(m.parameters(), torch.empty(0)).device for m in moved]
    source = ctx.fp_inputs if opts.target == "fp-input" else ctx.q_inputs
    reuse = opts.target == "fp-input" and ctx.fp_outputs is not None  # the driver ran the FP window on its FP input already
    with torch.no_grad():
        targets = [
            path(ctx.fp_outputs[j] if reuse else _window_forward(ctx.fp_blocks, *_call(source, j)), source.args[j], source.kwargs[j])
            for j in range(len(source.hidden))
        ]

    def make(offset: int) -> Callable[[str, nn.Module], FakeQuantLinear]:
        def build(name: str, layer: nn.Module) -> FakeQuantLinear:
            prior = ctx.prior.get(ctx.layer_name(offset, name))
            scale, zero = (prior.scale, prior.zero) if prior is not None else compute_qparams(weight_matrix(layer), spec)
            fp = weight_matrix(ctx.fp_blocks[offset].get_submodule(name)) if opts.rounding == "adaround" else None
            return FakeQuantLinear(layer, spec, scale, zero, opts.rounding, reference=fp)

        return build

    frozen = [(p, p.requires_grad) for p in ctx.model.parameters()] + [(p, p.requires_grad) for b in ctx.fp_blocks for p in b.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    # Float tensors first (their names change once the linears are wrapped); trained through the
    # rounding to the checkpoint's dtype, so the saved model is the one that trained.
    floats = float_tensors(ctx.blocks, names) if opts.train_float else []
    for module, attr in floats:
        parametrize.register_parametrization(module, attr, _Stored(spec))
    float_params = [module.parametrizations[attr].original for module, attr in floats]
    for p in float_params:
        p.requires_grad_(True)
    wrapped = [swap_in(block, block_names, make(o)) for o, (block, block_names) in enumerate(zip(ctx.blocks, names))]
    modules = [fq for w in wrapped for fq in w.values()]
    # Adam moves every parameter by about lr per step whatever its gradient's size, so an absolute
    # rate would be a different relative change at every bit width (the mean step size doubles per
    # bit removed): it is relative to the window's mean initial step size.
    mean_scale = float(torch.cat([fq.scale0.flatten() for fq in modules]).mean())
    for fq in modules:
        fq.layer.weight.requires_grad_(False)
        fq.train()

    # Several processes (or one sample at a time): an encoder's pooled loss is relative to the whole batch's mean square
    reproducible = opts.train.reproducible
    if opts.downstream is None and head is None:
        pooled = batch_mean_squares([t.float().mean(1) for t in targets], ctx.q_inputs, per_sample=reproducible)
    else:
        pooled = None

    def loss_on(i: int, r: int | None = None) -> Tensor:  # i: a calibration batch of the run; j: the entry holding it here
        j = ctx.q_inputs.entry(i)
        h, args, kwargs = _call(ctx.q_inputs, j, r)
        pred = path(_window_forward(ctx.blocks, h, args, kwargs), args, kwargs)
        target = targets[j] if r is None else targets[j][r : r + 1]  # r: sample r alone (``PerSample``)
        if opts.downstream is None:  # the model's output, from the cached FP final hidden state
            return output_loss(head, pred, target, None if pooled is None else pooled[j])
        return F.mse_loss(pred.float(), target.float())

    def rows(i: int) -> tuple[int, int]:
        j = ctx.q_inputs.entry(i)
        return (0 if j is None else ctx.q_inputs.hidden[j].shape[0]), ctx.q_inputs.total(i)

    per_sample = PerSample(loss_on, rows) if reproducible else None

    n = ctx.q_inputs.n_batches
    share = ctx.q_inputs.share if ctx.q_inputs.split is not None else None
    n_eval = opts.train.held_out(n)
    items = list(range(n))
    cfg = dataclasses.replace(opts.train, lr_scale=opts.train.lr_scale * mean_scale)
    label = f"{label_prefix} blocks {ctx.first}-{ctx.first + len(ctx.blocks) - 1}"
    groups = default_groups(modules, cfg) + [(float_params, opts.lr_float)]
    try:
        if opts.prox > 0:
            with torch.no_grad():
                penalty = _proximal(modules, mean_loss(loss_on, items[:1], share, per_sample), opts.prox)
        else:
            penalty = None
        log_ = train(
            modules,
            loss_on,
            items[: n - n_eval],
            items[n - n_eval :],
            cfg,
            progress=ctx.progress,
            groups=groups,
            penalty=penalty,
            label=label,
            share=share,
            per_sample=per_sample,
        )
    finally:
        for module, attr in floats:  # the (best) trained values, rounded as stored, become plain parameters again
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
        for p, flag in frozen:
            p.requires_grad_(flag)
        for m, home in zip(moved, homes):
            m.to(home)
    results = {}
    x = ctx.q_inputs
    for offset, (block, fp_block, w) in enumerate(zip(ctx.blocks, ctx.fp_blocks, wrapped)):
        for fq in w.values():
            fq.eval()
        swap_out(block, w)
        grids = {name: fq.commit() for name, fq in w.items()}
        hessians = collect_hessians(block, x, {n: block.get_submodule(n) for n in w})
        for name, (scale, zero) in grids.items():
            error = relative_error(weight_matrix(fp_block.get_submodule(name)), weight_matrix(block.get_submodule(name)), hessians[name])
            results[ctx.layer_name(offset, name)] = LayerResult(scale.cpu(), zero.cpu(), None, error)
        if offset < len(ctx.blocks) - 1:  # the next block's errors are measured on this one's output
            x = x.with_hidden(run_block(block, x))
    ctx.train_logs.append((ctx.first, log_))
    return results
