"""Packed export of llama-code: size, load time, memory, CPU speed, independent-client perplexity.

    python bench/export.py [--max-windows 40] [--nsamples 32] [--recipe gptq]

For W4 g128 sym and asym W3 g128: quantize ``../shared/subjects/llama-code`` (fp32 compute,
``--nsamples`` random 512-token calibration windows of ``data/code/calib.txt``, seed 0), export
compressed-tensors pack-quantized in bf16 (the subject's dtype), then measure perplexity on the
first ``--max-windows`` 512-token windows of ``data/code/eval.txt`` three ways: blockquant's
in-memory fake-quant model, ``blockquant.load`` of the export, and transformers +
compressed-tensors in a process that never imports blockquant. Load time, resident memory and
tokens/s (batch 1, bf16 activations) compare the bf16 subject with the packed W4 export, each in
a fresh process. The scales are rounded to bf16 before any code is computed
(``QuantSpec(scale_dtype="bfloat16")``), so the in-memory model and the export are the same
weights. With a CUDA device, ``bench/w4a16.py`` adds the Triton kernel's batch-1 bandwidth and
speed-up (else one "skipped: no CUDA device" line). Writes ``bench/results/export.md``, replaced
on every run; the llama-code part skips cleanly without ``../shared``.

W4 g128 is the command line's default grid (symmetric), which plain
``AutoModelForCausalLM.from_pretrained`` loads; W3 g128 is asymmetric, which transformers loads
with ``CompressedTensorsConfig(dequantize=True)`` (docs/formats.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import w4a16  # noqa: E402
from bench.common import SHARED, markdown_table, run_child, write_result  # noqa: E402

SUBJECT = SHARED / "subjects" / "llama-code"
DATA = SHARED / "data" / "code"
CONFIGS = {"W4 g128 sym": (4, 128, True), "W3 g128 asym": (3, 128, False)}
TOLERANCE_PERCENT = 0.1
SIZE_TARGET = 0.3


def _rss_mb() -> float:
    """Current resident memory (Linux /proc), not the peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _perplexity_plain(model, ids, seqlen: int, max_windows: int) -> float:
    """The shared protocol, written without blockquant (the client process uses it)."""
    import torch
    import torch.nn.functional as F

    n = min(ids.numel() // seqlen, max_windows)
    total = 0.0
    with torch.no_grad():
        for w in ids[: n * seqlen].view(n, seqlen).split(8):
            logits = model(input_ids=w, use_cache=False).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"))
    return math.exp(total / (n * (seqlen - 1)))


def quantize_and_export(name: str, out: str, recipe: str, nsamples: int, max_windows: int) -> dict:
    """Quantize, export, and evaluate blockquant's own two views of the result."""
    import torch

    from blockquant import QuantSpec, load, parse_recipe, quantize, save_packed
    from blockquant.evaluate import perplexity
    from blockquant.files import load_calibration, load_model, read_text, tokenize_stream

    bits, group, sym = CONFIGS[name]
    torch.manual_seed(0)
    model, tokenizer = load_model(SUBJECT)
    calibration = load_calibration(DATA / "calib.txt", tokenizer, nsamples, 512, seed=0)
    spec = QuantSpec(bits, group, sym, scale_dtype="bfloat16")  # the export's dtype, not the fp32 compute dtype
    result = quantize(model, parse_recipe(recipe, spec), calibration, progress=False)
    save_packed(model, result, out, tokenizer=tokenizer, dtype=torch.bfloat16)
    ids = tokenize_stream(tokenizer, read_text(DATA / "eval.txt", "evaluation"))
    row = {"quantize_s": result.seconds, "fake_quant_ppl": perplexity(model, ids, 512, max_windows, progress=False)}
    loaded = load(out, torch.float32)
    row["weights_equal"] = all(torch.equal(loaded.get_submodule(n).dequantize(), model.get_submodule(n).weight) for n in result.layers)
    row["packed_ppl"] = perplexity(loaded, ids, 512, max_windows, progress=False)
    row["scale_rounding"] = json.loads((Path(out) / "blockquant.json").read_text())["export"]["scale_rounding"]
    return row


def client_perplexity(out: str, sym: bool, max_windows: int) -> dict:
    """transformers + compressed-tensors only. Asymmetric checkpoints need dequantize=True: in
    compressed mode transformers allocates the zero points unpacked and refuses the packed ones."""
    import compressed_tensors
    import torch
    import transformers

    kwargs = {} if sym else {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)}
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kwargs).eval()
    load_s = time.perf_counter() - t0
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = torch.tensor(tokenizer((DATA / "eval.txt").read_text(), verbose=False)["input_ids"])
    ppl = _perplexity_plain(model, ids, 512, max_windows)
    if any(m == "blockquant" or m.startswith("blockquant.") for m in sys.modules):
        raise RuntimeError("the client process imported blockquant")
    versions = f"transformers {transformers.__version__} + compressed-tensors {compressed_tensors.__version__}"
    return {"client_ppl": ppl, "client_load_s": load_s, "client_versions": versions}


