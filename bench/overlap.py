"""MiniLM: does the cosine score come from evaluation paragraphs the calibration file also holds? -> bench/results/<name>.md

    python bench/overlap.py [--bits 3] [--group-size 128] [--recipe gptq,blockft] [--windows] [--seed 0] [--name minilm-overlap]

Some paragraphs of data/shakespeare/eval.txt also occur verbatim in data/shakespeare/calib.txt
(stage directions, short lines). A quantizer fine-tuned on the calibration text could score them
well by memory. This quantizes all-MiniLM-L6-v2 as bench/blockft.py does (512 × 128 tokens of
calib.txt, whole paragraphs unless --windows, seed 0, batches of 8) and reports the mean cosine
to the FP model over the benchmark's 512 evaluation paragraphs, over those not in calib.txt and
over those in it. The first number equals bench/blockft.py's for the same recipe and width.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SHARED, calibration_shape, cpu_name, markdown_table, subject_paths, write_result  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, default=3, help="weight bits [3]")
    p.add_argument("--group-size", type=int, default=128, help="weights per quantization group [128]")
    p.add_argument("--recipe", default="gptq,blockft", help="comma chain of methods, library defaults [gptq,blockft]")
    p.add_argument("--windows", action="store_true", help="calibrate on 512 windows of 128 tokens instead of whole paragraphs")
    p.add_argument("--seed", type=int, default=0, help="calibration draw [0]")
    p.add_argument("--name", default="minilm-overlap", help="results file bench/results/NAME.md [minilm-overlap]")
    args = p.parse_args()
    from blockquant.recipe import QuantSpec, parse_recipe

    try:  # a bad --recipe / --bits / --group-size is one line, before the model loads
        recipe = parse_recipe(args.recipe, QuantSpec(args.bits, args.group_size))
    except ValueError as e:
        raise SystemExit(f"overlap.py: {e}") from None
    if not (SHARED / "data" / "shakespeare").is_dir():
        print(f"skipped: {SHARED} has no data/shakespeare")
        return

    import torch
    import torch.nn.functional as F

    from blockquant.api import quantize
    from blockquant.compare import CompareJob
    from blockquant.evaluate import mean_pooled_embeddings, paragraph_batches
    from blockquant.files import load_calibration, load_model, read_text, split_paragraphs

    model_dir, calib_path, eval_path = subject_paths("minilm")
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(model_dir)
    paragraphs = split_paragraphs(read_text(eval_path, "evaluation"))[:512]
    seen = set(split_paragraphs(read_text(calib_path, "calibration")))
    repeated = torch.tensor([q in seen for q in paragraphs])
    batches = paragraph_batches(tokenizer, paragraphs, max_length=512)
    reference = mean_pooled_embeddings(model, batches)
    nsamples, seqlen = calibration_shape("minilm")
    calibration = load_calibration(calib_path, tokenizer, nsamples, seqlen, args.seed, True, not args.windows)
    quantize(model, recipe, calibration, batch_size=CompareJob.batch_size, progress=False)  # as bench/blockft.py
    cosine = F.cosine_similarity(mean_pooled_embeddings(model, batches), reference, dim=-1)

    rows = [
        ["all (the benchmark's value)", str(len(paragraphs)), f"{cosine.mean():.4f}"],
        ["not in calib.txt", str(int((~repeated).sum())), f"{cosine[~repeated].mean():.4f}"],
        ["also in calib.txt", str(int(repeated.sum())), f"{cosine[repeated].mean():.4f}" if repeated.any() else "-"],
    ]
    unit = "512 windows × 128 tokens" if args.windows else "whole paragraphs, 65 536 tokens in all"
    body = (
        f"all-MiniLM-L6-v2, recipe {args.recipe}, W{args.bits} g{args.group_size}, asymmetric; calibration {unit} of "
        f"data/shakespeare/calib.txt (seed {args.seed}); mean cosine of mean-pooled embeddings to FP over the first 512 "
        f"paragraphs of data/shakespeare/eval.txt, split by whether the paragraph occurs verbatim in calib.txt.\n\n"
        + markdown_table(["evaluation paragraphs", "count", "mean cosine"], rows)
    )
    path = write_result(args.name, "MiniLM: evaluation paragraphs that the calibration file repeats", body)
    print(body)
    print(f"written to {path} ({cpu_name()})")


if __name__ == "__main__":
    main()
