"""EfficientQ (Zhang & Chung, "EfficientQ: An efficient and accurate post-training neural
network quantization method for medical image segmentation", MedIA 2024), DESIGN.md §3.

Per layer, with ``X`` its input on the already-quantized network and ``Y`` the full-precision
layer's output, solve ``min ‖A ⊙ (conv(X, W) + b − Y)‖² + η‖W − W₀‖²`` with ``W`` on the
quantization grid by ADMM over the im2col rows (weighted by ``A²``, centred so the bias is
solved jointly as ``b = ȳ − W x̄``):

1. ``W = (C + ρ(G − U) + ηW₀)(H + (ρ + η)I)⁻¹``   (closed-form least squares, fp32 Gram ``H``)
2. ``G = Π(W + U)``: alternate the scale ``a = ⟨q, w⟩/⟨q, q⟩`` and the integer levels ``q``
3. ``U += W − G``; ρ starts at ``10·r`` (r = mean diagonal of H) and doubles every 50 steps;
   the G with the lowest objective is kept (the round-to-nearest point included).

Self-adaptive attention: ``A`` weights every output voxel by the rarity of its class in the
full-precision network's own prediction, ``(max_count / count_c)^0.5``, average-pooled to
each layer's output resolution, so that tumour voxels are not drowned by background.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blockquant.convnet import layer_stats
from blockquant.layers import weight_matrix
from blockquant.primitives import compute_qparams, dequantize, quantize, round_scale
from blockquant.spec import QuantSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ADMMOptions:
    iters: int = 200
    rho: float = 10.0  # ρ₀ = rho · r, r = mean diagonal of the layer's (weighted, centred) Gram matrix
    rho_every: int = 50  # ρ doubles every this many iterations (the scaled dual U halves)
    eta: float = 0.1  # weight regulariser η = eta · r, pulling W towards the full-precision W₀; 0 = off
    attention: bool = True  # self-adaptive attention A; False = every output voxel weighs the same
    proj_iters: int = 3  # scale / integer-level alternations per projection
    check_every: int = 5  # iterations between evaluations of the objective (keep the best G)
    max_positions: int = 65536  # output positions (seeded uniform sample) in the Gram matrix

    def __post_init__(self) -> None:
        if self.iters < 1 or self.rho_every < 1 or self.proj_iters < 1 or self.check_every < 1:
            raise ValueError("admm iters, rho_every, proj_iters and check_every must be >= 1")
        if self.rho <= 0:
            raise ValueError(f"admm rho must be > 0 (ρ₀ = rho · mean diag of the Gram matrix), got {self.rho}")
        if self.eta < 0:
            raise ValueError(f"admm eta must be >= 0 (0 turns the weight regulariser off), got {self.eta}")
        if self.max_positions < 1:
            raise ValueError(f"admm max_positions must be >= 1, got {self.max_positions}")


# ---------------------------------------------------------------- self-adaptive attention


def attention_map(pred: Tensor, num_classes: int) -> Tensor:
    """Per-voxel weights ``(max_count / count_c)^0.5`` of predicted labels ``(B, *S)``; mean 1."""
    counts = torch.bincount(pred.reshape(-1).long(), minlength=num_classes).double()  # (classes,)
    present = counts > 0
    weight = torch.zeros_like(counts)
    weight[present] = (counts.max() / counts[present]).sqrt()
    a = weight[pred.long()]
    return (a / a.mean()).float()


def pool_attention(a: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Attention ``(B, *S)`` average-pooled to a layer's output resolution ``(B, *shape)``."""
    if tuple(a.shape[1:]) == tuple(shape):
        return a
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(shape)]
    return pool(a[:, None].float(), tuple(shape))[:, 0]


# ---------------------------------------------------------------- projection onto the grid


def _sums(t: Tensor, spec: QuantSpec) -> Tensor:
    """Sum over each scale's elements: per row ``(out, 1)``, per tensor ``(1, 1)``."""
    return t.sum().reshape(1, 1) if spec.per_tensor else t.sum(1, keepdim=True)


