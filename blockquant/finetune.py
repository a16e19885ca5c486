"""Fine-tuning machinery shared by the training methods (block-wise FT, and later QFT / LKD).

``FakeQuantLinear`` swaps in for a Linear (or GPT-2 Conv1D, or a convolution / transposed
convolution, seen as its ``(out, in·∏kernel)`` im2col matrix) and makes its quantization
degrees of freedom trainable: per-group step sizes (LSQ-style, Esser et al. 2020), zero points
(rounded with a straight-through estimator) and either the fp32 master weights (STE) or
AdaRound rounding offsets (Nagel et al. 2020, ``h(α) = clamp(σ(α)(ζ−γ)+γ, 0, 1)``).

The fp32 master weights are kept in code units of the initial grid, ``v = w/s₀`` (so a weight
learning rate means the same whatever the scale), the codes are ``⌊v⌉`` and the learned step
size multiplies them: ``ŵ = s·(q − z)``. Plain LSQ (``s·⌊w/s⌉``) gives the step
size the gradient ``⌊w/s⌉ − w/s``, which is zero when the master weights start on the grid
(after GPTQ): it cannot see that changing s rescales every code, and a step along it can
raise the loss where a step along this one lowers it.
``train`` is the one optimisation loop: AdamW, cosine schedule, gradient clipping, early stop
on held-out data keeping the best state, NaN guard. Under several processes (``dist``) each
holds a part of every calibration batch: a step's gradients and every loss it reports or judges
are the sums of the parts, weighted by their share of the batch, so all processes take the same
steps as one process would, up to the order of those sums; with ``TrainConfig.reproducible`` the
steps are taken one sample at a time and summed in fp64, the same whatever the split.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from blockquant import dist
from blockquant.capture import BlockInputs
from blockquant.layers import run_with_weight, set_weight_matrix, weight_matrix
from blockquant.primitives import expand, group_width, round_scale_ste, round_ste
from blockquant.spec import QuantSpec

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid


class FakeQuantLinear(nn.Module):
    """``y = x ŵᵀ + b`` with ``ŵ = s·(clamp(⌊w/s⌉ + z, qmin, qmax) − z)``, all of s, z, w trainable."""

    def __init__(
        self, layer: nn.Module, spec: QuantSpec, scale: Tensor, zero: Tensor, rounding: str = "ste", reference: Tensor | None = None
    ) -> None:
        """``reference``: AdaRound only, the full-precision weight matrix of a layer whose weight an
        earlier step (GPTQ) left on the grid. Each offset then chooses between that code and its
        neighbour towards the FP weight, starting at the code: the start is the earlier step's
        result, and a code may move down as well as up. (Rounding the FP weight afresh would throw
        GPTQ's error compensation away: training would start, and end, well above GPTQ's loss.)"""
        super().__init__()
        w = weight_matrix(layer)  # (out, in) fp32; (out, in·∏kernel) for a convolution
        self.spec, self.rounding, self.layer = spec, rounding, layer
        self.in_features = w.shape[1]
        self.width = group_width(spec, w.shape[1])
        self.scale = nn.Parameter(scale.detach().clone().float().to(w.device))  # (out, G)
        self.register_buffer("scale0", self.scale.detach().clone())  # the grid the codes are read on
        self.zero = nn.Parameter(zero.detach().clone().float().to(w.device), requires_grad=not spec.sym)
        if rounding == "ste":  # master weights in code units: the learning rate means the same at any scale
            self.weight = nn.Parameter(w / self._expand(self.scale0))
        elif rounding == "adaround":
            x = w / self._expand(self.scale0)
            if reference is not None:  # on-grid positions: a hair towards the FP weight picks the neighbour
                on_grid = (x - x.round()).abs() < 1e-3
                toward = torch.where(reference.float().to(w.device) < w, -0.01, 0.01)
                x = torch.where(on_grid, x.round() + toward, x)
            self.register_buffer("w_floor", torch.floor(x))
            rest = (x - torch.floor(x)).clamp(0.01, 0.99)  # so that h(α) starts at w's own position
            self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        else:
            raise ValueError(f"rounding must be 'ste' or 'adaround', got {rounding!r}")

    def _expand(self, p: Tensor) -> Tensor:
        return expand(p, self.in_features, self.width)

    def soft_rounding(self) -> Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def grid_scale(self) -> Tensor:
        """The step sizes in use: the trained fp32 ones rounded (straight-through) to the dtype
        the checkpoint stores scales in, so training sees exactly the grid that ``commit`` exports."""
        return round_scale_ste(self.scale.clamp(min=1e-8), self.spec)

    def grid_zero(self) -> Tensor:
        """The integer zero points in use, kept inside [qmin, qmax]: a trained zero point may drift out,
        and a packed checkpoint can only store codes of the grid."""
        return torch.clamp(round_ste(self.zero), self.spec.qmin, self.spec.qmax)

    def dequantized(self, hard: bool = False) -> Tensor:
        s = self._expand(self.grid_scale())
        z = self._expand(self.grid_zero())
        if self.rounding == "ste":
            codes = round_ste(self.weight)
        else:
            h = (self.alpha >= 0).float() if hard else self.soft_rounding()
            codes = self.w_floor + h
        q = torch.clamp(codes + z, self.spec.qmin, self.spec.qmax)
        return s * (q - z)

    def forward(self, x: Tensor) -> Tensor:
        smoothing = getattr(self.layer, "input_smoothing", None)  # activations.smooth_input's (smoothquant fold: quantizer)
        if smoothing is not None:
            x = x / smoothing.to(x.dtype)
        act_quant = getattr(self.layer, "input_quantizer", None)  # activations.attach's, when the recipe has one
        if act_quant is not None:
            x = act_quant(x)
        w = self.dequantized(hard=not self.training)
        return run_with_weight(self.layer, x, w.to(x.dtype), self.layer.bias)

    def regularizer(self, beta: float) -> Tensor:
        """AdaRound's push of every h towards 0 or 1; zero for STE weights."""
        if self.rounding != "adaround":
            return self.scale.new_zeros(())
        return torch.sum(1 - (2 * self.soft_rounding() - 1).abs().pow(beta))

    @torch.no_grad()
    def commit(self) -> tuple[Tensor, Tensor]:
        """Write the hard-rounded weight into the wrapped layer (exactly on the grid); its (scale, zero)."""
        set_weight_matrix(self.layer, self.dequantized(hard=True))
        return self.grid_scale().detach().clone(), self.grid_zero().detach().clone()


