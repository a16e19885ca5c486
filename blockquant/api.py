"""``quantize(model, recipe, calibration)``: the one driver (DESIGN.md §4).

It picks the pipeline from the model's structure. A transformer stack is quantized block by
block: embed once and capture block 0's inputs; then per block: onload it to ``device``, compute
the full-precision targets, apply the recipe's methods, propagate the quantized outputs, offload.
Two activation streams flow through the blocks: the full-precision one (targets) and the
quantized one (inputs of the next quantized block). Peak memory ≈ one block + activations.
A network without a chain of blocks (a convolution network with skips) is quantized layer by
layer in forward order (``layerwise``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from blockquant import activations, dist, layerwise
from blockquant.arch import ARCHITECTURES, ArchSpec, arch_for, block_linears, get_blocks
from blockquant.capture import (
    BlockContext,
    BlockInputs,
    LayerResult,
    ModelContext,
    Split,
    WindowContext,
    block_forward,
    capture_block_inputs,
    run_block,
)
from blockquant.device import check_device, peak_rss_mb
from blockquant.layers import is_conv
from blockquant.lazy import LazyCheckpoint, release_outside
from blockquant.methods import METHODS
from blockquant.offload import MODES, offload
from blockquant.recipe import Recipe
from blockquant.report import BlockReport, QuantResult
from blockquant.spec import SCALE_DTYPES

log = logging.getLogger(__name__)

# Block errors are reported on this many calibration samples when no step trains against the
# full-precision stream: that stream then serves the report alone, and this bounds its cost.
REPORT_SAMPLES = 16


def calibration_batches(calibration: Tensor | list[Tensor], batch_size: int, encoder: bool) -> list[dict[str, Tensor]]:
    """Split token ids into model-call batches (encoders also get an all-ones mask).

    ``calibration``: (N, T) ids, or a list of 1-D samples of varying length (whole paragraphs).
    Samples of one length share a batch, so that no batch needs padding (which every loss and
    Hessian would have to mask out). The batches keep the order in which their first sample
    came: the last ones, held out by fine-tuning, are a random draw of lengths, not the longest.
    """
    if isinstance(calibration, Tensor):
        if calibration.ndim != 2 or calibration.shape[0] < 1:
            raise ValueError(f"calibration must be token ids of shape (n_samples, seqlen), got {tuple(calibration.shape)}")
        chunks = list(calibration.split(batch_size))
    else:
        if not calibration or any(s.ndim != 1 or s.numel() < 1 for s in calibration):
            raise ValueError("calibration must be a non-empty list of 1-D token id tensors (or one (n_samples, seqlen) tensor)")
        by_length: dict[int, list[int]] = {}
        for i, s in enumerate(calibration):
            by_length.setdefault(s.numel(), []).append(i)
        groups = [idx[j : j + batch_size] for idx in by_length.values() for j in range(0, len(idx), batch_size)]
        chunks = [torch.stack([calibration[i] for i in g]) for g in sorted(groups, key=lambda g: g[0])]
    batches = []
    for chunk in chunks:
        batch = {"input_ids": chunk}
        if encoder:
            batch["attention_mask"] = torch.ones_like(chunk)
        batches.append(batch)
    return batches


def shard_batches(batches: list[dict[str, Tensor]]) -> tuple[list[dict[str, Tensor]], Split]:
    """This process's part of every calibration batch, when several processes share the run.

    Each process takes a contiguous run of samples of each batch (a batch of 8 on 2 processes:
    4 + 4), so that every statistic is a sum over the same samples as in one process and every
    fine-tuning step sees the same batch. Where a batch does not divide evenly, the longer parts
    go to the next processes in turn; a process may hold no part of a small batch.
    """
    held, index, starts, sizes, totals, lengths = [], [], [], [], [], []
    turn = 0
    for b, batch in enumerate(batches):
        n, length = batch["input_ids"].shape
        start, stop = dist.parts(n, turn)[dist.rank()]
        turn = (turn + n) % dist.world_size()
        totals.append(n)
        lengths.append(length)
        if stop > start:
            held.append({k: v[start:stop] for k, v in batch.items()})
            index.append(b)
            starts.append(start)
            sizes.append(stop - start)
    return held, Split(tuple(index), tuple(starts), tuple(sizes), tuple(totals), tuple(lengths))


def check_finite_weights(model: nn.Module, prefix: str = "") -> None:
    """Refuse NaN/Inf weights; a block on ``meta`` is checked when it is loaded. Large tensors are
    checked in chunks, so that the check costs no memory next to an embedding of 32 000 rows."""
    for name, p in model.named_parameters(prefix=prefix):
        if not p.is_meta and not all(bool(torch.isfinite(c).all()) for c in p.detach().reshape(-1).split(1 << 20)):
            raise ValueError(f"weight {name} contains NaN or Inf; the model is corrupt, nothing to quantize")


def _relative_mse(a: list[Tensor], b: list[Tensor]) -> float:
    """Σ‖a − b‖² / Σ‖b‖² over batches, a sample at a time (a batch's fp32 copies would cost more
    than the batch)."""
    num = den = 0.0
    for x, y in zip(a, b):
        for xs, ys in zip(x.split(1), y.split(1)):
            ys = ys.float()
            num += float(torch.sum((xs.float() - ys) ** 2))
            den += float(torch.sum(ys**2))
    if dist.world_size() > 1:  # sums over every process's samples
        num, den = dist.all_reduce_sum(torch.tensor([num, den], dtype=torch.float64)).tolist()
    return num / max(den, 1e-30)


def _check_finite_outputs(block: nn.Module, inputs: BlockInputs, outputs: list[Tensor], where: str) -> None:
    """Raise naming the first module of the block whose output is NaN/Inf (under several processes,
    every process raises: the one that found it names the layer)."""
    bad = next((i for i, y in enumerate(outputs) if not torch.isfinite(y).all()), None)
    if dist.world_size() > 1 and dist.any_rank(bad is not None) and bad is None:
        raise ValueError(f"{where}: NaN/Inf output on another process's calibration samples (its error names the layer)")
    if bad is None:
        return
    culprit: list[str] = []

    def hook(name: str):
        def fn(_m, _a, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            if not culprit and isinstance(t, Tensor) and not torch.isfinite(t).all():
                culprit.append(name)

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in block.named_modules() if n]
    try:
        run_block(block, BlockInputs(inputs.hidden[bad : bad + 1], inputs.args[bad : bad + 1], inputs.kwargs[bad : bad + 1]))
    finally:
        for h in handles:
            h.remove()
    layer = culprit[0] if culprit else "the block's own arithmetic"
    raise ValueError(f"{where}: NaN/Inf output, first produced by layer {layer}")


def _advance_in_place(block: nn.Module, inputs: BlockInputs, where: str) -> list[Tensor]:
    """``run_block`` that replaces each batch's input by the block's output as soon as it is computed."""
    hidden = inputs.hidden
    for i in range(len(hidden)):
        y = block_forward(block, hidden[i], inputs.args[i], inputs.kwargs[i])
        if not torch.isfinite(y).all():
            _check_finite_outputs(block, inputs.subset([i]), [y], where)
        hidden[i] = y
    return hidden


def _check_common(model: Any, recipe: Any, batch_size: Any) -> None:
    """What ``quantize`` is handed, checked up front: a mistake is named here, not deep inside torch."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (e.g. AutoModelForCausalLM.from_pretrained(dir)), got {type(model).__name__}")
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a Recipe, e.g. parse_recipe('gptq', QuantSpec(bits=4)), got {type(recipe).__name__}")
    if any(type(m).__name__ == "QuantLinear" for m in model.modules()):
        raise ValueError("the model is already quantized (it holds packed QuantLinear layers): quantize the full-precision model")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def _check_token_ids(model: nn.Module, calibration: Any) -> None:
    """A transformer's calibration: token ids its embedding and positions can take."""
    samples = list(calibration) if isinstance(calibration, (list, tuple)) else [calibration]
    if not samples or not all(isinstance(x, Tensor) for x in samples):
        raise TypeError("calibration must be a tensor of token ids (N, T) or a non-empty list of 1-D tensors of token ids")
    for x in samples:
        if x.dtype not in (torch.int64, torch.int32) or x.numel() == 0 or x.ndim != (2 if x is calibration else 1):
            raise ValueError(
                "calibration must be integer token ids: one (N, T) tensor or a list of 1-D tensors, none empty; "
                f"got a {tuple(x.shape)} {x.dtype} tensor"
            )
    config = getattr(model, "config", None)
    vocab, positions = getattr(config, "vocab_size", None), getattr(config, "max_position_embeddings", None)
    low, high = min(int(x.min()) for x in samples), max(int(x.max()) for x in samples)
    if low < 0 or (vocab is not None and high >= vocab):
        raise ValueError(
            f"calibration token ids span [{low}, {high}]; this model's vocabulary is [0, {vocab}): was another tokenizer used?"
        )
    longest = max(x.shape[-1] for x in samples)
    if positions is not None and longest > positions:
        raise ValueError(f"calibration samples of {longest} tokens exceed the model's {positions} positions")