def measure(kind: str, path: str, threads: int) -> dict:
    """Load time, resident memory and batch-1 CPU speed of the bf16 subject or the packed export."""
    import resource

    import torch
    import transformers

    import blockquant

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    load_avg = os.getloadavg()[0]  # the machine's 1-minute load: other jobs slow the speeds below
    # warm up the code paths a load touches (lazy imports, allocator) so the RSS delta is the model
    tiny = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    transformers.LlamaForCausalLM(tiny)(torch.arange(8)[None])
    before, peak_before = _rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if kind == "bf16":
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    else:
        model = blockquant.load(path, torch.bfloat16)
    load_s = time.perf_counter() - t0
    resident = _rss_mb() - before
    peak = max(0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - peak_before)
    tensor_mb = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 2**20
    prompt = torch.randint(0, model.config.vocab_size, (1, 64))
    window = torch.randint(0, model.config.vocab_size, (1, 512))
    with torch.no_grad():
        model(prompt, use_cache=False)  # touches every weight (a bf16 load maps its file lazily)
        used = _rss_mb() - before
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False)
        decode = 64 / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(3):
            model(window, use_cache=False)
        prefill = 3 * 512 / (time.perf_counter() - t0)
    return {
        "load_s": load_s,
        "rss_mb": resident,
        "used_mb": used,
        "peak_mb": peak,
        "tensor_mb": tensor_mb,
        "decode_tok_s": decode,
        "prefill_tok_s": prefill,
        "load_avg": load_avg,
    }