def swap_in(block: nn.Module, names: list[str], make: Callable[[str, nn.Module], FakeQuantLinear]) -> dict[str, FakeQuantLinear]:
    """Replace the named linears of ``block`` by fake-quant wrappers (undo with ``swap_out``)."""
    wrapped = {}
    for name in names:
        wrapped[name] = make(name, block.get_submodule(name))
        block.set_submodule(name, wrapped[name])
    return wrapped


def swap_out(block: nn.Module, wrapped: dict[str, FakeQuantLinear]) -> None:
    for name, fq in wrapped.items():
        block.set_submodule(name, fq.layer)


def relative_mse(pred: Tensor, target: Tensor, mean_square: Tensor | None = None) -> Tensor:
    """MSE relative to the target's mean square (in fp32): comparable across layers and models.

    ``mean_square``: the target's mean square over the whole batch, where this process holds a
    part of it (``batch_mean_squares``); the loss is then a mean over the part's elements, which
    the parts' shares add up to the whole batch's loss.
    """
    pred, target = pred.float(), target.float()
    den = target.pow(2).mean() if mean_square is None else mean_square
    return F.mse_loss(pred, target) / den.clamp(min=1e-12)


def batch_mean_squares(values: list[Tensor], inputs: BlockInputs, per_sample: bool = False) -> list[Tensor] | None:
    """The mean square of each batch's ``values`` (one tensor per entry of ``inputs``), over every
    process's part of the batch; None with one process (``relative_mse`` then takes its own).
    ``per_sample``: each sample's sum taken alone and the sums added in fp64 (also with one process),
    so that the result does not depend on how the batch is split (``TrainConfig.reproducible``)."""
    if not per_sample and (inputs.split is None or dist.world_size() == 1):
        return None
    sums = torch.zeros(inputs.n_batches, 2, dtype=torch.float64)
    batches = range(len(values)) if inputs.split is None else inputs.split.batches
    for b, v in zip(batches, values):
        parts = [v[r] for r in range(v.shape[0])] if per_sample else [v]
        sums[b, 0] = sum(float(x.float().pow(2).sum()) for x in parts)
        sums[b, 1] = v.numel()
    dist.all_reduce_sum(sums)
    return [(sums[b, 0] / sums[b, 1].clamp(min=1)).float().to(v.device) for b, v in zip(batches, values)]