def _images(calibration: Any) -> Tensor:
    """A convolution network's calibration: one ``(N, C, *spatial)`` float tensor (a list of them is
    concatenated along N), finite."""
    samples = list(calibration) if isinstance(calibration, (list, tuple)) else [calibration]
    if not samples or not all(isinstance(x, Tensor) and x.is_floating_point() and x.ndim >= 3 for x in samples):
        raise TypeError("a convolution network's calibration must be images: a float tensor (N, C, *spatial) or a non-empty list of them")
    if len({tuple(x.shape[1:]) for x in samples}) > 1:
        raise ValueError(f"calibration images must share channels and size to form one batch, got {[tuple(x.shape) for x in samples]}")
    images = torch.cat(samples).float() if len(samples) > 1 else samples[0].float()
    if images.numel() == 0 or not torch.isfinite(images).all():
        raise ValueError("calibration images are empty or hold NaN/Inf")
    return images


def is_convolution_network(model: nn.Module) -> bool:
    """A network the layer-by-layer pipeline walks: not a known transformer, and it has convolutions."""
    return type(model).__name__ not in ARCHITECTURES and any(is_conv(m) for m in model.modules())


@dataclass
class BlockStream:
    """An out-of-core run: the model's blocks stay on ``meta`` until the driver reads each one
    from ``checkpoint`` (just before it is processed); once a block is final, ``write`` receives
    it with its layers' results and the block is released. ``restore`` (resuming an interrupted
    run) returns a block's results as written before, with its quantized weights put back, or
    None for a block still to do."""

    checkpoint: LazyCheckpoint
    write: Callable[[int, nn.Module, dict[str, LayerResult]], None] | None = None
    restore: Callable[[int, nn.Module], dict[str, LayerResult] | None] | None = None


