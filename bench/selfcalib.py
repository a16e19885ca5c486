"""Does calibrating on the full-precision model's own samples help? -> bench/results/selfcalib.md

    python bench/selfcalib.py --calib-source {real,generated,mixed} [--bits 2] [--group-size 64]
                              [--variant gptq|blockft|train-float|"joint K=2"|gptq+qft|blockft+qft] [--prefix 16] [--seed N] [--max-windows N]
                              [--continuations R] [--cache FILE] [--qft-steps N] [--accumulate K] [--awq]

The calibration windows are drawn from the training split (calib.txt); the evaluation is held-out
code. LLM-QAT (Liu et al., 2023) found that text sampled from the full-precision model itself
calibrates better than real text: it is what the model predicts, not what it memorised.
Here each generated window keeps the first ``--prefix`` tokens of the real window the seed draws
and samples the rest from the full-precision model (temperature 1, no top-k), so the token budget
(128 × 512) and the draw are those of the file's windows (``blockquant quantize --calib-generate``
does the same). ``mixed``: every second window generated. One run measures one configuration and
puts its row into bench/results/selfcalib.md, replacing that configuration's earlier row.

``--continuations R`` (generated only) continues each of the 128 prompts R times (R × 128
windows, rows of one prompt adjacent, so the held-out batches at the end hold prompts no training
window has), as ``--calib-continuations``: fine-tuning then reads each window once or twice
instead of about ten times. ``--cache FILE`` keeps the generated windows, so that parallel runs
on one draw sample it once. A ``+qft`` variant also measures the perplexity of its start (the
model just before QFT) in the same process on the same windows: one chain run gives both rows of
the comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import blockquant.files as files  # noqa: E402
from bench.common import SHARED, cpu_name, subject_paths, update_table  # noqa: E402
from blockquant.compare import CompareJob, measure, variant_steps  # noqa: E402
from blockquant.evaluate import perplexity  # noqa: E402
from blockquant.methods import METHODS  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib-source", choices=["real", "generated", "mixed"], required=True)
    p.add_argument("--bits", type=int, default=2, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--variant", default="blockft", choices=["gptq", "blockft", "train-float", "joint K=2", "gptq+qft", "blockft+qft"])
    p.add_argument("--prefix", type=int, default=16, help="real tokens kept at the start of each generated window [16]")
    p.add_argument("--seed", type=int, default=0, help="calibration draw, and the sampling seed [0]")
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    p.add_argument("--continuations", type=int, default=1, help="generated windows per prompt (R × 128 windows) [1]")
    p.add_argument("--qft-steps", type=int, help="QFT's optimizer steps (+qft variants) [the library's 150]")
    p.add_argument("--cache", type=Path, help="load the generated windows from FILE, or save them there if it is missing")
    p.add_argument("--accumulate", type=int, default=1, help="calibration batches per block-wise FT step (blockft option) [1]")
    p.add_argument("--awq", action="store_true", help="run AWQ's scaling (library defaults) before the variant's first step")
    args = p.parse_args()
    if (args.group_size < 1 and args.group_size != -1) or (args.max_windows is not None and args.max_windows < 1):
        p.error("--group-size must be >= 1 or -1, and --max-windows >= 1")
    if not 1 <= args.prefix < 512:
        p.error("--prefix must be in [1, 511]")
    if args.continuations < 1 or ((args.continuations > 1 or args.cache) and args.calib_source != "generated"):
        p.error("--continuations must be >= 1, and it and --cache need --calib-source generated")
    if args.qft_steps is not None and (args.qft_steps < 1 or not args.variant.endswith("+qft")):
        p.error("--qft-steps must be >= 1 and needs a +qft variant")
    if args.accumulate < 1:
        p.error("--accumulate must be >= 1")
    if not (SHARED / "subjects").is_dir():
        print(f"skipped: {SHARED} is missing (benchmarks need the shared subjects)")
        return
    model_dir, calib, evaluation = subject_paths("llama-code")
    if args.calib_source == "mixed":  # every second window generated, so the held-out batches at the end hold both kinds
        load_calibration = files.load_calibration

        def mixed(path, tokenizer, nsamples, seqlen, seed, *a, **k):  # measure() loads the calibration itself
            real = load_calibration(path, tokenizer, nsamples, seqlen, seed, *a, **k)
            rows = torch.arange(1, real.shape[0], 2)
            fp, _ = files.load_model(model_dir)
            out = real.clone()
            out[rows] = files.generate_calibration(fp, real[rows], args.prefix, seed)
            return out

        files.load_calibration = mixed
    if args.cache:  # measure() generates through files.generate_calibration: serve it from the file when it is there
        generate_real = files.generate_calibration

        def cached(model, samples, *a, continuations=1, **k):
            if args.cache.is_file():
                out = torch.load(args.cache)
                want = samples[:, : args.prefix].repeat_interleave(continuations, dim=0)
                if out.shape != (want.shape[0], samples.shape[1]) or not torch.equal(out[:, : args.prefix], want):
                    sys.exit(f"{args.cache} holds other windows than this draw's; remove it or name another file")
                return out
            out = generate_real(model, samples, *a, continuations=continuations, **k)
            tmp = args.cache.with_suffix(".partial")
            torch.save(out, tmp)
            tmp.replace(args.cache)
            return out

        files.generate_calibration = cached
    generate = args.prefix if args.calib_source == "generated" else None
    job = CompareJob(
        model_dir,
        calib,
        evaluation,
        args.bits,
        args.group_size,
        max_windows=args.max_windows,
        seed=args.seed,
        generate=generate,
        continuations=args.continuations,
        ft_options={"accumulate": args.accumulate} if args.accumulate > 1 else {},
    )
    starts: list[float] = []
    if args.variant.endswith("+qft"):  # QFT from the named start: GPTQ alone, or GPTQ then block-wise FT
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))  # only the tokenizer: measure() loads the model itself
        ids = files.tokenize_stream(tokenizer, files.read_text(evaluation, "evaluation"))
        apply_qft = METHODS["qft"].model

        def qft_after_measuring_start(ctx, *a, **k):  # the start's score, same windows and process
            start = perplexity(ctx.model, ids, job.seqlen, job.max_windows, job.device, job.batch_size, progress=False)
            print(f"  start before QFT ({args.variant.removesuffix('+qft')}): ppl {start:.4f}", flush=True)
            starts.append(start)
            return apply_qft(ctx, *a, **k)

        METHODS["qft"] = dataclasses.replace(METHODS["qft"], model=qft_after_measuring_start)
        qft = {} if args.qft_steps is None else {"steps": args.qft_steps}
        steps = variant_steps(args.variant.removesuffix("+qft"), job) + [("qft", qft)]
    else:
        steps = variant_steps(args.variant, job)
    if args.awq:
        steps = [("awq", {})] + steps
    out = measure(job, steps)
    source = "" if args.calib_source == "real" else f" (prefix {args.prefix}, {args.continuations} per prompt)"
    source += f", accumulate {args.accumulate}" if args.accumulate > 1 else ""
    source += ", after AWQ" if args.awq else ""
    print(
        f"llama-code W{args.bits} g{args.group_size} seed {args.seed} calibration {args.calib_source}{source} "
        f"{args.variant}: {out['metric']} {out['value']:.4f}, {out['seconds']:.0f} s, peak RSS {out['peak_rss_mb']:.0f} MB",
        flush=True,
    )
    qft = out.get("model_steps", {}).get("qft")  # compare.measure's own key: QuantResult.model_steps
    if qft:  # the held-out curve tells a fit that did not carry over from one that did not happen
        print(f"  qft {qft['steps_run']} steps, stopped: {qft['stopped']}, held-out loss (step, value): {qft['held_out_loss']}")
    print(f"  seconds per recipe step: {out.get('step_seconds')}", flush=True)
    calibration = (
        args.calib_source if args.calib_source == "real" else f"{args.calib_source}, prefix {args.prefix}, R = {args.continuations}"
    )
    options = [f"accumulate {args.accumulate}"] if args.accumulate > 1 else []
    options += ["after AWQ"] if args.awq else []
    options += [f"qft {args.qft_steps} steps"] if args.qft_steps else []
    options += [f"first {args.max_windows} windows"] if args.max_windows else []
    row = [
        f"W{args.bits} g{args.group_size}",
        str(args.seed),
        calibration,
        args.variant,
        ", ".join(options) or "-",
        f"{cpu_name()}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thr.",
        f"{out['value']:.4f}",
        f"{starts[0]:.4f}" if starts else "-",
        f"{out['seconds']:.0f}",
        f"{out['peak_rss_mb']:.0f}",
    ]
    intro = (
        "llama-code, library defaults unless the options column says otherwise; calibration 128 windows of 512 tokens drawn "
        "from data/code/calib.txt (draw `seed`): `real` the file's windows, `generated` each window's first 16 tokens kept and "
        "the rest sampled from the full-precision model (temperature 1), R continuations per prompt (R × 128 windows), `mixed` "
        "every second window generated; perplexity on all 501 windows of data/code/eval.txt. `start` is the perplexity of "
        "QFT's starting point, measured in the same run; seconds are the run's quantization wall time. Each row: "
        "`python bench/selfcalib.py --calib-source SOURCE --bits B --group-size G --variant V --seed S [--continuations R] "
        "[--accumulate K] [--awq] [--qft-steps N]`; re-running a configuration on the same CPU and thread count replaces its row."
    )
    headers = [
        "width",
        "seed",
        "calibration",
        "variant",
        "options",
        "CPU, kernels, threads",
        "ppl",
        "start (before QFT)",
        "seconds",
        "peak RSS MB",
    ]
    path = update_table("selfcalib", "Calibrating on the model's own text (llama-code)", intro, headers, row, 6)
    print(f"written to {path}", flush=True)


if __name__ == "__main__":
    main()
