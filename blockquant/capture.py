"""Input capture and block on/offload for the sequential pipeline (DESIGN.md §4).

The model runs up to its first block once; a forward pre-hook (with kwargs) records the
block's positional and keyword arguments (masks, rotary position embeddings, …) and stops the
forward. Later blocks are then run one at a time on the recorded arguments.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from blockquant import dist
from blockquant.arch import ArchSpec, LinearGroup
from blockquant.layers import weight_view
from blockquant.spec import ActSpec


class _StopForward(Exception):
    pass


@dataclass(frozen=True)
class Split:
    """This process's part of the calibration when several processes share a run (``dist``): a
    contiguous run of samples of each batch it holds. Batches are numbered as in a one-process run."""

    batches: tuple[int, ...]  # the batches of which this process holds a part, in order
    starts: tuple[int, ...]  # the part's first sample within its batch
    sizes: tuple[int, ...]  # the part's samples (>= 1)
    totals: tuple[int, ...]  # samples of every batch of the run, held here or not
    lengths: tuple[int, ...]  # tokens per sample of every batch of the run

    def subset(self, batches: list[int]) -> Split:
        """The split of the run made of ``batches`` alone, renumbered 0, 1, …"""
        held = {b: i for i, b in enumerate(self.batches)}
        keep = [(new, held[b]) for new, b in enumerate(batches) if b in held]
        return Split(
            tuple(new for new, _ in keep),
            tuple(self.starts[i] for _, i in keep),
            tuple(self.sizes[i] for _, i in keep),
            tuple(self.totals[b] for b in batches),
            tuple(self.lengths[b] for b in batches),
        )


@dataclass
class BlockInputs:
    """Hidden states of each calibration batch and the other arguments a block is called with.

    Under several processes each entry is this process's part of one batch (``split``); the
    methods then address batches by their number in the run (``n_batches``, ``entry``, ``share``).
    """

    hidden: list[Tensor]  # one (B, T, C) tensor per batch
    args: list[tuple[Any, ...]]  # positional arguments after the hidden states, per batch
    kwargs: list[dict[str, Any]]  # keyword arguments, per batch
    split: Split | None = None  # None: entry i is batch i, whole (one process)

    def with_hidden(self, hidden: list[Tensor]) -> BlockInputs:
        return BlockInputs(hidden, self.args, self.kwargs, self.split)

    @property
    def n_batches(self) -> int:
        """Calibration batches of the run, all processes together."""
        return len(self.hidden) if self.split is None else len(self.split.totals)

    def entry(self, batch: int) -> int | None:
        """Which entry holds (this process's part of) batch ``batch``; None when none does."""
        if self.split is None:
            return batch
        try:
            return self.split.batches.index(batch)
        except ValueError:
            return None

    def share(self, batch: int) -> float:
        """The part of batch ``batch``'s samples this process holds (1 with one process)."""
        j = self.entry(batch)
        if self.split is None or j is None:
            return 1.0 if j is not None else 0.0
        return self.split.sizes[j] / self.split.totals[batch]

    def total(self, batch: int) -> int:
        """Samples of batch ``batch`` in the whole run, all processes together."""
        return self.hidden[batch].shape[0] if self.split is None else self.split.totals[batch]

    def sample(self, j: int, r: int) -> tuple[Tensor, tuple, dict[str, Any]]:
        """Entry ``j``'s sample ``r`` alone (a batch of one): hidden states, arguments, keyword arguments."""
        n = self.hidden[j].shape[0]
        return self.hidden[j][r : r + 1], cut_rows(self.args[j], n, r, r + 1), cut_rows(self.kwargs[j], n, r, r + 1)

    def subset(self, batches: list[int]) -> BlockInputs:
        """Batches ``batches`` of the run (renumbered 0, 1, …), as far as this process holds them."""
        if self.split is None:
            return BlockInputs([self.hidden[i] for i in batches], [self.args[i] for i in batches], [self.kwargs[i] for i in batches])
        split = self.split.subset(batches)
        held = [self.split.batches.index(batches[b]) for b in split.batches]
        return BlockInputs([self.hidden[j] for j in held], [self.args[j] for j in held], [self.kwargs[j] for j in held], split)


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move tensors inside nested tuples / lists / dicts."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device | str) -> None:
    """Move every parameter and buffer that is not inside a block (embeddings, norms, head); those
    on ``meta`` (not loaded in an out-of-core run) stay there."""
    inside = {id(t) for t in blocks.parameters()} | {id(t) for t in blocks.buffers()}
    for module in model.modules():
        for p in list(module.parameters(recurse=False)):
            if id(p) not in inside and not p.is_meta:
                p.data = p.data.to(device)
        for name, b in list(module.named_buffers(recurse=False)):
            if id(b) not in inside and not b.is_meta:
                module._buffers[name] = b.to(device)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: list[dict[str, Tensor]],
    device: torch.device | str,
) -> BlockInputs:
    """Run ``model`` on each batch until block 0 and record block 0's call arguments."""
    captured: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["args"], captured["kwargs"] = args, kwargs
        raise _StopForward

    move_outside_blocks(model, blocks, device)
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    hidden, rest, kw = [], [], []
    try:
        for batch in batches:
            try:
                model(**to_device(batch, device), use_cache=False)
            except _StopForward:
                pass
            args = captured.pop("args")
            kwargs = dict(captured.pop("kwargs"))
            if args:
                hidden.append(args[0])
                rest.append(tuple(args[1:]))
            else:
                hidden.append(kwargs.pop("hidden_states"))
                rest.append(())
            kwargs.pop("past_key_values", None)
            kwargs.pop("past_key_value", None)
            kw.append(kwargs)
    finally:
        handle.remove()
        move_outside_blocks(model, blocks, "cpu")
    return BlockInputs(hidden, rest, kw)