def needs_whole_model(recipe: Recipe) -> str | None:
    """Which step of the recipe reads more than a window of blocks at a time (QFT, a downstream
    objective), or None when the blocks can be loaded one at a time."""
    for step in recipe.steps:
        if METHODS[step.method].stage == 2:
            return step.method
        if getattr(step.options, "objective", "block") != "block":
            return f"{step.method} objective {step.options.objective}"
    return None


def check_data_free(recipe: Recipe) -> None:
    """Refuse a run without calibration for a recipe that needs calibration data."""
    needs = [s.method for s in recipe.steps if not (METHODS[s.method].data_free and METHODS[s.method].data_free(s.options))]
    if recipe.act is not None:
        needs.append("static or dynamic activation quantization")
    if needs:
        raise ValueError(
            f"{', '.join(needs)} need(s) calibration data (--calib FILE); only rtn without the input-weighted clip search runs without"
        )


def check_mapping(model: nn.Module, recipe: Recipe) -> ArchSpec:
    """The model's table; methods that fold scales also need a known feeder for some group."""
    folding = [s.method for s in recipe.steps if METHODS[s.method].folds]
    name = type(model).__name__
    need = (
        f"{' and '.join(folding)} fold(s) scales into the norm or linear that feeds each group of linears "
        "(e.g. input_layernorm → q,k,v; v_proj → o_proj), read from the architecture table in blockquant/arch.py"
    )
    if folding and name not in ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {name}: {need}; add an ArchSpec entry for it (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    if name not in ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {name}: blockquant quantizes the transformers {', '.join(sorted(ARCHITECTURES))} block by block "
            "(add an ArchSpec entry in blockquant/arch.py for another family), and networks with convolutions layer by layer"
        )
    arch = arch_for(model)
    if folding and all(g.feeder is None for g in arch.groups):
        raise ValueError(f"{name}'s table knows no feeder of any linear group: {need}; use rtn or gptq, or add the feeders")
    return arch


