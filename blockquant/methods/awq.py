"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration", §3.2): protect the input channels that carry large activations by scaling them up
before quantization and folding the inverse scale into the layer that produces them.

Per group of linears sharing an input x (the architecture table's groups with an exact feeder):
``s = mean|x|^α / sqrt(max · min)`` (eq. 5 with the reference's normalisation), α on the grid
{0, 1/n, …, (n−1)/n}, chosen to minimise ``Σ_L ‖Q(W_L·diag(s))·(diag(s)⁻¹x) − W_L x‖²`` over a
sample of calibration tokens — the output error of the group's linears (the reference measures the
enclosing attention / MLP module; the group's own outputs need no per-model code). ``s⁻¹`` is
folded into the feeder (``fold.fold_scales``: exact). Then, per linear, a clip search: the
per-group range shrink (n points down to ``1 − max_shrink``) minimising each group's output error.
α = 0 is plain min–max RTN, so the search never does worse than RTN on its objective.

Chained before ``gptq`` or ``blockft`` (``awq,gptq``), AWQ leaves its scaled weights in full
precision and passes the searched grid on (blockft starts from it; GPTQ runs its own range search);
last, it rounds. It does not clamp the weights it hands on: the clipped-away part would be lost to
the next step's error compensation (clamping here leaves awq,gptq with block output errors above
GPTQ's alone).

Under several processes each holds the rows of the token sample that fall among its own tokens;
the searches add their errors up over the processes, so every process chooses the same α and
ranges as one process would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from blockquant import dist
from blockquant.capture import BlockContext, LayerResult, collect_input_stats, relative_error
from blockquant.fold import fold_problem, fold_scales
from blockquant.layers import set_weight_matrix, weight_matrix
from blockquant.primitives import compute_qparams, fake_quantize, group_width, n_groups
from blockquant.spec import QuantSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AWQOptions:
    grid: int = 20  # α ∈ {0, 1/grid, …, (grid − 1)/grid}
    clip: bool = True  # per-group range search after scaling
    clip_grid: int = 20  # shrink steps of 1/clip_grid ...
    max_shrink: float = 0.5  # ... down to a range of 1 − max_shrink
    search_tokens: int = 4096  # calibration tokens sampled for the scale search
    clip_tokens: int = 1024  # of those, used by the clip search

    def __post_init__(self) -> None:
        if self.grid < 1 or self.clip_grid < 1:
            raise ValueError(f"awq grid and clip_grid must be >= 1, got {self.grid}, {self.clip_grid}")
        if not 0 < self.max_shrink < 1:
            raise ValueError(f"awq max_shrink must be in (0, 1), e.g. 0.5, got {self.max_shrink}")
        if self.search_tokens < 1 or self.clip_tokens < 1:
            raise ValueError(f"awq search_tokens and clip_tokens must be >= 1, got {self.search_tokens}, {self.clip_tokens}")


def awq_scales(absmean: Tensor, alpha: float) -> Tensor:
    """``s = mean|x|^α``, normalised by ``sqrt(max s · min s)`` (C,)."""
    s = absmean.float().clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scales(ws: list[Tensor], x: Tensor, absmean: Tensor, spec: QuantSpec, grid: int = 20) -> tuple[Tensor, float]:
    """The scales (C,) and α minimising the group's output error on token sample ``x`` (n, C)
    (under several processes: on every process's rows together)."""
    targets = [x @ w.t() for w in ws]  # (n, out) per linear
    candidates, errors = [], []
    for i in range(grid):
        alpha = i / grid
        s = awq_scales(absmean, alpha)
        xs = x / s
        err = 0.0
        for w, y in zip(ws, targets):
            ws_ = w * s
            w_hat = fake_quantize(ws_, *compute_qparams(ws_, spec), spec)
            err += float(torch.sum((xs @ w_hat.t() - y) ** 2))
        candidates.append((s, alpha))
        errors.append(err)
    if dist.world_size() > 1:
        errors = dist.all_reduce_sum(torch.tensor(errors, dtype=torch.float64)).tolist()
    best, best_err = (torch.ones_like(absmean), 0.0), float("inf")
    for candidate, err in zip(candidates, errors):
        if err < best_err:
            best, best_err = candidate, err
    return best


def _grouped(t: Tensor, spec: QuantSpec) -> Tensor:
    """``(r, in)`` → ``(r, G, g)``, the ragged last group zero-padded."""
    rows, cols = t.shape
    g = group_width(spec, cols)
    pad = n_groups(spec, cols) * g - cols
    return torch.cat([t, t.new_zeros(rows, pad)], 1).reshape(rows, -1, g)


@torch.no_grad()
def clip_ranges(w: Tensor, x: Tensor, spec: QuantSpec, grid: int = 20, max_shrink: float = 0.5) -> tuple[Tensor, Tensor]:
    """Per-group (scale, zero) whose shrunk range minimises each group's output error on ``x``.

    Error of group j of output row o: ``mean_t (Σ_{c∈j} (ŵ − w)[o, c] · x[t, c])²`` (under
    several processes, over every process's rows of the sample).
    """
    if spec.per_tensor:
        return compute_qparams(w, spec)
    several = dist.world_size() > 1
    rows = dist.total(x.shape[0]) if several else x.shape[0]
    xg = _grouped(x, spec)  # (n, G, g)
    best_err = best_scale = best_zero = None
    for i in range(int(max_shrink * grid)):
        scale, zero = compute_qparams(w, spec, 1 - i / grid)
        dg = _grouped(fake_quantize(w, scale, zero, spec) - w, spec)  # (out, G, g)
        err = torch.einsum("ogc,ngc->ogn", dg, xg).pow(2)  # (out, G, n)
        err = dist.all_reduce_sum(err.sum(-1)) / max(rows, 1) if several else err.mean(-1)  # (out, G)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _sample_hessian(x: Tensor) -> Tensor:
    """``2 xᵀx / n`` of the token sample (n, C), over every process's rows."""
    if dist.world_size() == 1:
        return 2 * x.t() @ x / x.shape[0]
    return dist.all_reduce_sum(2 * x.t() @ x) / max(dist.total(x.shape[0]), 1)


@torch.no_grad()
def apply(block: nn.Module, ctx: BlockContext, spec: QuantSpec, opts: AWQOptions) -> dict[str, LayerResult]:
    firsts = {g.linears[0]: ctx.linear(block, g.linears[0]) for g in ctx.groups}
    stats = collect_input_stats(block, ctx.inputs, firsts, max_tokens=opts.search_tokens)
    samples = {name: st.sample for name, st in stats.items()}  # (n, C), divided by s as scales fold
    positions = {name: st.positions for name, st in stats.items()}  # several processes: each row's place in the whole sample
    # 1. per group: search α, fold s⁻¹ into the feeder (the block's FP function is unchanged)
    for group in ctx.groups:
        first = group.linears[0]
        problem = fold_problem(block, group)
        if problem is not None:  # warned once: every block has the same groups
            if ctx.index == 0:
                log.warning("awq: %s not scaled in any block: %s", ", ".join(group.linears), problem)
            continue
        ws = [weight_matrix(ctx.linear(block, n)) for n in group.linears]
        s, alpha = search_scales(ws, samples[first], stats[first].absmean, spec, opts.grid)
        fold_scales(block, group, s)
        samples[first] = samples[first] / s
        log.info("awq block %d: %s α = %.2f", ctx.index, group.linears, alpha)
    # 2. per linear: clip search, then round (last step) or hand the scaled weights and the grid on
    results = {}
    for group in ctx.groups:
        x, at = samples[group.linears[0]], positions[group.linears[0]]
        h = _sample_hessian(x)  # (C, C): the sample's Hessian, for the error record
        clip_rows = x[: opts.clip_tokens] if at is None else x[(at < opts.clip_tokens).to(x.device)]  # the sample's first rows
        for name in group.linears:
            layer = ctx.linear(block, name)
            w = weight_matrix(layer)
            if opts.clip:
                scale, zero = clip_ranges(w, clip_rows, spec, opts.clip_grid, opts.max_shrink)
            else:
                scale, zero = compute_qparams(w, spec)
            w_hat = fake_quantize(w, scale, zero, spec)
            if ctx.final:
                set_weight_matrix(layer, w_hat)
            results[name] = LayerResult(scale.cpu(), zero.cpu(), None, relative_error(w, w_hat, h))
    return results
