"""Out-of-core quantization of a 7B-shaped Llama on one GPU: peak CUDA memory against one block -> bench/results/gpu.md.

    python bench/gpu.py [--threads 16] [--steps 50] [--dtype float32]

Without a CUDA device it prints ``skipped: no CUDA device`` and exits 0 (no results file).
Builds (once, into bench/scale-work/, as bench/scale.py builds its models) a synthetic Llama of
the 7B shape — hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32000, untied head, N(0, 0.02)
weights from seed 0, bf16 shards ≤ 1 GB, a generated tokenizer and calibration text — then runs,
each in a child process, ``blockquant quantize --device cuda --load blocks --offload-activations cpu``
(the calibration streams wait in host memory, one batch at a time on the GPU):

- ``gptq`` W4 g128, and
- ``gptq,blockft`` W2 g64 with ``--steps`` optimizer steps per block (a short schedule),

on 32 × 512 calibration tokens. It reports blockquant.json's peak CUDA memory against the goal
one block in fp32 + one batch of activations (batch × seqlen × hidden fp32, the block's input)
+ 2 GiB, and seconds per block.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import markdown_table, write_result  # noqa: E402
from bench.scale import NSAMPLES, SEQLEN, WORK, Shape, build_model, calibration_file, child_env, run_measured, shlex_join  # noqa: E402

SHAPE = Shape("llama-4096x32", 4096, 32, 32, 32, 11008)
SMOKE = Shape("llama-256x2", 256, 2, 4, 4, 1024)
BATCH = 8  # blockquant quantize --batch-size default
CONFIGS = [("gptq", 4, 128), ("gptq,blockft", 2, 64)]


def block_parameters(shape: Shape) -> int:
    head_dim = shape.hidden // shape.heads
    attn = 2 * shape.hidden * shape.hidden + 2 * shape.hidden * head_dim * shape.kv_heads
    return attn + 3 * shape.hidden * shape.mlp + 2 * shape.hidden


def bound_mb(shape: Shape) -> tuple[float, str]:
    """The goal for peak CUDA memory (MiB), and how it is made up."""
    block = 4 * block_parameters(shape) / 2**20
    batch = 4 * BATCH * SEQLEN * shape.hidden / 2**20
    text = f"one block in fp32 ({block:.0f} MiB) + one batch of activations ({BATCH} × {SEQLEN} × {shape.hidden} fp32, {batch:.0f} MiB) + 2048 MiB"
    return block + batch + 2048, text


def run_one(
    model_dir: Path, calib: Path, recipe: str, bits: int, group: int, steps: int, dtype: str, threads: int, device: str = "cuda"
) -> dict:
    name = f"{model_dir.name}-{recipe.replace(',', '+')}-w{bits}g{group}-{device}"
    out = WORK / "out" / name
    out.parent.mkdir(exist_ok=True)
    for stale in (out, out.parent / f".{name}.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "blockquant",
        "quantize",
        str(model_dir),
        "--recipe",
        recipe,
        "--wbits",
        str(bits),
        "--group-size",
        str(group),
    ]
    cmd += ["--calib", str(calib), "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN), "--output", str(out)]
    cmd += ["--load", "blocks", "--device", device, "--dtype", dtype, "--batch-size", str(BATCH), "--offload-activations", "cpu"]
    cmd += ["--steps", str(steps)] if "blockft" in recipe else []
    log = WORK / f"{name}.log"
    r = run_measured(cmd, child_env(threads), log)
    if r["rc"]:
        raise RuntimeError(f"{shlex_join(cmd)} failed ({r['rc']}):\n{log.read_text()[-3000:]}")
    record = json.loads((out / "blockquant.json").read_text())
    shutil.rmtree(out)
    return r | {
        "recipe": recipe,
        "bits": bits,
        "group": group,
        "peak_cuda_mb": record["peak_cuda_mb"],
        "quantize_s": record["seconds"],
        "block_s": sum(b["seconds"] for b in record["blocks"]) / len(record["blocks"]),
        "command": shlex_join(cmd),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=16, help="OMP_NUM_THREADS of every child [16]")
    p.add_argument("--steps", type=int, default=50, help="blockft optimizer steps per block [50]")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype [float32]")
    p.add_argument("--cpu-smoke", action="store_true", help="check this script's plumbing on a 2-layer toy on CPU (no results file)")
    args = p.parse_args()
    import torch

    if args.cpu_smoke:
        model_dir, calib = build_model(SMOKE), calibration_file()
        for recipe, bits, group in CONFIGS:
            r = run_one(model_dir, calib, recipe, bits, group, 2, args.dtype, 2, "cpu")
            print(f"{recipe} W{bits} g{group}: {r['quantize_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MiB, peak CUDA {r['peak_cuda_mb']}")
        return
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return
    WORK.mkdir(parents=True, exist_ok=True)
    model_dir, calib = build_model(SHAPE), calibration_file()
    bound, bound_text = bound_mb(SHAPE)
    print(f"goal: peak CUDA ≤ {bound:.0f} MiB = {bound_text}", flush=True)
    rows = []
    for recipe, bits, group in CONFIGS:
        print(f"{recipe} W{bits} g{group} ...", flush=True)
        rows.append(run_one(model_dir, calib, recipe, bits, group, args.steps, args.dtype, args.threads))
        r = rows[-1]
        print(f"  peak CUDA {r['peak_cuda_mb']:.0f} MiB, {r['quantize_s']:.0f} s, {r['block_s']:.1f} s/block", flush=True)
    table = markdown_table(
        [
            "recipe",
            "bits",
            "group",
            "blockft steps",
            "peak CUDA MiB",
            "goal MiB",
            "met",
            "peak RSS MiB",
            "seconds total",
            "quantize s",
            "s / block",
        ],
        [
            [
                r["recipe"],
                str(r["bits"]),
                str(r["group"]),
                str(args.steps) if "blockft" in r["recipe"] else "-",
                f"{r['peak_cuda_mb']:.0f}",
                f"{bound:.0f}",
                "yes" if r["peak_cuda_mb"] <= bound else "NO",
                f"{r['peak_rss_mb']:.0f}",
                f"{r['wall_s']:.0f}",
                f"{r['quantize_s']:.0f}",
                f"{r['block_s']:.1f}",
            ]
            for r in rows
        ],
    )
    body = "\n\n".join(
        [
            f"Synthetic Llama, {SHAPE.describe()} ({block_parameters(SHAPE) / 1e6:.0f} M parameters a block); bf16 shards ≤ 1 GB, "
            f"N(0, 0.02) weights, seed 0. Calibration {NSAMPLES} × {SEQLEN} tokens of generated text (seed 0), batch {BATCH}, "
            f"compute dtype {args.dtype}, {torch.cuda.get_device_name()}. Goal: peak CUDA memory ≤ {bound_text} = {bound:.0f} MiB.",
            "Each row runs, e.g.: `" + rows[0]["command"] + "`",
            table,
        ]
    )
    print("\n" + body)
    print(f"\nwritten to {write_result('gpu', 'Out-of-core quantization on one GPU: peak CUDA memory', body)}")


if __name__ == "__main__":
    main()