def _window_shape(recipe: Recipe, n_blocks: int) -> tuple[list, list, list, int, int]:
    """Split the recipe into per-block steps, at most one window step after them, and at most one
    model-level step last; (K, S) of the window step."""
    steps = list(recipe.steps)
    model_steps = [i for i, st in enumerate(steps) if METHODS[st.method].stage == 2]
    if model_steps and (len(model_steps) > 1 or model_steps[0] != len(steps) - 1):
        raise ValueError(f"recipe {recipe.name}: a whole-model method (qft) must come last and only once (e.g. 'gptq,qft')")
    model_level = [steps.pop()] if model_steps else []
    windowed = [i for i, st in enumerate(steps) if METHODS[st.method].stage == 1]
    if not windowed:
        return steps, [], model_level, 1, 1
    if len(windowed) > 1 or windowed[0] != len(steps) - 1:
        raise ValueError(f"recipe {recipe.name}: a fine-tuning method must come last and only once (e.g. 'gptq,blockft')")
    step = steps[-1]
    k, stride = step.options.window, step.options.stride
    if k > n_blocks:
        raise ValueError(f"window {k} is larger than the model's {n_blocks} blocks; use --window <= {n_blocks}")
    return steps[:-1], [step], model_level, k, stride


def with_scale_dtype(recipe: Recipe, dtype: torch.dtype) -> Recipe:
    """``recipe`` with its spec's ``scale_dtype`` set to ``dtype`` (the dtype the checkpoint will
    store scales in) when the spec names none; an explicit one is kept."""
    if recipe.spec.scale_dtype is not None:
        return recipe
    name = str(dtype).removeprefix("torch.")
    name = name if name in SCALE_DTYPES else "float32"  # e.g. float64: the methods' fp32 scales are exact in it
    return dataclasses.replace(recipe, spec=dataclasses.replace(recipe.spec, scale_dtype=name))


