"""EfficientQ (ADMM + self-adaptive attention) on lits-unet -> bench/results/unet.md.

    python bench/unet.py [--rows LABEL ...] [--threads 1] [--fresh] [--no-cli]

Subject ``../shared/subjects/lits-unet`` (MONAI 3-D U-Net, 1.19 M parameters), volume
``../shared/data/lits/lits117.npz`` preprocessed with the subject's ``clip((HU+200)/500, 0, 1)``.
Calibration: one crop, x in [24, 88) (64 × 128 × 128, inside the training region x < 88);
evaluation: Dice (MONAI DiceMetric) on the x >= 96 slab, liver = labels 1 and 2, tumour = label 2.
Weights per output channel, asymmetric; first layers (those reading the image) and the last
layer stay at 8 bits unless a row says otherwise. Each row runs in its own process (its time and
peak RSS are its own); rows are cached in bench/cache/unet.json, so an interrupted run resumes.
The last step times the whole W2 ADMM run through the CLI (``blockquant quantize``, process start
to written directory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SHARED, cache_path, markdown_table, run_child, write_result  # noqa: E402

SUBJECT = SHARED / "subjects" / "lits-unet"
DATA = SHARED / "data" / "lits" / "lits117.npz"
CALIB, EVAL = "24:88", "96:"
CLASSES = {"liver": (1, 2), "tumour": (2,)}

# label: (wbits, abits, method, options)
ROWS: dict[str, tuple[int, int, str | None, dict]] = {"FP": (32, 16, None, {})}
for _b in (8, 4, 3, 2):
    ROWS[f"W{_b} RTN"] = (_b, 16, "rtn", {})
    ROWS[f"W{_b} GPTQ"] = (_b, 16, "gptq", {})
    ROWS[f"W{_b} ADMM"] = (_b, 16, "admm", {})
    ROWS[f"W{_b} ADMM w/o attention"] = (_b, 16, "admm", {"attention": False})
    ROWS[f"W{_b} ADMM w/o weight reg"] = (_b, 16, "admm", {"eta": 0.0})
ROWS["W4A8 RTN"] = (4, 8, "rtn", {})
ROWS["W4A8 GPTQ"] = (4, 8, "gptq", {})
ROWS["W4A8 ADMM"] = (4, 8, "admm", {})
# the shared README's reference point: every conv at the width, first and last layers included
ALL_LAYERS = {
    "W3 RTN all layers": "W3 RTN",
    "W3 ADMM all layers": "W3 ADMM",
    "W2 RTN all layers": "W2 RTN",
    "W2 ADMM all layers": "W2 ADMM",
}
ROWS.update({label: ROWS[base] for label, base in ALL_LAYERS.items()})


def load_subject():
    """lits-unet and its volume: (model, config, calibration input, evaluation input, evaluation labels)."""
    import numpy as np
    import torch

    from blockquant.unet import intensity, load_network, network_input, parse_region

    model, config = load_network(SUBJECT)
    data = np.load(DATA)
    image, labels = intensity(config["intensity"])(data["img"]), data["lab"].astype(np.int64)
    x_cal = network_input(image, config, parse_region(CALIB, 3), "calibration")
    x_eval = network_input(image, config, parse_region(EVAL, 3), "evaluation")
    return model, config, x_cal, x_eval, torch.from_numpy(labels[parse_region(EVAL, 3)])[None]


def one(label: str) -> dict:
    import torch

    from blockquant import quantize
    from blockquant.evaluate import dice_per_class, segment
    from blockquant.recipe import ActSpec, QuantSpec, Recipe, make_step

    torch.manual_seed(0)
    bits, abits, method, opts = ROWS[label]
    model, config, x_cal, x_eval, lab_eval = load_subject()
    row = {"label": label, "bits": bits, "abits": abits, "method": method or "fp", "options": opts, "load_before": os.getloadavg()[0]}
    if method:
        act = ActSpec(8, "tensor", sym=False) if abits == 8 else None
        recipe = Recipe(QuantSpec(bits, -1, scale_dtype="float32"), [make_step(method, opts)], act)
        wall, cpu = time.perf_counter(), time.process_time()
        ends = None if label in ALL_LAYERS else 8
        result = quantize(model, recipe, x_cal, progress=False, ends_bits=ends)
        row.update(
            seconds=time.perf_counter() - wall,
            cpu_seconds=time.process_time() - cpu,
            peak_rss_mb=result.peak_rss_mb,
            eight_bit=[n for n, r in result.layers.items() if r.bits == 8 and bits != 8],
            ends_bits=ends,
            layer_errors={n: r.error for n, r in result.layers.items()},
        )
    row["load_after"] = os.getloadavg()[0]
    row["dice"] = dice_per_class(segment(model, x_eval), lab_eval, CLASSES)
    return row


def cli_timing(threads: int) -> dict:
    """The whole W2 ADMM run through the CLI, then its Dice through ``blockquant eval``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "w2"
        cmd = ["blockquant", "quantize", str(SUBJECT), "--recipe", "admm", "--wbits", "2", "--calib", str(DATA), "--crop", CALIB]
        cmd += ["--output", str(out), "--quiet"]
        load_before, t0 = os.getloadavg(), time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall, load_after = time.perf_counter() - t0, os.getloadavg()
        if proc.returncode:
            raise RuntimeError(proc.stderr[-2000:])
        ev = ["blockquant", "eval", str(out), "--data", str(DATA), "--region", EVAL, "--classes", "liver=1,2;tumour=2", "--json"]
        dice = json.loads(subprocess.run(ev, capture_output=True, text=True, env=env, check=True).stdout)["dice"]
    return {
        "command": " ".join(cmd),
        "seconds": wall,
        "load_before": load_before,
        "load_after": load_after,
        "dice": dice,
        "stdout": proc.stdout.strip(),
    }