def output_loss(head: nn.Module | None, pred: Tensor, target: Tensor, mean_square: Tensor | None = None) -> Tensor:
    """Distillation loss at a model's output, given the final normalised hidden states (B, T, C).

    Language models: KL(p_fp ‖ p_q) per token through the LM head. Encoders (no head): the
    MSE of the mean-pooled embeddings relative to their mean square, since a sentence embedding
    is what an encoder's user compares (calibration samples are full, unpadded windows, so
    the mean runs over real tokens only). ``mean_square``: that of the pooled target over the
    whole batch (``relative_mse``).
    """
    if head is None:
        return relative_mse(pred.float().mean(1), target.float().mean(1), mean_square)
    with torch.no_grad():
        t = head(target).float().log_softmax(-1).flatten(0, -2)
    p = head(pred).float().log_softmax(-1).flatten(0, -2)
    return F.kl_div(p, t, log_target=True, reduction="batchmean")


@dataclass(frozen=True)
class TrainConfig:
    """The one training loop's settings (``train``), nested as ``train`` in every fine-tuning
    method's options; each method gives its own defaults (``blockft``, ``lkd``, ``qft``)."""

    steps: int = 200  # optimizer steps (per window for blockft and lkd)
    lr_scale: float = 1e-3  # step sizes and zero points (blockft and lkd: relative to the window's mean step size)
    lr_weight: float = 2e-2  # master weights, in code units of the initial grid (AdaRound: offsets)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    holdout: float = 0.1  # share of calibration batches held out for early stopping
    eval_every: int = 25
    patience: int = 4  # evaluations in the annealing part of the schedule without a new best of that part, before stopping
    settle: float = 0.5  # share of the steps before which no evaluation counts towards patience (see ``train``)
    # Calibration batches per optimizer step (their gradients summed, one backward each, so memory stays one
    # batch's). A sentence encoder's paragraph batches hold ~200 tokens and one pooled embedding per paragraph:
    # an end-to-end pooled loss on ~6 embeddings is a noisy gradient, which more batches per step average.
    accumulate: int = 1
    diverge: float | None = None  # stop when a held-out loss exceeds this multiple of the initial one (None: off)
    reg_weight: float = 0.01  # AdaRound regulariser λ
    # Adam's ε, far below any gradient a calibration loss gives: a step then moves a parameter by about its
    # learning rate whatever the scale of the model's activations. torch's 1e-8 is not: weight gradients of a
    # small LLM's blocks are of that order, so it would shorten their steps, and a wider model's smaller ones more.
    adam_eps: float = 1e-15
    # "bfloat16" / "float16": the training and held-out forwards (and so the backwards) under torch.autocast in that
    # dtype — the matmuls and attention in half precision (GPU tensor cores; CPUs with bf16 instructions), the
    # parameters, the fake-quantization, the optimizer and the losses in fp32. None: fp32 throughout.
    autocast: str | None = None
    # True: each step's batches run one sample at a time (batches of one), every sample's gradient added in fp64 in
    # sample order, the losses judged likewise. The steps then do not depend on how a batch is split over processes
    # (torchrun): two processes train what one does, to the fp32 rounding of fp64 sums, where summing fp32
    # gradients of batch parts drifts apart over a run's thousands of steps. Batch-1 forwards cost time.
    reproducible: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"fine-tuning steps must be >= 1, got {self.steps}")
        if self.lr_scale <= 0 or self.lr_weight <= 0:
            raise ValueError(f"learning rates must be > 0, got lr_scale={self.lr_scale}, lr_weight={self.lr_weight}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.accumulate < 1:
            raise ValueError(f"accumulate (calibration batches per step) must be >= 1, got {self.accumulate}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be in [0, 1) (a share of the calibration batches), got {self.holdout}")
        if self.diverge is not None and self.diverge <= 1:
            raise ValueError(f"diverge must be > 1 (a multiple of the initial held-out loss) or null, got {self.diverge}")
        if self.adam_eps <= 0:
            raise ValueError(f"adam_eps must be > 0, got {self.adam_eps}")
        if not 0 <= self.settle < 1:
            raise ValueError(f"settle must be in [0, 1) (a share of the steps), got {self.settle}")
        if self.autocast not in (None, "bfloat16", "float16"):
            raise ValueError(f"autocast must be bfloat16, float16 or null, got {self.autocast!r}")

    def held_out(self, n: int) -> int:
        """How many of ``n`` training items early stopping holds out (none when there are fewer than 2)."""
        return max(1, round(self.holdout * n)) if self.holdout > 0 and n >= 2 else 0


@dataclass(frozen=True)
class PerSample:
    """A training loss one calibration sample at a time (``TrainConfig.reproducible``)."""

    # (batch, r) -> the loss of this process's r-th sample of the batch alone, normalised as a mean over that sample:
    # the batch's loss is the mean of its samples' losses
    loss: Callable[[int, int], Tensor]
    # batch -> (samples of it this process holds, samples of the whole batch)
    rows: Callable[[int], tuple[int, int]]


@dataclass
class TrainLog:
    losses: list[float] = field(default_factory=list)  # training loss per step
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss)
    best: float = math.inf
    stopped: str = "steps"  # "steps", "early", "nan" or "diverged"


