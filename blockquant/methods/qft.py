"""QFT (Finkelstein et al. 2022, "QFT: Post-training quantization via fast joint finetuning of all
degrees of freedom"): every quantization degree of freedom of the whole network is a trainable
tensor at once, fine-tuned end to end by distillation from the full-precision model, in a
parameterisation that folds into what an integer kernel executes (DESIGN.md §3 "QFT").

Per quantized linear ``y = ŵ·x' + b'`` with ``ŵ = s'·(clamp(⌊v ⊙ e_in⌉ + z) − z)``:
  - ``s = exp(σ)``: step sizes per output channel or group, trained in log space; the scale in
    use is ``s' = hw(s / e_out)`` (``e_out``: the factors folded into this layer's rows when it
    feeds an equalized group; ``hw``: power-of-two rounding for ``pow2``, then the checkpoint
    dtype), straight-through — so the exported scale is exactly the trained one;
  - ``z``: zero points (asymmetric grids), rounded straight-through;
  - ``v``: weight nudges, fp32 master weights in code units of the initial grid (``finetune``);
  - ``e = exp(ε)``: equalization factors, one per channel of each producer of the architecture
    table (a norm, or a linear's rows: v → o, up → down), shared by all its consumers: the
    producer's output is divided by e (norm weight and bias, or the linear's scale rows and bias:
    a row factor commutes with per-row grids), the consumers' columns multiplied by it
    (``e_in = e[index]``: with grouped-query attention o's columns read their KV head's channel);
    initialised at 1 — on top of AWQ's / SmoothQuant's scales when those ran first, since they
    are already folded;
  - ``b' = b / e_out``: bias corrections, trainable on every quantized layer (created at zero
    where the layer had none and the checkpoint can hold one: the table's ``bias_flags``);
  - static per-tensor activation scales (``--abits`` < 16, ``--act-granularity tensor``), one per
    group of linears reading the same tensor, in log space.
The loss is KL(p_fp ‖ p_q) on the logits for language models, the (normalised) MSE of the
mean-pooled last hidden states for encoders, plus optionally a token-level feature MSE; the
full-precision side is the last-block output the sequential pipeline already computed. Training
is ``finetune.train`` (AdamW, cosine, clipping, early stop on held-out calibration batches,
divergence guard); blocks run under gradient checkpointing. At the end every DoF is written
into the model: integer-grid weights + scales (+ zeros) + biases, norms divided by e — no extra
runtime op remains, and the existing export formats carry it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from blockquant import activations
from blockquant.arch import LinearGroup, block_linears, get_blocks
from blockquant.capture import LayerResult, ModelContext, block_output
from blockquant.finetune import (
    FakeQuantLinear,
    TrainConfig,
    TrainLog,
    batch_mean_squares,
    output_loss,
    relative_mse,
    swap_in,
    swap_out,
    train,
)
from blockquant.fold import channel_index, feeder_rows
from blockquant.layers import run_with_weight, weight_matrix
from blockquant.primitives import compute_qparams, round_scale_ste, round_ste, storage_ste
from blockquant.spec import ActSpec, QuantSpec

log = logging.getLogger(__name__)

HW_PRESETS = {
    "int-per-channel": "integer weights, one scale (and zero) per output channel: --group-size -1",
    "int-per-group": "integer weights, one scale (and zero) per group of input columns: --group-size g",
    "pow2": "power-of-two weight and static activation scales (a shift instead of a multiply), any granularity",
}


@dataclass(frozen=True)
class QFTOptions:
    # optimizer steps (one calibration batch each, through the whole model); lr_scale: log step sizes and zero points
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=150, lr_scale=5e-3, lr_weight=1e-2, patience=3, diverge=4.0))
    lr_equalize: float = 1e-3  # log equalization factors
    lr_bias: float = 1e-3  # bias corrections (output units)
    lr_act: float = 5e-3  # log static activation scales
    hw: str | None = None  # int-per-channel | int-per-group | pow2; None: int-per-channel with --group-size -1, else int-per-group
    step_sizes: bool = True  # the ablation switches: learn step sizes and zero points ...
    equalize: bool = True  # ... equalization factors ...
    bias: bool = True  # ... bias corrections ...
    weights: bool = True  # ... weight nudges ...
    act_ranges: bool = True  # ... static activation scales
    feature_weight: float = 0.0  # weight of a token-level MSE on the last hidden states (intermediate-feature term)
    checkpointing: bool = True  # recompute each block in the backward pass: memory ≈ inference + one block's activations
    tile_voxels: int = 2**17  # convolution networks: the calibration volume is cut into tiles of at most this many voxels

    def __post_init__(self) -> None:
        if not isinstance(self.train, TrainConfig):
            raise TypeError(f"train must be a TrainConfig, got {self.train!r}")
        if self.train.reproducible:
            raise ValueError(
                "qft trains the whole model on each batch at once: train.reproducible (one sample at a time) is for blockft and lkd"
            )
        if self.hw is not None and self.hw not in HW_PRESETS:
            raise ValueError(f"unknown --hw {self.hw!r}; choose one of {', '.join(HW_PRESETS)}")
        for name in ("lr_equalize", "lr_bias", "lr_act"):
            if getattr(self, name) <= 0:
                raise ValueError(f"qft {name} must be > 0, got {getattr(self, name)}")
        if self.feature_weight < 0:
            raise ValueError(f"qft feature_weight must be >= 0, got {self.feature_weight}")
        if not (self.step_sizes or self.equalize or self.bias or self.weights):
            raise ValueError("qft: step_sizes, equalize, bias and weights are all switched off; nothing to train")
        if self.tile_voxels < 1:
            raise ValueError(f"qft tile_voxels must be >= 1, got {self.tile_voxels}")


def hw_preset(opts: QFTOptions, spec: QuantSpec) -> str:
    """The preset in use: ``opts.hw``, or the integer preset of the spec's granularity."""
    if opts.hw is not None:
        return opts.hw
    return "int-per-channel" if spec.group_size == -1 and not spec.per_tensor else "int-per-group"