def _fmt_row(r: dict, fp: dict) -> list[str]:
    d, f = r["dice"], fp["dice"]
    act = "A8 tensor" if r["abits"] == 8 else "-"
    ends = "-" if r["method"] == "fp" else ("all 8" if r["bits"] == 8 else f"{len(r['eight_bit'])} layers at 8")
    if r["label"] in ALL_LAYERS:
        ends = "none"
    secs = "-" if r["method"] == "fp" else f"{r['seconds']:.1f} ({r['cpu_seconds']:.0f} CPU)"
    rss = "-" if r["method"] == "fp" else f"{r['peak_rss_mb']:.0f}"
    load = f"{r['load_before']:.1f}→{r['load_after']:.1f}"
    return [
        r["label"],
        "32" if r["method"] == "fp" else str(r["bits"]),
        act,
        f"{d['liver']:.4f}",
        f"{d['tumour']:.4f}",
        "-" if r["method"] == "fp" else f"{100 * (d['liver'] - f['liver']):+.2f}",
        "-" if r["method"] == "fp" else f"{100 * (d['tumour'] - f['tumour']):+.2f}",
        ends,
        secs,
        rss,
        load,
    ]


def checks(rows: dict[str, dict], cli: dict | None) -> list[str]:
    """ADMM's distance to FP per width, what its attention and regulariser change, and the CLI's wall time."""
    out = []
    fp = rows["FP"]["dice"]

    def d(label: str) -> dict | None:
        return rows[label]["dice"] if label in rows else None

    for bits in (4, 3, 2):
        a = d(f"W{bits} ADMM")
        if a:
            gap = max(100 * (fp[c] - a[c]) for c in fp)
            out.append(f"- ADMM W{bits}: liver {a['liver']:.4f}, tumour {a['tumour']:.4f}; largest drop from FP {gap:.2f} Dice points")
    for bits in (2, 3):
        a = d(f"W{bits} ADMM")
        for ablation in ("w/o attention", "w/o weight reg"):
            n = d(f"W{bits} ADMM {ablation}")
            if a and n:
                out.append(
                    f"- W{bits} ADMM vs ADMM {ablation}: tumour {100 * (a['tumour'] - n['tumour']):+.2f}, "
                    f"liver {100 * (a['liver'] - n['liver']):+.2f} Dice points"
                )
    if cli:
        out.append(
            f"- whole W2 ADMM run through the CLI: {cli['seconds']:.0f} s wall "
            f"(1-min load average {cli['load_before'][0]:.1f} before, {cli['load_after'][0]:.1f} after)"
        )
    return out