def _snapshot(params: list[Tensor]) -> list[Tensor]:
    return [p.detach().clone() for p in params]


def mean_loss(
    loss_on: Callable[[int], Tensor], items: list[int], share: Callable[[int], float] | None = None, per_sample: PerSample | None = None
) -> float:
    """The mean over ``items`` of each calibration batch's loss (no gradient is taken).

    ``share(item)``: the part of the batch this process holds, under several processes; a
    batch's loss is then the sum over the processes of each part's loss times its share.
    ``per_sample``: each batch's loss as the mean of its samples' losses, added in fp64.
    """
    if per_sample is not None:
        local = 0.0
        for i in items:
            held, total = per_sample.rows(i)
            local += sum(float(per_sample.loss(i, r)) for r in range(held)) / total
        return dist.total(local) / len(items)
    if share is None:
        return sum(float(loss_on(i)) for i in items) / len(items)
    local = sum(share(i) * float(loss_on(i)) for i in items if share(i) > 0)
    return dist.total(local) / len(items)


def _sum_over_processes(params: list[Tensor], grads: list[Tensor | None], loss: Tensor, dtype: torch.dtype) -> Tensor:
    """Add up every process's gradients ``grads`` and step loss in ``dtype`` (one all-reduce), set them
    as the parameters' gradients; returns the summed loss (as it is with one process).

    A parameter keeps no gradient only where no process gave it one, as in one process (AdamW
    skips it then; a zero gradient would still move it).
    """
    device = params[0].device
    flags = torch.tensor([float(g is not None) for g in grads], device=device, dtype=dtype)
    flat = [(g if g is not None else torch.zeros_like(p)).reshape(-1).to(device, dtype) for p, g in zip(params, grads)]
    buf = dist.all_reduce_sum(torch.cat([flags, loss.detach().reshape(1).to(device, dtype), *flat]))
    at = len(params) + 1
    for p, has in zip(params, buf[: len(params)].tolist()):
        g = buf[at : at + p.numel()].view(p.shape).to(p.dtype)
        at += p.numel()
        p.grad = g.to(p.device).clone() if has else None
    return buf[len(params)]