def check(opts: QFTOptions, spec: QuantSpec, act: ActSpec | None) -> None:
    """Refuse a ``--hw`` preset the recipe's grid cannot satisfy (before any work)."""
    hw = hw_preset(opts, spec)
    if hw == "int-per-channel" and (spec.group_size != -1 or spec.per_tensor):
        raise ValueError(
            f"--hw int-per-channel learns one scale per output channel, but the grid has {spec.describe()}: "
            "use --group-size -1, or --hw int-per-group for groups"
        )
    if hw == "int-per-group" and (spec.group_size == -1 or spec.per_tensor):
        raise ValueError(
            f"--hw int-per-group learns one scale per group of input columns, but the grid has {spec.describe()}: "
            "give --group-size g (e.g. 128), or use --hw int-per-channel"
        )


def pow2_ste(s: Tensor) -> Tensor:
    """``2^⌊log₂ s⌉`` forward, gradient 1: the nearest power of two (in log space)."""
    return s + (torch.exp2(torch.round(torch.log2(s))) - s).detach()


class Equalizer(nn.Module):
    """``e = exp(ε)`` (C,), one factor per output channel of a producer, shared by its consumers."""

    def __init__(self, width: int, device: torch.device) -> None:
        super().__init__()
        self.log_e = nn.Parameter(torch.zeros(width, device=device))

    def factors(self) -> Tensor:
        return self.log_e.exp()


class _FoldedNorm(nn.Module):
    """Parametrization of a norm's weight / bias: ``storage(t / e)`` (the producer side of the fold)."""

    def __init__(self, eq: Equalizer, rows: slice, spec: QuantSpec) -> None:
        super().__init__()
        self.eq, self.rows, self.spec = eq, rows, spec

    def forward(self, t: Tensor) -> Tensor:
        div = torch.ones(t.shape[0], device=t.device)
        div = torch.cat([div[: self.rows.start], self.eq.factors(), div[self.rows.stop :]])
        return storage_ste(t.float() / div, self.spec).to(t.dtype)


