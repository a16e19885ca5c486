"""FP, RTN and GPTQ on the shared Llama subjects -> bench/results/llm.md.

    python bench/llm.py [--subjects llama-code llama-shakespeare] [--widths 4:128 3:128 2:128 2:64]
                        [--max-windows N] [--name llm]

Calibration: 128 random non-overlapping 512-token windows of ``data/*/calib.txt`` (seed 0);
evaluation: every 512-token window of ``data/*/eval.txt``. Asymmetric weights throughout.
Each configuration runs in its own process; peak RSS is that process's peak during quantization.
The RTN rows are checked against the reference perplexities of ../shared/README.md (within ±0.5 %).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SHARED, markdown_table, run_child, write_result  # noqa: E402

SUBJECTS = {"llama-code": "code", "llama-shakespeare": "shakespeare"}
WIDTHS = ["4:128", "3:128", "2:128", "2:64"]
GPTQ_DEFAULTS = "act-order, static groups, true-sequential, damp 0.01, clip search 'auto' (per layer, lower calibration output error)"
# shared/README.md: plain RTN (asym min-max, g128) reference perplexities, to reproduce within ±0.5 %.
RTN_REFERENCE = {"llama-code": {4: 9.742, 3: 10.189, 2: 13.539}, "llama-shakespeare": {4: 127.84, 3: 129.42, 2: 134.75}}


def one(subject: str, method: str, bits: int, group: int, max_windows: int | None) -> dict:
    import torch

    from blockquant import QuantSpec, Recipe, make_step, quantize
    from blockquant.evaluate import perplexity
    from blockquant.files import load_calibration, load_model, read_text, tokenize_stream

    torch.manual_seed(0)
    data = SHARED / "data" / SUBJECTS[subject]
    model, tokenizer = load_model(SHARED / "subjects" / subject)
    row = {"subject": subject, "method": method, "bits": bits, "group": group, "seconds": 0.0, "peak_rss_mb": None}
    if method != "fp":
        calibration = load_calibration(data / "calib.txt", tokenizer, 128, 512, seed=0)
        result = quantize(model, Recipe(QuantSpec(bits, group), [make_step(method)]), calibration, progress=False)
        row.update(seconds=result.seconds, peak_rss_mb=result.peak_rss_mb, last_block_error=result.blocks[-1].output_error)
    ids = tokenize_stream(tokenizer, read_text(data / "eval.txt", "evaluation"))
    row["ppl"] = perplexity(model, ids, 512, max_windows, progress=False)
    return row


def checks(rows: list[dict]) -> list[str]:
    """RTN against the shared reference table, and GPTQ against RTN."""
    by = {(r["subject"], r["method"], r["bits"], r["group"]): r["ppl"] for r in rows}
    out = []
    for subject, refs in RTN_REFERENCE.items():
        for bits, ref in refs.items():
            if (subject, "rtn", bits, 128) in by:
                dev = 100 * (by[(subject, "rtn", bits, 128)] / ref - 1)
                out.append(
                    f"- RTN W{bits} g128 {subject}: {by[(subject, 'rtn', bits, 128)]:.3f} vs reference {ref} "
                    f"({dev:+.2f} %) — {'within' if abs(dev) <= 0.5 else 'OUTSIDE'} ±0.5 %"
                )
    for subject in SUBJECTS:
        for bits, group in ((4, 128), (3, 128), (2, 128), (2, 64)):
            g, r = by.get((subject, "gptq", bits, group)), by.get((subject, "rtn", bits, group))
            if g is not None and r is not None:
                out.append(f"- GPTQ beats RTN, {subject} W{bits} g{group}: {g:.3f} vs {r:.3f} — {'yes' if g < r else 'NO'}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", nargs=4, metavar=("SUBJECT", "METHOD", "BITS", "GROUP"), help=argparse.SUPPRESS)
    p.add_argument("--subjects", nargs="+", default=list(SUBJECTS), choices=list(SUBJECTS))
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows (quick look; default all)")
    p.add_argument("--widths", nargs="+", default=WIDTHS, help="bits:group pairs [%(default)s]")
    p.add_argument("--name", default="llm", help="results file bench/results/NAME.md [llm]")
    args = p.parse_args()
    if args.one:
        s, m, b, g = args.one
        print(json.dumps(one(s, m, int(b), int(g), args.max_windows)))
        return
    if not (SHARED / "subjects").is_dir():
        print(f"skipped: {SHARED} is missing (benchmarks need the shared subjects)")
        return
    rows = []
    for subject in args.subjects:
        fp = None
        widths = [tuple(int(x) for x in w.split(":")) for w in args.widths]
        for method, bits, group in [("fp", 16, 0)] + [(m, b, g) for m in ("rtn", "gptq") for b, g in widths]:
            extra = ["--max-windows", str(args.max_windows)] if args.max_windows else []
            row = run_child(Path(__file__), [subject, method, str(bits), str(group)] + extra)
            fp = row["ppl"] if method == "fp" else fp
            row["delta"] = 100 * (row["ppl"] / fp - 1)
            rows.append(row)
            print(
                f"{subject:18s} {method:5s} W{bits:<2d} g{group:<4d} ppl {row['ppl']:9.3f} ({row['delta']:+6.2f} %) {row['seconds']:6.1f}s",
                flush=True,
            )
    table = markdown_table(
        ["subject", "method", "bits", "group", "ppl", "Δ% vs FP", "quantize s", "peak RSS MB"],
        [
            [
                r["subject"],
                r["method"],
                str(r["bits"]),
                "-" if r["method"] == "fp" else str(r["group"]),
                f"{r['ppl']:.3f}",
                f"{r['delta']:+.2f}",
                f"{r['seconds']:.1f}",
                "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}",
            ]
            for r in rows
        ],
    )
    windows = f"first {args.max_windows} windows" if args.max_windows else "all windows"
    body = (
        f"Calibration 128 × 512 tokens (seed 0), eval {windows} of 512 tokens, asymmetric, fp32 compute, CPU.\n"
        f"GPTQ defaults: {GPTQ_DEFAULTS}.\n\n{table}\n\n" + "\n".join(checks(rows))
    )
    print("\n" + body)
    print(f"\nwritten to {write_result(args.name, 'LLM benchmark: FP vs RTN vs GPTQ', body)}")


if __name__ == "__main__":
    main()