def _batch_gradients(
    params: list[Tensor], loss_on: Callable[[int], Tensor], items: list[int], share: Callable[[int], float] | None
) -> Tensor:
    """A step's gradient over batches ``items`` (of their mean loss), one backward per batch so that
    the graph of only one batch is alive at a time; under several processes each process's part
    weighted by its share and the parts summed. Returns the step's loss."""
    parts = []
    for item in items:
        if share is None:
            part = loss_on(item) / len(items)
        elif share(item) > 0:
            part = loss_on(item) * (share(item) / len(items))
        else:
            continue
        part.backward()
        parts.append(part.detach())
    local = torch.stack(parts).sum() if parts else torch.zeros(())
    return local if share is None else _sum_over_processes(params, [p.grad for p in params], local, torch.float32)


def _sample_gradients(params: list[Tensor], per_sample: PerSample, items: list[int]) -> tuple[list[Tensor | None], Tensor]:
    """This process's share of a step's gradient over batches ``items``, one backward per sample,
    the gradients weighted by 1 / (batch samples × batches) and added in fp64 in sample order;
    with the step's loss (fp64)."""
    sums: list[Tensor | None] = [None] * len(params)
    loss = torch.zeros((), dtype=torch.float64, device=params[0].device)  # on the device: no sync per sample
    for item in items:
        held, total = per_sample.rows(item)
        weight = 1.0 / (total * len(items))
        for r in range(held):
            value = per_sample.loss(item, r)
            value.backward()
            loss += value.detach().double() * weight
            for k, p in enumerate(params):
                if p.grad is not None:
                    if sums[k] is None:
                        sums[k] = torch.zeros_like(p, dtype=torch.float64)
                    sums[k].add_(p.grad, alpha=weight)  # fp32 gradient added in fp64
                    p.grad = None
    return sums, loss


def default_groups(modules: list[FakeQuantLinear], cfg: TrainConfig) -> list[tuple[list[Tensor], float]]:
    """(parameters, learning rate): the modules' step sizes and zero points at ``cfg.lr_scale``,
    their weights (STE) or rounding offsets (AdaRound) at ``cfg.lr_weight``."""
    scales = [p for m in modules for p in (m.scale, m.zero) if p.requires_grad]
    weights = [m.weight if m.rounding == "ste" else m.alpha for m in modules]
    return [(scales, cfg.lr_scale), (weights, cfg.lr_weight)]