def render(rows: dict[str, dict], cli: dict | None, threads: int) -> str:
    fp = rows["FP"]
    order = [label for label in ROWS if label in rows]
    headers = [
        "method",
        "wbits",
        "activations",
        "Dice liver",
        "Dice tumour",
        "Δ liver (points)",
        "Δ tumour (points)",
        "8-bit layers",
        "quantize s (CPU s)",
        "peak RSS MB",
        "load avg",
    ]
    table = markdown_table(headers, [_fmt_row(rows[label], fp) for label in order])
    eight = next((r["eight_bit"] for r in rows.values() if r.get("eight_bit")), [])
    parts = [
        f"Measured with `python bench/unet.py` (OMP_NUM_THREADS={threads}). Subject lits-unet, calibration: one crop x ∈ [{CALIB.replace(':', ', ')}) "
        f"of lits117 (64 × 128 × 128, training region); evaluation: x ≥ 96 slab (32 × 128 × 128), Dice with MONAI's DiceMetric, liver = labels 1 ∪ 2, "
        "tumour = label 2. Weights per output channel, asymmetric (zero point), BatchNorm folded first. "
        f"**First and last layers stay at 8 bits** in every W2/W3/W4 row (as EfficientQ does) except the `all layers` rows: {', '.join(f'`{n}`' for n in eight)} "
        "(the two 1→16 convs reading the image and the final 3→3 conv; 1,107 of 1.19 M weights). W4A8: static per-tensor asymmetric 8-bit "
        "inputs of every layer (min–max of the calibration input on the quantized network).",
        "",
        "ADMM: 200 iterations, ρ₀ = 10·r (r = mean diagonal of the layer's weighted, centred im2col Gram matrix), doubling every 50; "
        "η = 0.1·r; projection = 3 alternations of the per-channel scale a = ⟨q−z, w⟩/⟨q−z, q−z⟩ (with an integer zero point) and the levels; "
        "the best G by the objective is kept (round-to-nearest included). Gram matrices use at most 65,536 output positions per layer "
        "(seeded uniform sample; only the layers at ½ and full resolution are subsampled: 131,072 and 1,048,576 positions). "
        "`w/o attention`: every voxel weighs the same; `w/o weight reg`: η = 0. GPTQ: im2col Hessian on the same positions, act-order, "
        "clip search chosen per layer by calibration error. RTN: min–max.",
        "",
        f"Timing: the load average column is the machine's 1-minute load at the start and end of each row (above {os.cpu_count()} "
        "means waiting for a core), so wall seconds vary with what else runs; CPU seconds (this process, all threads) are the "
        "steadier cost measure. On a CPU shared with other jobs, one torch thread per row is much faster than two: "
        "two OpenMP threads spin-wait for a descheduled partner in the element-wise ops of the projection.",
        "",
        table,
        "",
        "Fine-tuning: QFT after ADMM (`--recipe admm,qft`, every conv's DoF trained end to end) is measured in bench/results/qft.md. "
        "Block-wise `blockft` is not run here: the network has no chain of blocks for its window driver.",
    ]
    if cli:
        d = cli["dice"]
        parts += [
            "",
            "## Whole W2 ADMM run through the CLI",
            "",
            f"`OMP_NUM_THREADS={threads} {cli['command'].replace(str(SHARED), '../shared')}`: **{cli['seconds']:.0f} s** wall, process start to "
            f"written directory (1-min load average {cli['load_before'][0]:.1f} before, {cli['load_after'][0]:.1f} after). "
            f"Its output evaluated by `blockquant eval`: liver {d['liver']:.4f}, tumour {d['tumour']:.4f}.",
            f"CLI summary: `{cli['stdout']}`",
        ]
    parts += ["", "## Checks", "", *checks(rows, cli)]
    return "\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--threads", type=int, default=1, help="torch threads per row (OMP_NUM_THREADS) [1]")
    p.add_argument("--fresh", action="store_true", help="ignore rows cached by an earlier run")
    p.add_argument("--no-cli", action="store_true", help="skip the timed CLI run")
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    if not SUBJECT.is_dir() or not DATA.is_file():
        print(f"skipped: {SUBJECT} or {DATA} is missing (benchmarks need the shared subjects)")
        return
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    cache = cache_path("unet.json")
    saved = json.loads(cache.read_text()) if cache.is_file() and not args.fresh else {}
    rows, cli = saved.get("rows", {}), saved.get("cli")
    for label in ["FP"] + [r for r in args.rows if r != "FP"]:
        if label in rows:
            continue
        rows[label] = run_child(Path(__file__), [label])
        r = rows[label]
        print(f"{label:28s} liver {r['dice']['liver']:.4f} tumour {r['dice']['tumour']:.4f} {r.get('seconds', 0):7.1f}s", flush=True)
        cache.write_text(json.dumps({"rows": rows, "cli": cli}, indent=1))
        write_result("unet", "EfficientQ on a MONAI 3-D U-Net (lits-unet)", render(rows, cli, args.threads))
    if not args.no_cli and cli is None:
        cli = cli_timing(args.threads)
        print(f"CLI W2 ADMM: {cli['seconds']:.1f}s, Dice {cli['dice']}", flush=True)
        cache.write_text(json.dumps({"rows": rows, "cli": cli}, indent=1))
    write_result("unet", "EfficientQ on a MONAI 3-D U-Net (lits-unet)", render(rows, cli, args.threads))
    print("\n" + render(rows, cli, args.threads))


if __name__ == "__main__":
    main()
