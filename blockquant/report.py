"""What a quantization run did: ``QuantResult``, returned by ``blockquant.quantize`` and written as
``blockquant.json`` beside every checkpoint."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from blockquant.capture import LayerResult
from blockquant.recipe import Recipe


@dataclass
class BlockReport:
    index: int
    input_error: float  # relative MSE of the quantized stream vs the FP stream entering the block (NaN: no calibration)
    output_error: float  # the same at the block's output, after quantizing it
    seconds: float

    def record(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in vars(self).items()}


@dataclass
class QuantResult:
    """Per-layer grids and errors, per-block errors (transformers), time and memory."""

    recipe: Recipe
    layers: dict[str, LayerResult] = field(default_factory=dict)
    blocks: list[BlockReport] = field(default_factory=list)
    batchnorm_folded: list[tuple[str, str]] = field(default_factory=list)  # (conv, batchnorm) pairs folded before quantizing
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # CPU time of this process over all its threads: a cost measure robust to other jobs sharing the CPU
    peak_rss_mb: float = 0.0
    peak_cuda_mb: float | None = None
    train_logs: list = field(default_factory=list)  # (first block, finetune.TrainLog) per window
    activations: dict | None = None  # the activation scheme and each static range (activations.record)
    model_steps: dict[str, dict] = field(default_factory=dict)  # what each whole-model step (qft) reports
    step_seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> wall and CPU seconds, summed over blocks
    error_samples: int | None = None  # calibration samples the block errors were measured on (None: every one, or no calibration)

    @contextmanager
    def timing(self, method: str) -> Iterator[None]:
        """Add the wall and CPU time of the enclosed run of a recipe step to its totals (so a
        chain's steps can be costed against each other)."""
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        t = self.step_seconds.setdefault(method, {"seconds": 0.0, "cpu_seconds": 0.0})
        t["seconds"] += time.perf_counter() - wall
        t["cpu_seconds"] += time.process_time() - cpu

    def record(self) -> dict[str, Any]:
        """A JSON-able, quantization_config-style record."""
        spec = self.recipe.spec
        out = {
            "quant_method": "blockquant",
            "method": self.recipe.name,
            "bits": spec.bits,
            "group_size": spec.group_size,
            "granularity": "tensor" if spec.per_tensor else "channel" if spec.group_size == -1 else "group",
            "sym": spec.sym,
            "recipe": self.recipe.to_dict(),
            "activations": self.activations,
            "seconds": round(self.seconds, 2),
            "cpu_seconds": round(self.cpu_seconds, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "peak_cuda_mb": None if self.peak_cuda_mb is None else round(self.peak_cuda_mb, 1),
            "step_seconds": {m: {k: round(v, 2) for k, v in t.items()} for m, t in self.step_seconds.items()},
            "blocks": [b.record() for b in self.blocks],
            "block_errors_on_samples": self.error_samples,
            "layers": {n: _layer_record(r) for n, r in self.layers.items()},
            **self.model_steps,  # e.g. "qft": its training record (block and layer errors above are from before it)
        }
        if self.batchnorm_folded:
            out["batchnorm_folded"] = [list(p) for p in self.batchnorm_folded]
        return out


def _layer_record(r: LayerResult) -> dict[str, Any]:
    # None, not NaN (invalid JSON), where no per-block step measured a layer (qft alone)
    out: dict[str, Any] = {"relative_output_error": r.error if math.isfinite(r.error) else None, "act_order": r.g_idx is not None}
    if r.bits is not None:
        out["bits"] = r.bits
    if r.seconds is not None:
        out["seconds"] = round(r.seconds, 3)
    return out | r.info