class QFTLinear(FakeQuantLinear):
    """A quantized linear with every QFT degree of freedom (see the module docstring)."""

    def __init__(self, layer: nn.Module, spec: QuantSpec, scale: Tensor, zero: Tensor, pow2: bool, bias: bool) -> None:
        scale = scale.float()
        if pow2:  # re-express the grid on the nearest power-of-two scale (zero point keeps the range)
            s2 = torch.exp2(torch.round(torch.log2(scale.clamp(min=1e-30))))
            zero = torch.round(zero.float() * scale / s2).clamp(spec.qmin, spec.qmax)
            scale = s2
        super().__init__(layer, spec, scale, zero, "ste")
        del self.scale  # the step sizes live in log space
        self.log_scale = nn.Parameter(self.scale0.log())
        self.pow2 = pow2
        w = layer.weight
        if bias or layer.bias is not None:
            init = layer.bias.detach().float() if layer.bias is not None else torch.zeros(self.scale0.shape[0], device=w.device)
            self.bias = nn.Parameter(init.clone(), requires_grad=bias)
        else:
            self.bias = None
        self.eq_in: tuple[Equalizer, Tensor] | None = None  # (factors, feeder channel of each input column)
        self.eq_out: tuple[Equalizer, slice] | None = None  # (factors, the rows they divide)

    def _row_factors(self) -> Tensor | None:
        if self.eq_out is None:
            return None
        eq, rows = self.eq_out
        ones = torch.ones(self.scale0.shape[0], device=self.scale0.device)
        return torch.cat([ones[: rows.start], eq.factors(), ones[rows.stop :]])

    def grid_scale(self) -> Tensor:
        s = self.log_scale.exp()
        row = self._row_factors()
        if row is not None:
            s = s / row.unsqueeze(1)
        if self.pow2:
            s = pow2_ste(s)
        return round_scale_ste(s.clamp(min=1e-8), self.spec)

    def folded_bias(self) -> Tensor | None:
        if self.bias is None:
            return None
        row = self._row_factors()
        b = self.bias if row is None else self.bias / row
        return storage_ste(b, self.spec)

    def dequantized(self, hard: bool = False) -> Tensor:
        s = self._expand(self.grid_scale())
        z = self._expand(self.grid_zero())
        v = self.weight
        if self.eq_in is not None:
            eq, index = self.eq_in
            v = v * eq.factors()[index].unsqueeze(0)  # (out, in): the consumer's columns × e
        q = torch.clamp(round_ste(v) + z, self.spec.qmin, self.spec.qmax)
        return s * (q - z)

    def forward(self, x: Tensor) -> Tensor:
        act_quant = getattr(self.layer, activations.ATTR, None)
        if act_quant is not None:
            x = act_quant(x)
        b = self.folded_bias()
        return run_with_weight(self.layer, x, self.dequantized().to(x.dtype), None if b is None else b.to(x.dtype))

    @torch.no_grad()
    def commit(self) -> tuple[Tensor, Tensor]:
        """Write the grid weight and the folded bias into the wrapped layer; its (scale, zero)."""
        super().commit()
        b = self.folded_bias()
        if b is not None:
            target = self.layer.weight
            if self.layer.bias is None:
                self.layer.bias = nn.Parameter(torch.empty(b.shape, dtype=target.dtype, device=target.device), requires_grad=False)
            self.layer.bias.data.copy_(b.to(self.layer.bias.dtype))
        return self.grid_scale().detach().clone(), self.grid_zero().detach().clone()


class _LearnedActQuantizer(nn.Module):
    """A static per-tensor activation quantizer whose (log) scale is a shared trainable tensor."""

    def __init__(self, base: activations.ActQuantizer, log_scale: nn.Parameter, pow2: bool) -> None:
        super().__init__()
        self.spec, self.log_scale, self.pow2 = base.spec, log_scale, pow2
        self.register_buffer("zero", base.zero.clone(), persistent=False)

    def scale(self) -> Tensor:
        s = self.log_scale.exp()
        return pow2_ste(s) if self.pow2 else s

    def forward(self, x: Tensor) -> Tensor:
        return activations.fake_quant_act(x, self.scale(), self.zero, self.spec)