def disk_sizes(out: Path) -> dict:
    """Bytes of the quantized layers' packed tensors vs the same weights in bf16, from headers."""
    from safetensors import safe_open

    packed = dense = other = 0
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                t = st.get_slice(key)
                nbytes = math.prod(t.get_shape()) * {"I32": 4, "I64": 8, "BF16": 2, "F32": 4}[t.get_dtype()]
                if key.endswith(".weight_packed"):
                    out_f, in_f = st.get_tensor(key.replace("weight_packed", "weight_shape")).tolist()
                    dense += out_f * in_f * 2
                if key.rsplit(".", 1)[-1] in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"):
                    packed += nbytes
                else:
                    other += nbytes
    files = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
    return {
        "packed_bytes": packed,
        "dense_bf16_bytes": dense,
        "other_bytes": other,
        "files_bytes": files,
        "source_bytes": (SUBJECT / "model.safetensors").stat().st_size,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--max-windows", type=int, default=40, help="evaluation windows of 512 tokens [40 of 501]")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows of 512 tokens [32]")
    p.add_argument("--recipe", default="gptq", help="quantization recipe [gptq]")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the speed runs [1]")
    args = p.parse_args()
    if args.one:
        job, *rest = args.one
        if job == "quantize":
            print(json.dumps(quantize_and_export(rest[0], rest[1], args.recipe, args.nsamples, args.max_windows)))
        elif job == "client":
            print(json.dumps(client_perplexity(rest[0], rest[1] == "sym", args.max_windows)))
        elif job == "kernel":
            from bench import w4a16

            print(json.dumps(w4a16.measure()))
        else:
            print(json.dumps(measure(job, rest[0], args.threads)))
        return
    script = Path(__file__).resolve()
    kernel = run_child(script, ["kernel"])  # its own process: CUDA, when there is one, stays out of the CPU runs
    if not SUBJECT.is_dir():
        print(f"skipped: {SUBJECT} is missing (../shared is not available)")
        print(w4a16.report(kernel))
        return
    common = [
        "--max-windows",
        str(args.max_windows),
        "--nsamples",
        str(args.nsamples),
        "--recipe",
        args.recipe,
        "--threads",
        str(args.threads),
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bq-export-") as work:
        outs = {}
        for name, (_, _, sym) in CONFIGS.items():
            out = str(Path(work) / name.replace(" ", "-"))
            row = {"name": name, **run_child(script, ["quantize", name, out, *common])}
            row.update(run_child(script, ["client", out, "sym" if sym else "asym", *common]))
            row.update(disk_sizes(Path(out)))
            rows.append(row)
            outs[name] = out
        speed = {
            "bf16": run_child(script, ["bf16", str(SUBJECT), *common]),
            "packed": run_child(script, ["packed", outs["W4 g128 sym"], *common]),
        }
    body = report(rows, speed, kernel, args)
    print(body)
    print(f"-> {write_result('export', 'Packed export (compressed-tensors) of llama-code', body)}")


def _pct(a: float, b: float) -> float:
    return 100 * (a / b - 1)


def report(rows: list[dict], speed: dict, kernel: dict, args: argparse.Namespace) -> str:
    ppl_rows, size_rows, checks = [], [], []
    for r in rows:
        vs_packed, vs_fake = _pct(r["client_ppl"], r["packed_ppl"]), _pct(r["client_ppl"], r["fake_quant_ppl"])
        rounded = r["scale_rounding"]
        ppl_rows.append(
            [
                r["name"],
                f"{r['fake_quant_ppl']:.4f}",
                f"{r['packed_ppl']:.4f}",
                f"{r['client_ppl']:.4f}",
                f"{vs_packed:+.4f} %",
                f"{vs_fake:+.4f} %",
                f"{_pct(r['packed_ppl'], r['fake_quant_ppl']):+.4f} %",
                f"{'yes' if r['weights_equal'] else 'NO'} ({rounded['weights_changed']} moved)",
            ]
        )
        exact = r["weights_equal"] and r["packed_ppl"] == r["fake_quant_ppl"]
        checks.append(
            f"- {r['name']}: packed weights `torch.equal` to the fake-quant ones and identical perplexity — {'met' if exact else 'MISSED'}"
        )
        ratio = r["packed_bytes"] / r["dense_bf16_bytes"]
        size_rows.append(
            [
                r["name"],
                f"{r['dense_bf16_bytes'] / 2**20:.2f}",
                f"{r['packed_bytes'] / 2**20:.2f}",
                f"{ratio:.3f}×",
                f"{r['files_bytes'] / 2**20:.2f}",
                f"{r['source_bytes'] / 2**20:.2f}",
            ]
        )
        for label, dev in (("blockquant.load of the export", vs_packed), ("blockquant's in-memory fake-quant model", vs_fake)):
            checks.append(
                f"- {r['name']}: client perplexity vs {label}: {dev:+.4f} % — "
                f"{'within' if abs(dev) <= TOLERANCE_PERCENT else 'OUTSIDE'} ±{TOLERANCE_PERCENT} %"
            )
        if r["name"].startswith("W4"):
            checks.append(
                f"- {r['name']}: quantized layers on disk {ratio:.3f}× their bf16 size — "
                f"{'met' if ratio <= SIZE_TARGET else 'MISSED'} (target ≤ {SIZE_TARGET}×)"
            )
    s = speed
    speed_rows = [
        [
            k,
            f"{v['load_s']:.2f}",
            f"{v['rss_mb']:.1f}",
            f"{v['used_mb']:.1f}",
            f"{v['peak_mb']:.1f}",
            f"{v['tensor_mb']:.1f}",
            f"{v['decode_tok_s']:.1f}",
            f"{v['prefill_tok_s']:.0f}",
        ]
        for k, v in (("bf16 subject (transformers)", s["bf16"]), ("packed W4 g128 sym (blockquant.load, bf16 activations)", s["packed"]))
    ]
    return "\n\n".join(
        [
            f"Subject `llama-code`; recipe `{args.recipe}`, {args.nsamples} calibration windows of 512; perplexity on the first "
            f"{args.max_windows} of 501 eval windows (512 tokens), fp32 compute everywhere. Export: compressed-tensors "
            "pack-quantized, scales and unquantized tensors in bf16 (the subject's dtype). *fake-quant*: blockquant's model in "
            f"memory right after `quantize()`; *packed*: `blockquant.load` of the export; *client*: {rows[0]['client_versions']} "
            "in a process that never imports blockquant: plain `from_pretrained` for sym (the default grid), "
            "`CompressedTensorsConfig(dequantize=True)` for asym, which rounds the dequantized weights to bf16, hence its small "
            "gap to *packed* (see below). The grids are bf16 from "
            "the start (`QuantSpec(scale_dtype='bfloat16')`: every scale is rounded to bf16 before its codes are computed), so "
            "*packed* is the fake-quant model bit for bit: *weights equal* = every quantized layer's reloaded weight is "
            "`torch.equal` to the in-memory one (and how many weights storing the scales in bf16 moved: 0).",
            markdown_table(
                [
                    "scheme",
                    "fake-quant ppl",
                    "packed ppl",
                    "client ppl",
                    "client vs packed",
                    "client vs fake-quant",
                    "packed vs fake-quant",
                    "weights equal",
                ],
                ppl_rows,
            ),
            "Size on disk, from the safetensors headers (*quantized layers*: every Linear in the blocks; *packed* = int32 words "
            "+ bf16 scales + packed zero points + weight_shape):",
            markdown_table(
                ["scheme", "quantized layers bf16 (MiB)", "packed (MiB)", "ratio", "export files (MiB)", "bf16 subject file (MiB)"],
                size_rows,
            ),
            f"Load time, memory and speed, each in a fresh process ({args.threads} torch thread(s); the machine may be "
            f"shared with other jobs, so speeds are indicative: 1-minute load average {s['bf16']['load_avg']:.1f} and "
            f"{s['packed']['load_avg']:.1f} when the two runs started, on {os.cpu_count()} cores): *RSS load* = resident memory the load added (after a warm-up "
            "that pays lazy imports; transformers maps the bf16 file lazily, so little of it is resident yet); *RSS used* = the "
            "same after one 64-token forward has touched every weight; *peak* = rise of the process's peak RSS during the load; *tensors* = bytes of all "
            "parameters and buffers; *decode* = greedy generation of 64 tokens after a 64-token prompt, batch 1, KV cache; "
            "*prefill* = forward over three 512-token windows, batch 1. The packed model's 4-bit layers run PyTorch's int4 CPU "
            "kernel where it applies (bf16 activations, up to 128 tokens); other layers and calls unpack and dequantize the "
            "weight on every forward. bench/decode.py compares the two paths.",
            markdown_table(
                [
                    "model",
                    "load (s)",
                    "RSS load (MiB)",
                    "RSS used (MiB)",
                    "peak (MiB)",
                    "tensors (MiB)",
                    "decode (tok/s)",
                    "prefill (tok/s)",
                ],
                speed_rows,
            ),
            "Checks:\n" + "\n".join(checks),
            w4a16.report(kernel),
            f"Client note: in compressed mode, {rows[0]['client_versions']} refuse every asymmetric pack-quantized checkpoint "
            "(those compressed-tensors' own `ModelCompressor` writes included: they size `weight_zero_point` unpacked); "
            "`dequantize=True` loads them (docs/formats.md).",
        ]
    )


if __name__ == "__main__":
    main()