def project(v: Tensor, spec: QuantSpec, scale: Tensor, zero: Tensor, iters: int = 3) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest grid point to ``v`` (out, K): alternate integer levels and the scale fit.

    Given levels ``q``, the best scale is ``a = ⟨q − z, v⟩ / ⟨q − z, q − z⟩`` (asymmetric grids
    first fit ``v ≈ a·q + c`` and round the zero point ``z = −c/a``). Starts from (scale, zero)
    — ``(out, 1)`` per channel, ``(1, 1)`` per tensor — and keeps, per scale, the best of the
    starting point and every alternation.
    """
    if not spec.per_tensor and spec.group_size != -1:
        raise ValueError("admm quantizes per output channel (group_size -1) or per tensor")
    v = v.float()
    n = v.numel() if spec.per_tensor else v.shape[1]

    def levels(s: Tensor, z: Tensor) -> Tensor:
        return torch.clamp(torch.round(v / s) + z, spec.qmin, spec.qmax)

    best_s, best_z = scale.clone(), zero.clone()
    best_g = best_s * (levels(best_s, best_z) - best_z)
    best_err = _sums((best_g - v) ** 2, spec)
    s, z = best_s, best_z
    for _ in range(iters):
        q = levels(s, z)
        if not spec.sym:  # least-squares line v ≈ a·q + c, then an integer zero point
            qm, vm = _sums(q, spec) / n, _sums(v, spec) / n
            var = _sums((q - qm) ** 2, spec)
            a = _sums((q - qm) * (v - vm), spec) / var.clamp(min=1e-12)
            ok = (var > 0) & (a > 0)
            z = torch.where(ok, torch.round(qm - vm / a.clamp(min=1e-12)).clamp(spec.qmin, spec.qmax), z)
        qz = q - z
        den = _sums(qz * qz, spec)
        a = _sums(qz * v, spec) / den.clamp(min=1e-12)
        s = round_scale(torch.where((den > 0) & (a > 0), a, s).clamp(min=1e-10), spec)
        g = s * (levels(s, z) - z)
        err = _sums((g - v) ** 2, spec)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        best_g = torch.where(better, g, best_g)
    return best_g, best_s, best_z


# ---------------------------------------------------------------- ADMM


@dataclass
class ADMMResult:
    weight: Tensor  # (out, K) on the grid
    scale: Tensor
    zero: Tensor
    objective: float  # relative: f(G) / ‖A⊙(Y − ȳ)‖², with the η term
    rtn_objective: float  # the same for round-to-nearest (min–max), the starting point
    best_iteration: int  # 0 = the starting point was never beaten


def _factor(h: Tensor, diag: float) -> Tensor:
    """Cholesky factor of ``H + diag·I`` (with a small jitter if fp32 needs one).

    Each W-update is then two triangular solves: on this CPU, forming the inverse
    (``cholesky_inverse``: 40 s for K = 5184) costs more than all 50 solves of a ρ stage.
    """
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for jitter in (0.0, 1e-6, 1e-4, 1e-2):
        chol, info = torch.linalg.cholesky_ex(h + (diag + jitter * float(h.diagonal().abs().mean())) * eye)
        if info == 0:
            return chol
    raise ValueError(
        "admm: the layer's Gram matrix is not positive definite even with jitter: its input does not vary over the "
        "calibration positions (too few output positions, or a constant input); calibrate on a larger crop"
    )


@torch.no_grad()
def admm(w0: Tensor, gram: Tensor, cross: Tensor, y_sq: float, spec: QuantSpec, opts: ADMMOptions | None = None) -> ADMMResult:
    """EfficientQ's ADMM for one layer: ``min_G tr(G H Gᵀ) − 2 tr(G C) + η‖G − W₀‖²`` on the grid.

    ``w0`` (out, K) full-precision weights, ``gram`` H (K, K) and ``cross`` C (K, out) the
    (weighted, centred) im2col statistics, ``y_sq`` the matching ``‖Y‖²`` (for relative values).
    """
    opts = opts or ADMMOptions()
    w0, h, c = w0.float(), gram.float(), cross.float()
    k = w0.shape[1]
    r = max(float(torch.trace(h)) / k, 1e-12)
    eta, rho = opts.eta * r, opts.rho * r
    y_sq = max(y_sq, 1e-30)

    def objective(g: Tensor) -> float:
        f = torch.sum((g @ h) * g) - 2 * torch.sum(g * c.t()) + y_sq + eta * torch.sum((g - w0) ** 2)
        return float(f) / y_sq

    scale, zero = compute_qparams(w0, spec)
    g = dequantize(quantize(w0, scale, zero, spec), scale, zero, spec)  # round-to-nearest
    rtn = best = objective(g)
    best_g, best_s, best_z, best_it = g, scale, zero, 0
    g, scale, zero = project(w0, spec, scale, zero, opts.proj_iters)
    u = torch.zeros_like(w0)
    fixed = c.t() + eta * w0  # (out, K)
    for it in range(opts.iters):
        if it % opts.rho_every == 0:
            if it:
                rho, u = 2 * rho, u / 2  # scaled dual U = λ/ρ
            chol = _factor(h, rho + eta)
        w = torch.cholesky_solve((fixed + rho * (g - u)).t(), chol).t()  # 1. least squares
        g, scale, zero = project(w + u, spec, scale, zero, opts.proj_iters)  # 2. projection
        u += w - g  # 3. dual update
        if (it + 1) % opts.check_every == 0 or it == opts.iters - 1:
            f = objective(g)
            if f < best:
                best, best_g, best_s, best_z, best_it = f, g.clone(), scale.clone(), zero.clone(), it + 1
    return ADMMResult(best_g, best_s, best_z, best, rtn, best_it)


def apply_conv(layer: nn.Module, x: Tensor, y: Tensor, attention: Tensor | None, spec: QuantSpec, opts: ADMMOptions, seed: int = 0):
    """ADMM on one conv/linear layer; returns (Ŵ (out, K), scale, zero, new bias or None, info)."""

    weight = None
    if opts.attention and attention is not None and not isinstance(layer, nn.Linear):
        weight = pool_attention(attention, tuple(y.shape[2:])) ** 2  # residuals are multiplied by A: A² in the Gram
    stats = layer_stats(layer, x, y, weight, opts.max_positions, seed)
    if layer.bias is not None and stats.rows < 2:
        raise ValueError(
            f"admm: {stats.rows} output position(s), too few to fit a weight and a bias per channel; calibrate on a larger crop"
        )
    if layer.bias is not None:
        gram, cross = stats.centred()
        y_sq = stats.centred_y_sq()
    else:
        gram, cross, y_sq = stats.gram, stats.cross, stats.y_sq
    res = admm(weight_matrix(layer), gram, cross, y_sq, spec, opts)
    bias = None if layer.bias is None else stats.y_mean - res.weight @ stats.x_mean
    info = {
        "objective": res.objective,
        "rtn_objective": res.rtn_objective,
        "best_iteration": res.best_iteration,
        "positions": stats.rows,
        "of_positions": stats.total,
    }
    return res.weight, res.scale, res.zero, bias, info
