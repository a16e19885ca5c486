"""``quantize(model, recipe, calibration)``: the one sequential driver loop (DESIGN.md §4).

Embed once and capture block 0's inputs; then per block: onload it to ``device``, compute the
full-precision targets, apply the recipe's methods, propagate the quantized outputs, offload.
Two activation streams flow through the blocks: the full-precision one (targets) and the
quantized one (inputs of the next quantized block). Peak memory ≈ one block + activations.
"""
from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from blockquant.arch import arch_for, block_linears, get_blocks
from blockquant.capture import BlockContext, BlockInputs, LayerResult, capture_block_inputs, run_block
from blockquant.methods import METHODS
from blockquant.recipe import Recipe

log = logging.getLogger(__name__)


@dataclass
class BlockReport:
    index: int
    input_error: float  # relative MSE of the quantized stream vs the FP stream entering the block
    output_error: float  # the same at the block's output, after quantizing it
    seconds: float


@dataclass
class QuantResult:
    """What was done: per-layer grids and errors, per-block errors, time and memory."""

    recipe: Recipe
    layers: dict[str, LayerResult] = field(default_factory=dict)
    blocks: list[BlockReport] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_cuda_mb: float | None = None

    def record(self) -> dict[str, Any]:
        """A JSON-able, quantization_config-style record."""
        spec = self.recipe.spec
        return {
            "quant_method": "blockquant",
            "method": self.recipe.name,
            "bits": spec.bits,
            "group_size": spec.group_size,
            "sym": spec.sym,
            "recipe": self.recipe.to_dict(),
            "seconds": round(self.seconds, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "peak_cuda_mb": None if self.peak_cuda_mb is None else round(self.peak_cuda_mb, 1),
            "blocks": [vars(b) for b in self.blocks],
            "layers": {n: {"relative_output_error": r.error, "act_order": r.g_idx is not None} for n, r in self.layers.items()},
        }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def calibration_batches(calibration: Tensor, batch_size: int, encoder: bool) -> list[dict[str, Tensor]]:
    """Split (N, T) token ids into model-call batches (encoders also get an all-ones mask)."""
    if calibration.ndim != 2 or calibration.shape[0] < 1:
        raise ValueError(f"calibration must be token ids of shape (n_samples, seqlen), got {tuple(calibration.shape)}")
    batches = []
    for chunk in calibration.split(batch_size):
        batch = {"input_ids": chunk}
        if encoder:
            batch["attention_mask"] = torch.ones_like(chunk)
        batches.append(batch)
    return batches


def check_finite_weights(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"weight {name} contains NaN or Inf; the model is corrupt, nothing to quantize")


def _relative_mse(a: list[Tensor], b: list[Tensor]) -> float:
    num = sum(float(torch.sum((x.float() - y.float()) ** 2)) for x, y in zip(a, b))
    den = sum(float(torch.sum(y.float() ** 2)) for y in b)
    return num / max(den, 1e-30)


def _check_finite_outputs(block: nn.Module, inputs: BlockInputs, outputs: list[Tensor], where: str) -> None:
    """Raise naming the first module of the block whose output is NaN/Inf."""
    bad = next((i for i, y in enumerate(outputs) if not torch.isfinite(y).all()), None)
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


@torch.no_grad()
def quantize(
    model: nn.Module,
    recipe: Recipe,
    calibration: Tensor,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: bool = True,
) -> QuantResult:
    """Quantize ``model`` in place with ``recipe`` on calibration token ids ``(N, T)``."""
    device = torch.device(device)
    arch = arch_for(model)
    check_finite_weights(model)
    model.eval()
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = QuantResult(recipe)
    blocks = get_blocks(model, arch)
    fp_stream = capture_block_inputs(model, blocks, calibration_batches(calibration, batch_size, arch.kind == "encoder"), device)
    q_stream = fp_stream

    bar = tqdm(range(len(blocks)), desc=f"{recipe.name} {recipe.spec.describe()}", unit="block", disable=not progress)
    for i in bar:
        t0 = time.perf_counter()
        block = blocks[i]
        home = next(block.parameters()).device
        block.to(device)
        block_linears(block, arch)  # checks that the table covers every linear of the block
        fp_out = run_block(block, fp_stream)  # targets, before any method touches the block
        _check_finite_outputs(block, fp_stream, fp_out, f"block {i} (full precision)")
        ctx = BlockContext(i, q_stream, arch.groups, device)
        for step in recipe.steps:
            layer_results = METHODS[step.method].apply(block, ctx, recipe.spec, step.options)
            result.layers.update({f"{arch.blocks}.{i}.{n}": r for n, r in layer_results.items()})
        q_out = run_block(block, q_stream)
        _check_finite_outputs(block, q_stream, q_out, f"block {i} (quantized)")
        report = BlockReport(i, _relative_mse(q_stream.hidden, fp_stream.hidden), _relative_mse(q_out, fp_out), time.perf_counter() - t0)
        result.blocks.append(report)
        block.to(home)
        fp_stream, q_stream = fp_stream.with_hidden(fp_out), q_stream.with_hidden(q_out)
        bar.set_postfix(err_in=f"{report.input_error:.2e}", err_out=f"{report.output_error:.2e}", s=f"{report.seconds:.1f}", rss_mb=f"{peak_rss_mb():.0f}")
        log.info("block %d: error in %.3e -> out %.3e, %.1fs", i, report.input_error, report.output_error, report.seconds)

    result.seconds = time.perf_counter() - start
    result.peak_rss_mb = peak_rss_mb()
    if device.type == "cuda":
        result.peak_cuda_mb = torch.cuda.max_memory_allocated(device) / 2**20
    return result