def _head_dim(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    d = getattr(config, "head_dim", None)
    heads = getattr(config, "num_attention_heads", None)
    return d or (config.hidden_size // heads if heads and getattr(config, "hidden_size", None) else None)


def trainable_kinds(modules: list[QFTLinear], opts: QFTOptions) -> dict[str, list]:
    """Switch each module's tensors on or off as ``opts`` says; the trainable ones by kind (equalize / act: filled later)."""
    kinds: dict[str, list] = {"scale": [], "weight": [], "bias": [], "equalize": [], "act": []}
    for fq in modules:
        fq.weight.requires_grad_(opts.weights)
        fq.log_scale.requires_grad_(opts.step_sizes)
        fq.zero.requires_grad_(opts.step_sizes and not fq.spec.sym)
        kinds["scale"] += [p for p in (fq.log_scale, fq.zero) if p.requires_grad]
        kinds["weight"] += [fq.weight] if opts.weights else []
        kinds["bias"] += [fq.bias] if fq.bias is not None and fq.bias.requires_grad else []
    return kinds


def _bias_layers(model: nn.Module, ctx: ModelContext, names: list[str]) -> tuple[set[str], list[str], list[str]]:
    """(relative names that may carry a bias correction, config flags to turn on, names that may not)."""
    blocks = get_blocks(model, ctx.arch)
    has = {n for n in names if all(b.get_submodule(n).bias is not None for b in blocks)}
    flags = []
    for flag, linears in ctx.arch.bias_flags:
        if hasattr(model.config, flag) and set(linears) <= set(names):
            has |= set(linears)
            if not getattr(model.config, flag):
                flags.append(flag)
    return has, flags, [n for n in names if n not in has]


def _setup(ctx: ModelContext, spec: QuantSpec, opts: QFTOptions) -> tuple[list[dict[str, QFTLinear]], dict[str, list], list[Callable]]:
    """Swap every block linear for a QFTLinear and attach the shared equalizers; the trainable tensors by kind."""
    model, arch = ctx.model, ctx.arch
    blocks = get_blocks(model, arch)
    names = list(block_linears(blocks[0], arch))
    pow2 = hw_preset(opts, spec) == "pow2"
    bias_ok, flags, no_bias = _bias_layers(model, ctx, names) if opts.bias else (set(), [], [])
    if no_bias:
        log.warning(
            "qft: no bias correction on %s in every block: %s builds them without a bias and no config flag adds one",
            ", ".join(no_bias),
            type(model).__name__,
        )
    ctx.notes.update(bias_flags=flags, no_bias_correction=no_bias)

    def make(index: int) -> Callable[[str, nn.Module], QFTLinear]:
        def build(name: str, layer: nn.Module) -> QFTLinear:
            prior = ctx.prior.get(f"{arch.blocks}.{index}.{name}")
            scale, zero = (prior.scale, prior.zero) if prior is not None else compute_qparams(weight_matrix(layer), spec)
            return QFTLinear(layer, spec, scale.to(layer.weight.device), zero.to(layer.weight.device), pow2, name in bias_ok)

        return build

    wrapped = [swap_in(block, names, make(i)) for i, block in enumerate(blocks)]
    kinds = trainable_kinds([fq for w in wrapped for fq in w.values()], opts)
    undo: list[Callable] = []
    if opts.equalize:
        kinds["equalize"] = _attach_equalizers(ctx, blocks, wrapped, spec, undo)
    if ctx.act is not None and ctx.act.granularity == "tensor" and opts.act_ranges:
        kinds["act"] = _learn_act_ranges(arch.groups, blocks, wrapped, pow2, undo)
    elif ctx.act is not None:
        log.info("qft: per-token dynamic activation scales are computed at run time; no activation range to learn")
    return wrapped, kinds, undo


def _attach_equalizers(ctx: ModelContext, blocks: nn.ModuleList, wrapped: list[dict[str, QFTLinear]], spec: QuantSpec, undo: list) -> list:
    """One Equalizer per producer of the table with an exact fold; a warning names the groups without one."""
    head_dim = _head_dim(ctx.model)
    params, skipped = [], {}
    for i, block in enumerate(blocks):
        for group in ctx.arch.groups:
            index, problem = channel_index(block, group, head_dim)
            if problem is None and group.feeder in wrapped[i]:
                producer = wrapped[i][group.feeder]
                if producer.eq_out is not None:
                    problem = f"{group.feeder} already feeds another equalized group"
            if problem is not None:
                skipped.setdefault(", ".join(group.linears), problem)
                continue
            feeder, rows = feeder_rows(block, group)
            eq = Equalizer(rows.stop - rows.start, block.get_submodule(group.linears[0]).weight.device)
            params.append(eq.log_e)
            for name in group.linears:
                wrapped[i][name].eq_in = (eq, index.to(eq.log_e.device))
            if group.feeder in wrapped[i]:
                wrapped[i][group.feeder].eq_out = (eq, rows)
            else:
                _fold_into_norm(block.get_submodule(group.feeder), eq, rows, spec, undo)
    for linears, problem in skipped.items():
        log.warning("qft: no equalization for %s (every block): %s", linears, problem)
    ctx.notes["no_equalization"] = {k: v for k, v in skipped.items()}
    return params


def _fold_into_norm(norm: nn.Module, eq: Equalizer, rows: slice, spec: QuantSpec, undo: list) -> None:
    tensors = [n for n in ("weight", "bias") if isinstance(getattr(norm, n, None), nn.Parameter)]
    for name in tensors:
        parametrize.register_parametrization(norm, name, _FoldedNorm(eq, rows, spec))
    undo.append(lambda: [parametrize.remove_parametrizations(norm, n, leave_parametrized=True) for n in tensors])


def _learn_act_ranges(groups: tuple[LinearGroup, ...], blocks: nn.ModuleList, wrapped: list, pow2: bool, undo: list) -> list:
    """One trainable log scale per group of linears reading the same tensor (one quantized input at run time)."""
    return [share_act_range([wrapped[i][n].layer for n in group.linears], pow2, undo) for i in range(len(blocks)) for group in groups]


def share_act_range(layers: list[nn.Module], pow2: bool, undo: list) -> nn.Parameter:
    """One trainable log scale for the static input quantizers of ``layers`` (they read one tensor);
    ``undo`` gets what writes the learned scale back into each layer's plain quantizer."""
    bases = [getattr(layer, activations.ATTR) for layer in layers]
    log_scale = nn.Parameter(bases[0].scale.detach().float().clamp(min=1e-10).log())
    for layer, base in zip(layers, bases):
        delattr(layer, activations.ATTR)
        layer.add_module(activations.ATTR, _LearnedActQuantizer(base, log_scale, pow2))

        def restore(layer: nn.Module = layer, base: activations.ActQuantizer = base) -> None:
            learned = getattr(layer, activations.ATTR)
            with torch.no_grad():
                base.scale.copy_(learned.scale().detach())
            delattr(layer, activations.ATTR)
            layer.add_module(activations.ATTR, base)

        undo.append(restore)
    return log_scale


def _body(blocks: nn.ModuleList, inputs, i: int, ckpt: bool) -> Tensor:
    """The last block's output on calibration batch i (each block recomputed in backward with ``ckpt``)."""
    h, args, kwargs = inputs.hidden[i], inputs.args[i], inputs.kwargs[i]
    for block in blocks:
        if ckpt:
            h = checkpoint(lambda x, b=block: block_output(b(x, *args, **kwargs)), h, use_reentrant=False)
        else:
            h = block_output(block(h, *args, **kwargs))
    return h


def _loss_fn(ctx: ModelContext, opts: QFTOptions) -> Callable[[Tensor, Tensor, int], Tensor]:
    """Distillation loss of the student's and the teacher's last hidden states (B, T, C) on the
    calibration batch held in entry ``j`` of ``ctx.inputs``."""
    model, arch = ctx.model, ctx.arch
    head = model.get_submodule(arch.head) if arch.head else None
    norm = model.get_submodule(arch.final_norm) if arch.final_norm else nn.Identity()
    # Several processes: the relative losses divide by the whole batch's mean square (None: one process)
    with torch.no_grad():
        split = ctx.inputs.split is not None
        pooled = batch_mean_squares([norm(t).float().mean(1) for t in ctx.targets], ctx.inputs) if head is None and split else None
    feature = batch_mean_squares(ctx.targets, ctx.inputs) if opts.feature_weight else None

    def loss(h: Tensor, t: Tensor, j: int) -> Tensor:
        with torch.no_grad():
            t_out = norm(t)
        value = output_loss(head, norm(h), t_out, None if pooled is None else pooled[j])  # KL on logits; encoders: pooled embeddings
        return value + opts.feature_weight * relative_mse(h, t, None if feature is None else feature[j]) if opts.feature_weight else value

    return loss


@torch.no_grad()
def fold(ctx: ModelContext, wrapped: list[dict[str, QFTLinear]], undo: list[Callable]) -> dict[str, LayerResult]:
    """Write every trained DoF into the plain model: what runs afterwards is exactly what trained."""
    arch, blocks, layers = ctx.arch, get_blocks(ctx.model, ctx.arch), {}
    for i, (block, w) in enumerate(zip(blocks, wrapped)):  # 1. grid weights, scales (÷ e on producer rows), biases
        for name, fq in w.items():
            scale, zero = fq.commit()
            prior = ctx.prior.get(f"{arch.blocks}.{i}.{name}")
            layers[f"{arch.blocks}.{i}.{name}"] = LayerResult(scale.cpu(), zero.cpu(), None, prior.error if prior else math.nan)
        swap_out(block, w)
    for fn in undo:  # 2. norms keep weight / e; activation quantizers their learned static scale
        fn()
    for flag in ctx.notes.get("bias_flags", []):  # 3. the config declares the biases the checkpoint now holds
        setattr(ctx.model.config, flag, True)
    return layers


def train_all(
    modules: list[nn.Module],
    kinds: dict[str, list[Tensor]],
    loss_on: Callable[[int], Tensor],
    n: int,
    opts: QFTOptions,
    progress: bool,
    share: Callable[[int], float] | None = None,
) -> TrainLog:
    """One ``finetune.train`` run over items ``0 … n−1`` (the last ``holdout`` share held out), each DoF kind at its own rate
    (``share``: this process's part of each item, under several processes)."""
    n_eval = opts.train.held_out(n)
    items = list(range(n))
    groups = [
        (kinds["scale"], opts.train.lr_scale),
        (kinds["weight"], opts.train.lr_weight),
        (kinds["equalize"], opts.lr_equalize),
        (kinds["bias"], opts.lr_bias),
        (kinds["act"], opts.lr_act),
    ]
    # train() itself warns on a NaN loss or a diverging held-out loss (and keeps the best state)
    return train(modules, loss_on, items[: n - n_eval], items[n - n_eval :], opts.train, progress, groups, label="qft", share=share)


def train_notes(result: TrainLog, kinds: dict[str, list[Tensor]]) -> dict:
    """What the record says of a QFT run: how it stopped, the held-out curve, the trained parameters per kind."""
    return {
        "stopped": result.stopped,
        "steps_run": len(result.losses),
        "held_out_loss": [(s, float(f"{v:.6g}")) for s, v in result.evals],
        "trained": {k: int(sum(p.numel() for p in v)) for k, v in kinds.items()},
    }


def apply(ctx: ModelContext, spec: QuantSpec, opts: QFTOptions) -> dict[str, LayerResult]:
    """Fine-tune every DoF of the whole model jointly; leave it folded on the integer grids."""
    check(opts, spec, ctx.act)
    if activations.has_input_smoothing(ctx.model):
        raise ValueError("qft cannot train through smoothquant fold: quantizer (an extra runtime op); use fold: exact")
    if any(r.g_idx is not None for r in ctx.prior.values()):
        raise ValueError("qft needs contiguous groups: run gptq with static_groups: true (the default)")
    model, arch = ctx.model, ctx.arch
    blocks = get_blocks(model, arch)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    homes = {id(p): p.device for p in model.parameters()}
    model.to(ctx.device)
    wrapped, kinds, undo = _setup(ctx, spec, opts)
    modules = [fq for w in wrapped for fq in w.values()]
    for p in kinds["equalize"] + kinds["act"]:
        p.requires_grad_(True)
    loss_of = _loss_fn(ctx, opts)
    ckpt = opts.checkpointing

    def loss_on(i: int) -> Tensor:  # i: a calibration batch of the run; j: the entry holding it here
        j = ctx.inputs.entry(i)
        h = _body(blocks, ctx.inputs, j, ckpt and torch.is_grad_enabled())
        if ckpt and torch.is_grad_enabled():
            return checkpoint(loss_of, h, ctx.targets[j], j, use_reentrant=False)
        return loss_of(h, ctx.targets[j], j)

    share = ctx.inputs.share if ctx.inputs.split is not None else None
    try:
        result = train_all(modules, kinds, loss_on, ctx.inputs.n_batches, opts, ctx.progress, share)
        layers = fold(ctx, wrapped, undo)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        for p in model.parameters():
            p.data = p.data.to(homes.get(id(p), p.device))
    ctx.train_logs.append((0, result))
    ctx.notes.update(
        hw=hw_preset(opts, spec),
        **train_notes(result, kinds),
    )
    return layers