@torch.no_grad()
def quantize(
    model: nn.Module,
    recipe: Recipe,
    calibration: Tensor | list[Tensor] | None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: bool = True,
    seed: int = 0,
    ends_bits: int | None = 8,
    stream: BlockStream | None = None,
    offload_activations: str = "none",
) -> QuantResult:
    """Quantize ``model`` in place with ``recipe``; the pipeline follows the model's structure.

    - A transformer of ``arch.ARCHITECTURES`` (causal LM or encoder): ``calibration`` is token ids
      ``(N, T)`` or a list of 1-D samples of varying length (see ``calibration_batches``), and the
      blocks are quantized one after another (``_quantize_blocks``), ``batch_size`` sequences a call.
      ``calibration`` None: a recipe that needs no data (RTN without the input-weighted search)
      quantizes each block's weights alone, without running the model.
    - A convolution network (a MONAI U-Net, any network with Conv / ConvTranspose layers):
      ``calibration`` is images ``(N, C, *spatial)`` or a list of them, and every layer is quantized
      in forward order (``layerwise.quantize_layers``). ``ends_bits``: bits of the layers that read
      the input and of the last layer (None: the recipe's); ``seed``: which output positions
      the per-layer statistics sample. ``stream``: an out-of-core run (``BlockStream``), whose
      blocks are read from a checkpoint one at a time and handed on as soon as they are final.
      ``offload_activations``: ``cpu`` or ``disk`` keeps the calibration activations off the
      compute device, each batch moved there when it is read (``offload``).

    A spec without ``scale_dtype`` gets the model's parameter dtype (what ``save_packed``
    stores scales in by default); ``result.recipe`` holds the spec actually used.
    """
    _check_common(model, recipe, batch_size)
    device = check_device(device)
    if offload_activations not in MODES:
        raise ValueError(f"offload_activations must be one of {', '.join(MODES)}, got {offload_activations!r}")
    conv = is_convolution_network(model)
    if conv and dist.world_size() > 1:
        raise ValueError(
            f"a convolution network is quantized layer by layer in one process; run it without torchrun (this run has {dist.world_size()})"
        )
    if stream is not None and dist.world_size() > 1:
        raise ValueError("an out-of-core run writes its blocks from one process; run it without torchrun")
    if conv:
        if stream is not None:
            raise ValueError("out-of-core runs read transformer blocks one at a time; a convolution network is loaded whole")
        if calibration is None:
            raise ValueError(
                "a convolution network is quantized layer by layer from calibration images: give at least one (N, C, *spatial) tensor"
            )
        images = _images(calibration)
        layerwise.check_recipe(recipe)
    elif calibration is None:
        check_mapping(model, recipe)
        check_data_free(recipe)
    else:
        check_mapping(model, recipe)  # an unsupported model is named before its calibration is checked
        _check_token_ids(model, calibration)
        n_samples = calibration.shape[0] if isinstance(calibration, Tensor) else len(calibration)
        if dist.world_size() > n_samples:
            raise ValueError(
                f"{dist.world_size()} processes share {n_samples} calibration samples: each needs at least one; "
                f"start at most {n_samples} processes or give more samples (--nsamples)"
            )
        missing = [s.method for s in recipe.steps if not (METHODS[s.method].block or METHODS[s.method].window or METHODS[s.method].model)]
        if missing:
            raise ValueError(
                f"{', '.join(missing)} quantizes convolution networks layer by layer (e.g. a MONAI U-Net); "
                "for transformer blocks use gptq or blockft"
            )
        if stream is not None and (whole := needs_whole_model(recipe)):
            raise ValueError(f"{whole} needs the whole model in memory, not one block at a time: load it whole (no out-of-core run)")
    recipe = with_scale_dtype(recipe, next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32))
    check_finite_weights(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start_time, start_cpu = time.perf_counter(), time.process_time()
    result = QuantResult(recipe)
    if conv:
        home = next(model.parameters()).device
        model.to(device)
        try:
            layerwise.quantize_layers(model, recipe, images.to(device), result, ends_bits, seed, progress)
        finally:
            model.to(home)
    elif calibration is None:
        _quantize_weights_only(model, recipe, device, progress, result, stream)
    else:
        _quantize_blocks(model, recipe, calibration, device, batch_size, progress, result, stream, offload_activations)
    result.activations = activations.record(model, recipe.act)
    result.seconds = time.perf_counter() - start_time
    result.cpu_seconds = time.process_time() - start_cpu
    result.peak_rss_mb = peak_rss_mb()
    if device.type == "cuda":
        result.peak_cuda_mb = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def _onload(block: nn.Module, j: int, arch: ArchSpec, device: torch.device, stream: BlockStream | None) -> torch.device:
    """Read block ``j`` from the checkpoint (out of core) and move it to ``device``; returns where it was."""
    prefix = f"{arch.blocks}.{j}"
    home = next(block.parameters()).device
    if stream is not None:
        stream.checkpoint.load(block, prefix, device)
        check_finite_weights(block, prefix)
    block.to(device)
    block_linears(block, arch)  # checks that the table covers every linear
    return home


def _offload(
    block: nn.Module, j: int, arch: ArchSpec, home: torch.device, stream: BlockStream | None, layers: dict[str, LayerResult], write: bool
) -> None:
    """A final block: out of core, hand it with its layers' results to ``stream.write`` (unless
    ``write`` is False: an earlier run wrote it) and release it; else move it back ``home``.
    Once a block is in its shard, its layers' results keep what the run's record reports (errors,
    act-order) but not their grids: the shard holds those, and keeping them (3 MiB a block of a
    1 B model) would make memory grow with depth."""
    if stream is None:
        block.to(home)
        return
    mine = {n: r for n, r in layers.items() if n.startswith(f"{arch.blocks}.{j}.")}
    if stream.write is not None and write:
        stream.write(j, block, mine)
    stream.checkpoint.release(block)
    if stream.write is not None:
        for name, r in mine.items():
            layers[name] = dataclasses.replace(r, scale=r.scale.new_empty(0), zero=r.zero.new_empty(0))


def _quantize_blocks(
    model: nn.Module,
    recipe: Recipe,
    calibration: Tensor | list[Tensor],
    device: torch.device,
    batch_size: int,
    progress: bool,
    result: QuantResult,
    stream: BlockStream | None = None,
    offload_activations: str = "none",
) -> None:
    """The block-sequential pipeline of a transformer stack.

    Blocks are processed in windows of K consecutive blocks (K = 1 unless the recipe ends in a
    windowed fine-tuning step). A block entering a window for the first time gets the
    per-block steps (RTN, GPTQ, …) on its quantized-stream input; then the window step runs;
    then the first S blocks of the window are final and both streams advance past them.
    Finally a whole-model step (QFT) trains the model end to end.
    """
    arch = arch_for(model)
    model.eval()
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache:
        model.config.use_cache = False  # restored below, so a saved checkpoint keeps the user's setting
    blocks = get_blocks(model, arch)
    block_steps, window_steps, model_steps, k, stride = _window_shape(recipe, len(blocks))
    batches = calibration_batches(calibration, batch_size, arch.kind == "encoder")
    sizes = [b["input_ids"].shape[0] for b in batches]  # samples of every batch of the run
    split = None
    if dist.world_size() > 1:  # each process holds its part of every batch
        batches, split = shard_batches(batches)
    fp_stream = dataclasses.replace(capture_block_inputs(model, blocks, batches, device), split=split)
    if stream is not None:
        release_outside(model)  # block by block, nothing reads the embeddings or the head again
    fp_stream = fp_stream.with_hidden(offload(fp_stream.hidden, offload_activations, device))

    def run(block: nn.Module, inputs: BlockInputs) -> list[Tensor]:  # a stream's next hidden states, kept where the others are
        return run_block(block, inputs, out=offload([], offload_activations, device))

    # Without a window step, nothing reads a block's quantized-stream input once its output is computed.
    in_place = not window_steps and offload_activations == "none" and dist.world_size() == 1
    q_stream = fp_stream.with_hidden(list(fp_stream.hidden)) if in_place else fp_stream  # its own list: the FP one stays
    inputs0 = fp_stream if model_steps else None  # QFT trains from block 0's inputs; nothing else reads them again
    reported = None  # the batches the block errors are measured on; None: all of them
    report_only = not window_steps and not model_steps
    if report_only:  # the FP stream serves the report alone: follow a few samples only
        n = next((i + 1 for i in range(len(sizes)) if sum(sizes[: i + 1]) >= REPORT_SAMPLES), len(sizes))
        if n < len(sizes):
            reported = list(range(n))
            fp_stream = fp_stream.subset(reported)
            result.error_samples = sum(sizes[:n])

    def measured(s: BlockInputs) -> BlockInputs:  # the part of the quantized stream the report compares
        return s if reported is None else s.subset(reported)

    fp_copies: dict[int, nn.Module] = {}  # full-precision copies of the blocks in the window
    homes: dict[int, torch.device] = {}
    t_block: dict[int, float] = {}
    errors_in: dict[int, float] = {}  # report-only runs: each block's input error, measured before its FP input goes
    done: set[int] = set()  # blocks an earlier, interrupted run wrote (stream.restore)

    bar = tqdm(total=len(blocks), desc=f"{recipe.name} {recipe.describe()}", unit="block", disable=not progress)
    first = 0
    while first < len(blocks):
        window = range(first, min(first + k, len(blocks)))
        # 1. onload; blocks new to the window get the per-block steps on their quantized input
        x_q, x_fp, fp_outs = q_stream, fp_stream, {}
        for j in window:
            t0 = time.perf_counter()
            if j not in fp_copies:
                homes[j] = _onload(blocks[j], j, arch, device, stream)
                fp_copies[j] = copy.deepcopy(blocks[j]) if window_steps else blocks[j]
                fp_out = run(blocks[j], x_fp)  # targets, before any method touches it
                _check_finite_outputs(blocks[j], x_fp, fp_out, f"block {j} (full precision)")
                if report_only:  # nothing reads the FP input again: its error now, and its memory is the methods'
                    errors_in[j] = _relative_mse(measured(x_q).hidden, x_fp.hidden)
                    x_fp = fp_stream = fp_stream.with_hidden([])
                restored = stream.restore(j, blocks[j]) if stream is not None and stream.restore is not None else None
                if restored is not None:  # resumed: the block was written by an earlier run
                    result.layers.update(restored)
                    done.add(j)
                for i, step in enumerate(block_steps if restored is None else []):
                    final = i == len(block_steps) - 1 and not window_steps and not model_steps  # no later step quantizes the weights
                    ctx = BlockContext(j, x_q, arch.groups, device, recipe.act, final)
                    with result.timing(step.method):
                        layer_results = METHODS[step.method].block(blocks[j], ctx, recipe.spec, step.options)
                    result.layers.update({f"{arch.blocks}.{j}.{n}": r for n, r in layer_results.items()})
                if recipe.act is not None:  # static ranges from the quantized stream, weights already quantized
                    activations.attach(blocks[j], [g.linears for g in arch.groups], recipe.act, x_q)
            else:
                fp_out = run(fp_copies[j], x_fp)
            fp_outs[j] = fp_out
            t_block[j] = t_block.get(j, 0.0) + time.perf_counter() - t0
            if j != window[-1] or window_steps:
                x_q = x_q.with_hidden(run(blocks[j], x_q))
            x_fp = x_fp.with_hidden(fp_out)
        # 2. the window step (block-wise fine-tuning) trains the whole window jointly
        t0 = time.perf_counter()
        for step in window_steps if not set(window) <= done else []:
            wctx = WindowContext(
                first,
                [blocks[j] for j in window],
                [fp_copies[j] for j in window],
                q_stream,
                fp_stream,
                model,
                arch,
                result.layers,
                device,
                result.train_logs,
                progress,
                fp_outputs=fp_outs[window[-1]],
            )
            with result.timing(step.method):
                result.layers.update(METHODS[step.method].window(wctx, recipe.spec, step.options))
        for j in window:
            t_block[j] += (time.perf_counter() - t0) / len(window)
        # 3. the first S blocks (all, at the end) are final: advance both streams past them
        advance = stride if window[-1] < len(blocks) - 1 else len(window)
        x_q = x_fp = None  # the window's own stream states: nothing reads them again
        for j in range(first, first + advance):
            error_in = errors_in.pop(j) if j in errors_in else _relative_mse(measured(q_stream).hidden, fp_stream.hidden)
            if in_place:  # the block's output takes its input's place, batch by batch: one stream in memory, not two
                q_out = _advance_in_place(blocks[j], q_stream, f"block {j} (quantized)")
            else:
                q_out = run(blocks[j], q_stream)
                _check_finite_outputs(blocks[j], q_stream, q_out, f"block {j} (quantized)")
            error_out = _relative_mse(measured(q_stream.with_hidden(q_out)).hidden, fp_outs[j])
            report = BlockReport(j, error_in, error_out, t_block.pop(j))
            result.blocks.append(report)
            _offload(blocks[j], j, arch, homes.pop(j), stream, result.layers, write=j not in done)
            del fp_copies[j]
            q_stream, fp_stream = q_stream.with_hidden(q_out), fp_stream.with_hidden(fp_outs[j])
            bar.update(1)
            bar.set_postfix(
                err_in=f"{report.input_error:.2e}",
                err_out=f"{report.output_error:.2e}",
                s=f"{report.seconds:.1f}",
                rss_mb=f"{peak_rss_mb():.0f}",
            )
            log.info("block %d: error in %.3e -> out %.3e, %.1fs", j, report.input_error, report.output_error, report.seconds)
        first += advance
    bar.close()
    # 4. a model-level step (QFT) trains the whole model end to end against the FP last-block output
    for step in model_steps:
        mctx = ModelContext(model, arch, inputs0, fp_stream.hidden, result.layers, device, recipe.act, result.train_logs, progress)
        with result.timing(step.method):
            result.layers.update(METHODS[step.method].model(mctx, recipe.spec, step.options))
        result.model_steps[step.method] = mctx.notes
    if use_cache:
        model.config.use_cache = use_cache


def _quantize_weights_only(
    model: nn.Module, recipe: Recipe, device: torch.device, progress: bool, result: QuantResult, stream: BlockStream | None
) -> None:
    """A recipe that needs no calibration (``check_data_free``): each block's weights are quantized
    alone, the model never runs. Out of core, each block is read, quantized, written and released."""
    arch = arch_for(model)
    blocks = get_blocks(model, arch)
    if stream is not None:
        release_outside(model)
    bar = tqdm(total=len(blocks), desc=f"{recipe.name} {recipe.describe()}", unit="block", disable=not progress)
    for j, block in enumerate(blocks):
        t0 = time.perf_counter()
        home = _onload(block, j, arch, device, stream)
        restored = stream.restore(j, block) if stream is not None and stream.restore is not None else None
        if restored is not None:
            result.layers.update(restored)
        for step in recipe.steps if restored is None else []:
            ctx = BlockContext(j, None, arch.groups, device, None, step is recipe.steps[-1])
            with result.timing(step.method):
                layer_results = METHODS[step.method].block(block, ctx, recipe.spec, step.options)
            result.layers.update({f"{arch.blocks}.{j}.{n}": r for n, r in layer_results.items()})
        _offload(block, j, arch, home, stream, result.layers, write=restored is None)
        result.blocks.append(BlockReport(j, math.nan, math.nan, time.perf_counter() - t0))
        bar.update(1)
        log.info("block %d: %.1fs (no calibration: errors not measured)", j, result.blocks[-1].seconds)
    bar.close()