def _under(context: Callable[[], Any], fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``fn`` run inside a fresh ``context()`` each call; its result in fp32."""

    def wrapped(*args: int) -> Tensor:
        with context():
            out = fn(*args)
        return out.float()

    return wrapped


def train(
    modules: list[FakeQuantLinear],
    loss_on: Callable[[int], Tensor],
    train_items: list[int],
    eval_items: list[int],
    cfg: TrainConfig,
    progress: bool = True,
    groups: list[tuple[list[Tensor], float]] | None = None,
    penalty: Callable[[], Tensor] | None = None,
    label: str = "train",
    share: Callable[[int], float] | None = None,
    per_sample: PerSample | None = None,
) -> TrainLog:
    """Minimise ``loss_on(item)`` over ``train_items``; keep the state best on ``eval_items``.

    Items are indices of calibration batches. Without held-out items the final state is kept.
    Early stopping judges only the annealing part of the schedule (after ``cfg.settle`` of the
    steps): it stops when the held-out loss has not fallen below its best *of that part* for
    ``cfg.patience`` evaluations. While the cosine rate is high the held-out loss plateaus or
    wanders (weights hop between grid points) and only falls as the rate anneals, so a patience
    counted from the start, or against the best of the whole run, stops before that fall. The best
    held-out state of the whole run is kept either way.
    ``groups`` — (parameters, learning rate) — replaces ``default_groups`` (QFT and block-wise FT
    with float parameters train more kinds of tensors, some shared by several modules).
    ``penalty()`` is added to the training loss only: early stopping judges the data loss.
    ``label`` names the run in the progress bar and in warnings.
    ``share(item)``, under several processes: the part of batch ``item`` this process holds
    (0: none; ``loss_on`` is then not called for it). The loss functions are means over a batch's
    samples (or ``relative_mse`` with the batch's ``mean_square``), so the parts' losses weighted
    by their shares add up to the batch's: each step sums those gradients over the processes before
    clipping, and the regulariser and ``penalty`` (the same on every process) are added once after.
    ``per_sample``: the loss one sample at a time, which ``cfg.reproducible`` trains on (a loss
    that cannot be cut per sample refuses that setting).
    """
    if cfg.reproducible and per_sample is None:
        raise ValueError(f"{label}: train.reproducible needs a loss taken one sample at a time, which this method does not provide")
    if not cfg.reproducible:
        per_sample = None
    if groups is None:
        groups = default_groups(modules, cfg)
    groups = [(ps, lr) for ps, lr in groups if ps]
    params = [p for ps, _ in groups for p in ps]
    if cfg.autocast is not None:
        amp = functools.partial(torch.autocast, params[0].device.type, getattr(torch, cfg.autocast))
        loss_on = _under(amp, loss_on)
        if per_sample is not None:
            per_sample = PerSample(_under(amp, per_sample.loss), per_sample.rows)
    opt = torch.optim.AdamW([{"params": ps, "lr": lr} for ps, lr in groups], weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    result, best_state, stale, annealing_best = TrainLog(), _snapshot(params), 0, math.inf

    def held_out() -> float:
        for m in modules:
            m.eval()
        with torch.no_grad():
            value = mean_loss(loss_on, eval_items, share, per_sample)
        for m in modules:
            m.train()
        return value

    for m in modules:
        m.train()
    if eval_items:
        result.best = held_out()
        result.evals.append((0, result.best))
    bar = tqdm(range(1, cfg.steps + 1), desc=label, unit="step", leave=False, disable=not progress)
    for step in bar:
        beta = 20 - 18 * step / cfg.steps  # AdaRound's annealing 20 → 2
        with torch.enable_grad():
            opt.zero_grad(set_to_none=True)
            batches = [train_items[((step - 1) * cfg.accumulate + k) % len(train_items)] for k in range(cfg.accumulate)]
            if per_sample is not None:
                sums, local = _sample_gradients(params, per_sample, batches)
                loss = _sum_over_processes(params, sums, local, torch.float64).float()
            else:
                loss = _batch_gradients(params, loss_on, batches, share)
            reg = sum(m.regularizer(beta) for m in modules) * cfg.reg_weight if modules[0].rounding == "adaround" else 0.0
            if penalty is not None:
                reg = reg + penalty()
            if torch.is_tensor(reg) and reg.requires_grad:
                reg.backward()
        if not torch.isfinite(loss):
            result.stopped = "nan"
            log.warning("%s: the loss became NaN/Inf at step %d; restored the best state", label, step)
            break
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        result.losses.append(float(loss.detach()))
        if eval_items and (step % cfg.eval_every == 0 or step == cfg.steps):
            value = held_out()
            result.evals.append((step, value))
            if not math.isfinite(value) or (cfg.diverge is not None and value > cfg.diverge * result.evals[0][1]):
                result.stopped = "diverged"
                log.warning(
                    "%s: the held-out loss diverged at step %d (%.3e, best %.3e); restored the best state",
                    label,
                    step,
                    value,
                    result.best,
                )
                break
            if value < result.best:
                result.best, best_state = value, _snapshot(params)
            if step > cfg.settle * cfg.steps:  # the annealing part: is the held-out loss still falling?
                stale = 0 if value < annealing_best else stale + 1
                annealing_best = min(annealing_best, value)
                if stale >= cfg.patience:
                    result.stopped = "early"
                    break
            bar.set_postfix(loss=f"{float(loss.detach()):.3e}", held_out=f"{value:.3e}")
    if eval_items or result.stopped in ("nan", "diverged"):
        with torch.no_grad():
            for p, saved in zip(params, best_state):
                p.copy_(saved)
    return result
