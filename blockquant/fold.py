"""Exact per-channel scale folding between a feeder and the linears it feeds (AWQ, SmoothQuant).

For a group of the architecture table with feeder F (a norm or a linear) and linears L that
read F's output x: ``L(x) = W x = (W·diag(s)) (diag(s)⁻¹ x)``. Dividing F's output channels by
``s`` (a norm's weight and bias, a linear's rows and bias) and multiplying the linears' input
columns by ``s`` leaves the block's full-precision function unchanged. It stays exact through
the attention mix (v → o: per-channel, the same for every token) and through ReLU (positively
homogeneous, hence ``s > 0``); the table lists only feeders where it is exact.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from blockquant.arch import LinearGroup, is_linear
from blockquant.layers import set_weight_matrix, weight_matrix


def _feeder_rows(block: nn.Module, group: LinearGroup) -> tuple[nn.Module, slice]:
    feeder = block.get_submodule(group.feeder)
    width = weight_matrix(feeder).shape[0] if is_linear(feeder) else feeder.weight.shape[0]
    i, n = group.part
    return feeder, slice(i * width // n, (i + 1) * width // n)


def fold_problem(block: nn.Module, group: LinearGroup) -> str | None:
    """Why ``group`` cannot take an exact scale fold (None when it can)."""
    if group.feeder is None:
        return "no feeder whose output only these linears read (table feeder None)"
    feeder, rows = _feeder_rows(block, group)
    if not is_linear(feeder) and getattr(feeder, "weight", None) is None:
        return f"feeder {group.feeder} has no per-channel weight to fold into"
    width = rows.stop - rows.start
    ins = {weight_matrix(block.get_submodule(n)).shape[1] for n in group.linears}
    if ins != {width}:
        return f"feeder {group.feeder} gives {width} channels but the linears read {sorted(ins)} (grouped-query attention)"
    return None


@torch.no_grad()
def fold_scales(block: nn.Module, group: LinearGroup, s: Tensor) -> None:
    """Divide the feeder's output channels by ``s`` (C,) and multiply the linears' columns by it."""
    problem = fold_problem(block, group)
    if problem is not None:
        raise ValueError(f"cannot fold scales into {group.linears}: {problem}")
    if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
        raise ValueError("folding scales must be positive and finite")
    s = s.float()
    feeder, rows = _feeder_rows(block, group)
    if is_linear(feeder):
        w = weight_matrix(feeder)  # (out, in)
        w[rows] /= s.to(w.device).unsqueeze(1)
        set_weight_matrix(feeder, w)
    else:
        feeder.weight.data[rows] = (feeder.weight.data[rows].float() / s.to(feeder.weight.device)).to(feeder.weight.dtype)
    bias = getattr(feeder, "bias", None)
    if bias is not None:
        bias.data[rows] = (bias.data[rows].float() / s.to(bias.device)).to(bias.dtype)
    for name in group.linears:
        layer = block.get_submodule(name)
        w = weight_matrix(layer)
        set_weight_matrix(layer, w * s.to(w.device).unsqueeze(0))


def channel_index(block: nn.Module, group: LinearGroup, head_dim: int | None) -> tuple[Tensor | None, str | None]:
    """Which feeder output channel each input column of the group's linears reads: ``(index (C_in,), None)``,
    or ``(None, why no exact fold exists)``.

    Equal widths: column j reads channel j. A ``heads`` group (v → o) with grouped-query
    attention: query head h reads KV head ``h // n_rep`` (transformers' ``repeat_kv``), so
    column ``h·d + i`` reads channel ``(h // n_rep)·d + i`` — a per-channel factor of v's rows
    is still exact when o's columns take the factor of the channel they read.
    """
    if group.feeder is None:
        return None, "no feeder whose output only these linears read (table feeder None)"
    feeder, rows = _feeder_rows(block, group)
    if not is_linear(feeder) and getattr(feeder, "weight", None) is None:
        return None, f"feeder {group.feeder} has no per-channel weight to fold into"
    width = rows.stop - rows.start
    ins = {weight_matrix(block.get_submodule(n)).shape[1] for n in group.linears}
    if ins == {width}:
        return torch.arange(width), None
    (cols,) = ins if len(ins) == 1 else (None,)
    if not group.heads or cols is None or head_dim is None or width % head_dim or cols % width:
        return None, f"feeder {group.feeder} gives {width} channels but the linears read {sorted(ins)}"
    n_rep = cols // width
    j = torch.arange(cols)
    return (j // head_dim // n_rep) * head_dim + j % head_dim, None


def feeder_rows(block: nn.Module, group: LinearGroup) -> tuple[nn.Module, slice]:
    """The feeder module and the slice of its output channels the group reads."""
    return _feeder_rows(block, group)