def block_output(out: Any) -> Tensor:
    """Blocks return a tensor (transformers 5) or a tuple whose first item is the hidden states."""
    return out[0] if isinstance(out, (tuple, list)) else out


def cut_rows(obj: Any, n: int, a: int, b: int) -> Any:
    """Samples ``a:b`` of a block call's other arguments, for a batch of ``n`` samples: tensors of two
    or more dimensions whose first is the batch's (masks, position ids, per-sample rotary tables)
    are cut, the rest (shared rotary tables, cache positions, flags) kept whole."""
    if isinstance(obj, Tensor):
        return obj[a:b] if obj.dim() >= 2 and obj.shape[0] == n else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(cut_rows(o, n, a, b) for o in obj)
    if isinstance(obj, dict):
        return {key: cut_rows(v, n, a, b) for key, v in obj.items()}
    return obj


def micro_batches(hidden: Tensor, args: tuple, kwargs: dict[str, Any], max_elements: int) -> list[tuple[Tensor, tuple, dict[str, Any]]]:
    """One batch's block call cut into runs of whole samples of at most ``max_elements`` hidden-state
    values (one sample at least), the other arguments cut with them (``cut_rows``)."""
    n, step = hidden.shape[0], max(1, max_elements // max(1, hidden[0].numel()))
    if step >= n:
        return [(hidden, args, kwargs)]
    return [(hidden[a : a + step], cut_rows(args, n, a, a + step), cut_rows(kwargs, n, a, a + step)) for a in range(0, n, step)]


# Hidden-state values per block forward where a batch's parts can run apart (``run_block``, the
# Hessian passes): 2048 tokens of a 2048-wide model, whose forward's intermediates (a 5632-wide
# MLP's four bf16 activations are 44 KiB a token) then cost less than the Hessians or the
# activations they feed. A narrow model's batches run whole: the cut would only cost time.
# Smaller parts cost more, not less: their 1–4 MiB intermediates come from the heap instead of
# their own mappings (``lazy.LARGE_ALLOCATION``), and the heap keeps what they leave free
# (1024 tokens: 50 MiB more at the peak of a 2048-wide model).
FORWARD_ELEMENTS = 1 << 22


@torch.no_grad()
def run_block(
    block: nn.Module, inputs: BlockInputs, transform: Callable[[Tensor], Tensor] | None = None, out: list[Tensor] | None = None
) -> list[Tensor]:
    """Outputs of ``block`` on every captured batch (optionally transformed, e.g. to CPU), appended
    to ``out`` (e.g. an ``offload.Offloaded`` list that moves each batch off the device at once)."""
    outs = [] if out is None else out
    for h, a, k in zip(inputs.hidden, inputs.args, inputs.kwargs):
        y = block_forward(block, h, a, k)
        outs.append(transform(y) if transform else y)
    return outs


def block_forward(block: nn.Module, hidden: Tensor, args: tuple, kwargs: dict[str, Any]) -> Tensor:
    """``block``'s output on one batch, computed ``FORWARD_ELEMENTS`` hidden-state values at a time."""
    parts = [block_output(block(h, *a, **k)) for h, a, k in micro_batches(hidden, args, kwargs, FORWARD_ELEMENTS)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass
class BlockContext:
    """What a method sees of one block: its captured (quantized-stream) inputs and device."""

    index: int
    inputs: BlockInputs | None  # None: a run without calibration (methods whose data_free says they need none)
    groups: tuple[LinearGroup, ...]  # from the architecture table, in execution order
    device: torch.device
    act: ActSpec | None = None  # the recipe's activation quantization (attached after the per-block steps)
    final: bool = True  # no later step quantizes this block: the method must leave its weights on the grid

    def linear(self, block: nn.Module, name: str) -> nn.Module:
        return block.get_submodule(name)


@dataclass
class LayerResult:
    """A quantized layer: grid parameters and its relative output error on calibration data."""

    scale: Tensor  # (out, n_groups); empty once an out-of-core run has written the layer's block (its shard holds them)
    zero: Tensor  # (out, n_groups); likewise
    g_idx: Tensor | None  # (in,) group of each input column, when act-order permuted them
    error: float  # ‖(Ŵ − W)X‖² / ‖WX‖² over the calibration inputs
    bits: int | None = None  # the layer's own width where it differs by layer (a convolution network's first and last layers)
    seconds: float | None = None  # time spent on this layer, where layers are quantized one at a time
    info: dict[str, Any] = field(default_factory=dict)  # what the method reports of this layer (e.g. ADMM's objective)


def _feed(
    block: nn.Module,
    inputs: BlockInputs,
    layers: dict[str, nn.Module],
    make_hook: Callable[[str], Callable],
    on_batch: Callable[[int], None] | None = None,
    max_elements: int | None = None,
) -> None:
    """Run ``block`` on every batch with ``make_hook(name)`` as each named layer's input hook;
    a batch's forward stops as soon as every named layer has seen it. ``on_batch(entry)`` is
    called before each batch's forward. ``max_elements``: each batch runs in parts of at most that
    many hidden-state values (``micro_batches``), for hooks that only add up over tokens."""
    seen: set[str] = set()

    def wrap(name: str) -> Callable:
        inner = make_hook(name)

        def hook(m: nn.Module, args: tuple) -> None:
            inner(m, args)
            seen.add(name)
            if len(seen) == len(layers):
                raise _StopForward

        return hook

    handles = [m.register_forward_pre_hook(wrap(n)) for n, m in layers.items()]
    try:
        for j, (h, a, k) in enumerate(zip(inputs.hidden, inputs.args, inputs.kwargs)):
            if on_batch is not None:
                on_batch(j)
            for hp, ap, kp in micro_batches(h, a, k, max_elements) if max_elements else [(h, a, k)]:
                seen.clear()
                try:
                    block(hp, *ap, **kp)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def collect_hessians(
    block: nn.Module, inputs: BlockInputs, layers: dict[str, nn.Module], dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """``H = 2/N Σ x xᵀ`` (returned in fp32) of each named layer's input over all calibration tokens.

    Each batch's forward stops as soon as every named layer has seen its input, so the
    Hessians of a block's first linears cost almost nothing. Under several processes each sums
    ``2 x xᵀ`` over its own tokens; the sums and the token counts are added up over the
    processes, then divided. ``dtype`` float64 sums in fp64 (whose rounding the final fp32
    almost never shows), so that the Hessian does not depend on how the tokens are split over
    processes (with the same threads each: the forwards' own sums change with the thread count).
    """
    if dist.world_size() > 1 or dtype != torch.float32:
        return _summed_hessians(block, inputs, layers, dtype)
    hessians: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def make_hook(name: str) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])  # (N, in)
            if name not in hessians:
                hessians[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                counts[name] = 0
            total = counts[name] + x.shape[0]
            add_gram(hessians[name].mul_(counts[name] / total), x, 2.0 / total)
            counts[name] = total

        return hook

    _feed(block, inputs, layers, make_hook, max_elements=FORWARD_ELEMENTS)
    return {name: mirror_upper(h) for name, h in hessians.items()}


# Rows of the upper-triangle panels of a Gram sum: narrower panels skip more of the lower
# triangle, wider ones keep the multiply efficient.
GRAM_PANEL = 256
GRAM_TOKENS = 1024  # tokens summed at a time; fewer on wide inputs, whose copy in the sum's dtype is bounded:
GRAM_ELEMENTS = 1 << 21  # input values at a time (8 MiB in fp32: 372 tokens of a 5632-wide MLP's down projection)


def add_gram(h: Tensor, x: Tensor, alpha: float) -> Tensor:
    """``h += alpha · xᵀx`` (``x`` in ``h``'s dtype) on and above the diagonal only, in row
    panels: ``xᵀx`` is symmetric, so its lower triangle (up to half of the multiply-adds on wide
    layers) is left to ``mirror_upper``, once, after the last batch. Below the diagonal ``h`` is
    left as it was."""
    cols = h.shape[0]
    panel = GRAM_PANEL if cols > 2 * GRAM_PANEL else GRAM_PANEL // 2
    tokens = max(64, min(GRAM_TOKENS, GRAM_ELEMENTS // cols))
    for t in range(0, x.shape[0], tokens):
        xt = x[t : t + tokens].to(h.dtype)
        for a in range(0, cols, panel):
            h[a : a + panel, a:].addmm_(xt[:, a : a + panel].t(), xt[:, a:], alpha=alpha)
    return h


def mirror_upper(h: Tensor) -> Tensor:
    """``h`` made symmetric in place from its upper triangle (diagonal included, ``add_gram``), a
    row panel at a time: no temporary of ``h``'s size (a 5632-wide fp32 H is 121 MiB)."""
    cols = h.shape[0]
    for a in range(0, cols, GRAM_PANEL):
        b = min(a + GRAM_PANEL, cols)
        square = h[a:b, a:b]
        square.copy_(square.triu() + square.triu(1).t())
        h[b:, a:b].copy_(h[a:b, b:].t())
    return h


def _in_features(layer: nn.Module) -> int:
    return weight_view(layer).shape[1]


def _summed_hessians(block: nn.Module, inputs: BlockInputs, layers: dict[str, nn.Module], dtype: torch.dtype) -> dict[str, Tensor]:
    """``collect_hessians`` as sums in ``dtype``, divided at the end: every process reduces every
    layer, in one order, whether or not it holds any of the batches."""
    sums: dict[str, Tensor] = {}
    counts = dict.fromkeys(layers, 0)

    def make_hook(name: str) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])  # (N, in)
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device, dtype=dtype)
            add_gram(sums[name], x, 2.0)
            counts[name] += x.shape[0]

        return hook

    _feed(block, inputs, layers, make_hook, max_elements=FORWARD_ELEMENTS)
    n = dist.all_reduce_sum(torch.tensor([counts[name] for name in layers], dtype=torch.float64)).tolist()
    hessians = {}
    for (name, layer), count in zip(layers.items(), n):
        s = sums.get(name)
        if s is None:  # none of the batches is here: this process adds zeros
            s = torch.zeros(_in_features(layer), _in_features(layer), device=layer.weight.device, dtype=dtype)
        hessians[name] = dist.all_reduce_sum(mirror_upper(s)).div_(max(count, 1.0)).float()
    return hessians


@dataclass
class InputStats:
    """What AWQ, SmoothQuant and static activation ranges need of a linear's input (fp32)."""

    absmax: Tensor  # (C,) max |x_j| over every calibration token
    absmean: Tensor  # (C,) mean |x_j| over every calibration token
    lo: float  # min over every value
    hi: float  # max over every value
    sample: Tensor  # (n, C) rows drawn at random from the calibration tokens (n <= max_tokens)
    # Several processes: the sample is the one-process sample's rows whose tokens this process
    # holds; ``positions`` (n,) says where each sits in it, ``sample_size`` how many rows it has.
    positions: Tensor | None = None
    sample_size: int | None = None


@torch.no_grad()
def collect_input_stats(
    block: nn.Module, inputs: BlockInputs, layers: dict[str, nn.Module], max_tokens: int = 4096, seed: int = 0
) -> dict[str, InputStats]:
    """Per-channel |x| max / mean, the value range and a token sample of each named layer's input.

    Like ``collect_hessians``, each batch's forward stops once every named layer has seen it.
    The sample takes an equal share of random tokens from each batch. Under several processes the
    maxima, sums, counts and ranges are reduced over the processes, and each keeps the rows of the
    one-process sample that fall among its own tokens (``InputStats.positions``).
    """
    gen = torch.Generator().manual_seed(seed)
    if dist.world_size() > 1:
        return _reduced_input_stats(block, inputs, layers, max_tokens, gen)
    per_batch = max(1, -(-max_tokens // max(1, len(inputs.hidden))))
    acc: dict[str, dict[str, Any]] = {}

    def make_hook(name: str) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (N, C)
            a = acc.setdefault(name, {"absmax": None, "abssum": 0.0, "n": 0, "lo": math.inf, "hi": -math.inf, "rows": []})
            ax = x.abs()
            a["absmax"] = ax.amax(0) if a["absmax"] is None else torch.maximum(a["absmax"], ax.amax(0))
            a["abssum"] = a["abssum"] + ax.sum(0)
            a["n"] += x.shape[0]
            a["lo"], a["hi"] = min(a["lo"], float(x.min())), max(a["hi"], float(x.max()))
            a["rows"].append(x[torch.randperm(x.shape[0], generator=gen)[:per_batch].to(x.device)])

        return hook

    _feed(block, inputs, layers, make_hook)
    return {n: InputStats(a["absmax"], a["abssum"] / a["n"], a["lo"], a["hi"], torch.cat(a["rows"])[:max_tokens]) for n, a in acc.items()}


def _reduced_input_stats(
    block: nn.Module, inputs: BlockInputs, layers: dict[str, nn.Module], max_tokens: int, gen: torch.Generator
) -> dict[str, InputStats]:
    """``collect_input_stats`` under several processes.

    The one-process run draws, batch after batch, one random permutation of the batch's tokens
    per hooked layer (in the order the hooks fire) from one generator. Every process makes the
    same draws up front, so that its hooks keep exactly the drawn rows that are its own.
    """
    split = inputs.split
    per_batch = max(1, -(-max_tokens // max(1, inputs.n_batches)))
    draws, offsets, size = [], [], 0
    for total, length in zip(split.totals, split.lengths):
        rows = total * length
        draws.append([torch.randperm(rows, generator=gen)[:per_batch] for _ in layers])
        offsets.append(size)
        size += min(per_batch, rows)
    at = {"entry": 0, "fired": 0}

    def on_batch(j: int) -> None:
        at["entry"], at["fired"] = j, 0

    acc = {name: {"absmax": None, "abssum": 0.0, "n": 0, "lo": math.inf, "hi": -math.inf, "rows": [], "at": []} for name in layers}

    def make_hook(name: str) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (N, C): this process's rows of the batch
            j = at["entry"]
            b = split.batches[j]
            perm, first = draws[b][at["fired"]], split.starts[j] * split.lengths[b]
            at["fired"] += 1
            mine = (perm >= first) & (perm < first + x.shape[0])
            a, ax = acc[name], x.abs()
            a["absmax"] = ax.amax(0) if a["absmax"] is None else torch.maximum(a["absmax"], ax.amax(0))
            a["abssum"] = a["abssum"] + ax.sum(0)
            a["n"] += x.shape[0]
            a["lo"], a["hi"] = min(a["lo"], float(x.min())), max(a["hi"], float(x.max()))
            a["rows"].append(x[(perm[mine] - first).to(x.device)])
            a["at"].append(offsets[b] + torch.nonzero(mine).flatten())

        return hook

    _feed(block, inputs, layers, make_hook, on_batch)
    widths = {name: _in_features(layer) for name, layer in layers.items()}
    device = next(iter(layers.values())).weight.device
    highs, sums = [], []  # maxima: |x| per channel, −lo, hi; sums (float64, exact counts): |x| per channel, tokens
    for name, a in acc.items():
        seen = a["n"] > 0  # a process that holds none of the batches adds zeros
        highs += [a["absmax"] if seen else torch.zeros(widths[name], device=device), torch.tensor([-a["lo"], a["hi"]], device=device)]
        sums += [
            (a["abssum"] if seen else torch.zeros(widths[name], device=device)).double(),
            torch.tensor([a["n"]], dtype=torch.float64, device=device),
        ]
    highs, sums = dist.all_reduce_max(torch.cat(highs)), dist.all_reduce_sum(torch.cat(sums))
    out, i, k = {}, 0, 0
    for name, a in acc.items():
        c = widths[name]
        absmax, (neg_lo, hi) = highs[i : i + c], highs[i + c : i + c + 2].tolist()
        count = float(sums[k + c])
        absmean = (sums[k : k + c] / max(count, 1.0)).float()
        i, k = i + c + 2, k + c + 1
        rows = torch.cat(a["rows"]) if a["rows"] else torch.zeros(0, c, device=device)
        positions = torch.cat(a["at"]) if a["at"] else torch.zeros(0, dtype=torch.long)
        keep = positions < max_tokens
        out[name] = InputStats(absmax, absmean, -neg_lo, hi, rows[keep.to(rows.device)], positions[keep], min(size, max_tokens))
    return out


def whole_sample(stats: InputStats) -> Tensor:
    """The one-process token sample, on every process (``stats.sample`` itself with one process):
    each process puts its rows at their positions and the rest is added from the others."""
    if stats.positions is None:
        return stats.sample
    full = stats.sample.new_zeros(stats.sample_size, stats.sample.shape[1])
    full[stats.positions.to(full.device)] = stats.sample
    return dist.all_reduce_sum(full)


# Rows of a weight per product with H in ``output_error``: bounds its temporaries.
ERROR_ROWS = 256


def output_error(w: Tensor, hessian: Tensor, w_hat: Tensor | None = None) -> float:
    """``tr(D H Dᵀ)`` with ``D = ŵ − w`` (``w`` itself when ``w_hat`` is None): the layer's summed
    squared output error on its inputs. A few rows at a time, summed in fp64, so that it costs no
    copy of the weight (and is additive over rows: pieces of a weight can be scored apart)."""
    total = torch.zeros((), dtype=torch.float64, device=w.device)
    for a in range(0, w.shape[0], ERROR_ROWS):
        d = w[a : a + ERROR_ROWS].float() if w_hat is None else w_hat[a : a + ERROR_ROWS].float() - w[a : a + ERROR_ROWS].float()
        total += torch.sum((d @ hessian) * d, dtype=torch.float64)
    return float(total)


def relative_error(w: Tensor, w_hat: Tensor, hessian: Tensor) -> float:
    """``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)``: the layer's relative output error on its inputs."""
    return output_error(w, hessian, w_hat) / max(output_error(w, hessian), 1e-30)


@dataclass
class WindowContext:
    """What a window method (block-wise fine-tuning) sees: K consecutive blocks and both streams."""

    first: int  # index of the window's first block
    blocks: list[nn.Module]  # the window's blocks, already initialised by the per-block steps
    fp_blocks: list[nn.Module]  # their full-precision copies
    q_inputs: BlockInputs  # the window's input on the quantized stream
    fp_inputs: BlockInputs  # the window's input on the full-precision stream
    model: nn.Module  # for downstream objectives: later (still full-precision) blocks, norm, head
    arch: ArchSpec
    prior: dict[str, LayerResult]  # grids chosen by earlier steps, by full layer name
    device: torch.device
    train_logs: list = field(default_factory=list)  # (first block, TrainLog) per trained window
    progress: bool = True
    fp_outputs: list[Tensor] | None = None  # the full-precision window's output on fp_inputs, where the driver has it

    def layer_name(self, offset: int, name: str) -> str:
        return f"{self.arch.blocks}.{self.first + offset}.{name}"


@dataclass
class ModelContext:
    """What a model-level method (QFT) sees once every block has had its per-block steps."""

    model: nn.Module  # quantized in place by the earlier steps (weights on their grids)
    arch: ArchSpec
    inputs: BlockInputs  # block 0's captured inputs (the same for both streams: embeddings are not quantized)
    targets: list[Tensor]  # the full-precision model's last-block output, per calibration batch
    prior: dict[str, LayerResult]  # grids chosen by earlier steps, by full layer name
    device: torch.device
    act: ActSpec | None = None
    train_logs: list = field(default_factory=list)
    progress: bool = True
    notes: dict[str, Any] = field(default_factory=dict)  # what the method reports into blockquant.json
