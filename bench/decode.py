"""CPU decoding of packed W4 models: tokens/s, effective weight bandwidth, memory, logits.

    python bench/decode.py [--threads 2] [--prompt 128] [--new-tokens 128] [--subjects synthetic-1b llama-code]

Subjects: a synthetic Llama of ~1 B parameters (hidden 2048, 16 layers, 16 heads, MLP 5632,
vocab 32000, untied head; random weights from seed 0, built in memory in bf16) and
``../shared/subjects/llama-code`` (bf16; skipped without ``../shared``). Each is quantized with
RTN W4 g128 sym on the bf16 grid (RTN needs no calibration: ``calibration=None``) and exported
compressed-tensors with bf16 scales. Rows, each in a fresh process with ``--threads`` torch
threads: the bf16 model (``from_pretrained``), the export loaded with ``blockquant.load`` (bf16
activations; CPU int4 kernel), the same with the kernels off (``set_cpu_kernels(model,
False)``: unpack + dequantize + matmul in plain torch every call), and the ceiling: the bf16
model with the linears the export packs replaced by ones that cost nothing (``free_linears``),
the tokens/s that no format of those weights can exceed. Every row runs in rounds over the rows
(so that a slow spell of a shared machine falls on all of them), ``--repeats`` rounds at least and
more until every row has generated for ``--min-seconds`` (a small model's run lasts a second), and
shows its median run.

Greedy decoding at batch 1 with the KV cache: a random ``--prompt``-token prompt, then
``--new-tokens`` tokens (``min_new_tokens`` = ``max_new_tokens``). *tokens/s* = new tokens /
wall time of ``generate`` (prefill included); *decode tokens/s* = the steps after the first /
(that time − one timed prefill forward). *Weight bytes per token*: what one decoding step must
read of the model's weights — every quantized linear's packed tensors (int32 words + bf16
scales + uint8 zero points) or bf16 weight, the head, the norms and one embedding row; not the
KV cache. *Effective bandwidth* = weight bytes per token × decode tokens/s, also as a fraction of
a memory copy measured here with the same threads (``dst.copy_(src)`` of 512 MiB, bytes read +
written, best of 5). *Peak RSS*: the process's high-water mark (imports included).

The logits check runs the prompt through the export four ways: kernels on, off, every packed layer
computed exactly from its bf16 activations (fp32 dequantization and matmul, the output rounded to
bf16, as the kernel rounds its fp32 sums), and in fp32 (plain torch, every product exact in fp32):
relative L2 difference of the logits, the largest over the prompt's positions. Bf16 activations
set a floor there that no kernel can go under: the exact-layers run differs from the others
because of where each sum's rounding falls. So it also compares every packed layer's kernel output
with the exact computation on the same input (the prompt's activations, then one token's).

Writes ``bench/results/decode.md``, replaced on every run; ``--reuse`` rewrites it from the rows
of the last run (``bench/cache/decode.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SHARED, cache_path, markdown_table, run_child, write_result  # noqa: E402

LLAMA_CODE = SHARED / "subjects" / "llama-code"
SYNTHETIC = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
SUBJECTS = ("synthetic-1b", "llama-code")
ROWS = {
    "bf16": "bf16 model",
    "fast": "packed W4 g128, CPU kernel",
    "plain": "packed W4 g128, kernels off",
    "ceiling": "bf16 model, decoder linears at zero cost (the ceiling)",
}
SPEEDUP_TARGET, BANDWIDTH_TARGET, LOGITS_TARGET = 2.0, 0.5, 1e-3


def prepare(subject: str, work: str) -> dict:
    """Write the bf16 model (synthetic only) and its RTN W4 g128 export under ``work``."""
    import torch
    import transformers

    from blockquant import QuantSpec, parse_recipe, quantize, save_packed

    root = Path(work) / subject
    done = root / "prepared.json"
    if done.is_file():  # --work DIR from an earlier run
        return json.loads(done.read_text())
    root.mkdir(parents=True, exist_ok=True)
    if subject == "synthetic-1b":
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**SYNTHETIC)
        model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
        model.save_pretrained(root / "bf16")
        bf16 = root / "bf16"
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(LLAMA_CODE, dtype=torch.bfloat16).eval()
        bf16 = LLAMA_CODE
    params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    result = quantize(model, parse_recipe("rtn", QuantSpec(bits=4, group_size=128, sym=True)), None, progress=False)
    save_packed(model, result, root / "packed")
    paths = {"bf16": str(bf16), "packed": str(root / "packed"), "params": params, "quantize_s": time.perf_counter() - t0}
    done.write_text(json.dumps(paths))
    return paths


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decoding step reads: linears (packed or dense), norms, one embedding row."""
    from torch import nn

    from blockquant.export.qlinear import QuantLinear

    total = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += sum(t.numel() * t.element_size() for t in (module.qweight, module.scales, module.zeros, module.bias) if t is not None)
        elif isinstance(module, nn.Embedding):
            total += module.embedding_dim * module.weight.element_size()
        else:  # nn.Linear, norms: every parameter the module owns
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return total


def _load(row: str, path: str):
    import torch
    import transformers

    import blockquant
    from blockquant.export.qlinear import set_cpu_kernels

    if row in ("bf16", "ceiling"):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        return free_linears(model) if row == "ceiling" else model
    model = blockquant.load(path)
    set_cpu_kernels(model, row == "fast")
    return model


def free_linears(model):
    """``model`` with every linear but the head replaced by one that costs nothing (it returns zeros).

    The linears replaced are those the W4 export packs, so its decoding steps keep every other
    cost (embedding, norms, attention, the head, the Python around them): the tokens/s no
    weight format of those linears can exceed."""
    import torch
    from torch import nn

    class Free(nn.Module):
        def __init__(self, out_features: int) -> None:
            super().__init__()
            self.out_features = out_features

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.new_zeros(*x.shape[:-1], self.out_features)

    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and module is not head:
            model.set_submodule(name, Free(module.out_features))
    return model


PROFILE_GROUPS = {
    "low-bit kernels": ("aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm"),
    "dense matmuls": ("aten::mm", "aten::addmm"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math"),
}


def step_profile(model, prompt, steps: int = 4) -> dict:
    """Shares of a decoding step's self CPU time (torch profiler, ``steps`` steps after a prefill)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        out = model(prompt, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                out = model(token, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
    times = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(times.values())
    return {group: sum(times.get(k, 0) for k in keys) / total for group, keys in PROFILE_GROUPS.items()}


def measure(row: str, path: str, threads: int, prompt_len: int, new_tokens: int) -> dict:
    """One row: load, warm up (the CPU kernels convert their weights here), time prefill and generate."""
    import torch

    from blockquant.export.qlinear import QuantLinear

    torch.set_num_threads(threads)
    load_avg = os.getloadavg()[0]
    model = _load(row, path)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    gen = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=2, min_new_tokens=2, **gen)
        t0 = time.perf_counter()
        model(prompt)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **gen)
        seconds = time.perf_counter() - t0
    assert out.shape[1] == prompt_len + new_tokens, out.shape
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return {
        "tok_s": new_tokens / seconds,
        "decode_tok_s": (new_tokens - 1) / max(seconds - prefill, 1e-9),
        "prefill_s": prefill,
        "weight_bytes": weight_bytes_per_token(model),
        "peak_mb": _peak_rss_mb(),
        "kernel_layers": sum(m._cpu_cache is not None and m._cpu_cache[1] is not None for m in layers),
        "layers": len(layers),
        "load_avg": load_avg,
        "profile": step_profile(model, prompt),
    }


def exact_linear(module, x):
    """A packed layer computed as exactly as its activations' dtype allows: the weights
    dequantized in fp32 (``s·(q − z)`` has no rounding there), an fp32 matmul of the activations,
    the output rounded once to their dtype, as the CPU kernel rounds its fp32 sums."""
    import torch
    import torch.nn.functional as F

    bias = None if module.bias is None else module.bias.float()
    return F.linear(x.float(), module.dequantize(torch.float32), bias).to(x.dtype)


def logits_check(path: str, threads: int, prompt_len: int) -> dict:
    """Relative L2 differences of the prompt's logits with the kernels on, off (bf16), with every
    packed layer computed by ``exact_linear`` (bf16 activations) and in fp32; and of every packed
    layer's output with the kernel against ``exact_linear`` on the same input (the prompt, then
    one token), the largest over the layers."""
    import types

    import torch

    import blockquant
    from blockquant.export.qlinear import QuantLinear, set_cpu_kernels

    def rel(a, b) -> float:
        a, b = a.float(), b.float()
        return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())

    torch.set_num_threads(threads)
    model = blockquant.load(path)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    per_layer = []

    def against_exact(module, args, out) -> None:
        if module.uses_cpu_kernel(args[0]):  # the layers the kernel multiplies (the table counts them)
            per_layer.append(rel(out, exact_linear(module, args[0])))

    with torch.no_grad():
        handles = [m.register_forward_hook(against_exact) for m in layers]
        fast = model(prompt).logits[0].float()  # (T, V)
        model(prompt[:, :1])
        for h in handles:
            h.remove()
        set_cpu_kernels(model, False)
        plain = model(prompt).logits[0].float()
        for m in layers:
            m.forward = types.MethodType(exact_linear, m)
        exact_bf16 = model(prompt).logits[0].float()
        del model
        exact = blockquant.load(path, torch.float32)(prompt).logits[0]
    return {
        "fast_vs_plain": rel(fast, plain),
        "fast_vs_fp32": rel(fast, exact),
        "plain_vs_fp32": rel(plain, exact),
        "fast_vs_exact_bf16": rel(fast, exact_bf16),
        "plain_vs_exact_bf16": rel(plain, exact_bf16),
        "layer_fast_vs_exact": max(per_layer),
        "layer_calls": len(per_layer),
    }


def copy_bandwidth(threads: int) -> dict:
    """Bytes read + written per second by ``dst.copy_(src)`` of 512 MiB, best of 5."""
    import torch

    torch.set_num_threads(threads)
    src = torch.ones(512 * 2**20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return {"copy_gbs": 2 * src.numel() / best / 1e9}


def kernel_alone(threads: int, cols: int = 2048, out: int = 5632) -> dict:
    """One W4 g128 layer at one token: the CPU kernel (``QuantLinear.forward``) and bf16 ``F.linear``.

    Weight copies are rotated over more than 512 MiB, so that no call finds its weight in cache."""
    import torch
    import torch.nn.functional as F

    from blockquant.export.qlinear import QuantLinear

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, cols, generator=gen).to(torch.bfloat16)

    def packed() -> QuantLinear:
        qweight = torch.randint(-(2**31), 2**31 - 1, (out, cols // 8), dtype=torch.int32, generator=gen)
        scales = (torch.rand(out, cols // 128, generator=gen) * 0.01 + 1e-3).to(torch.bfloat16)
        return QuantLinear(cols, out, 4, 128, True, qweight, scales, torch.full((out, cols // 128), 8, dtype=torch.uint8)).eval()

    def seconds(calls: list) -> float:
        for c in calls:
            c()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for c in calls:
                c()
            best = min(best, (time.perf_counter() - t0) / len(calls))
        return best

    with torch.no_grad():
        layers = [packed() for _ in range(512 * 2**20 // (out * cols // 2) + 1)]
        assert layers[0].uses_cpu_kernel(x)
        kernel_s = seconds([lambda m=m: m(x) for m in layers])
        del layers
        dense = [torch.randn(out, cols, generator=gen).to(torch.bfloat16) for _ in range(512 * 2**20 // (out * cols * 2) + 1)]
        dense_s = seconds([lambda w=w: F.linear(x, w) for w in dense])
    packed_bytes = out * cols // 2 + out * cols // 128 * 3
    return {
        "shape": f"{cols}→{out}",
        "kernel_us": kernel_s * 1e6,
        "kernel_gbs": packed_bytes / kernel_s / 1e9,
        "dense_us": dense_s * 1e6,
        "dense_gbs": out * cols * 2 / dense_s / 1e9,
    }


def subject_rows(subject: str, work: str, args: argparse.Namespace) -> dict:
    """Every row in rounds (bf16, fast, plain, ceiling, bf16, …) so that a slow spell of the machine
    falls on every row alike: ``args.repeats`` rounds, then more rounds of the rows that have not yet
    generated for ``args.min_seconds``; each row keeps its median run."""
    script = Path(__file__).resolve()
    common = ["--threads", str(args.threads), "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens)]
    paths = run_child(script, ["prepare", subject, work, *common])
    runs: dict[str, list[dict]] = {row: [] for row in ROWS}

    def timed(row: str) -> float:  # seconds of generation measured so far
        return sum(args.new_tokens / m["tok_s"] for m in runs[row])

    while len(runs["bf16"]) < args.repeats or min(timed(row) for row in ROWS) < args.min_seconds:
        for row in [r for r in ROWS if len(runs["bf16"]) < args.repeats or timed(r) < args.min_seconds]:
            runs[row].append(run_child(script, ["measure", row, paths["bf16" if row in ("bf16", "ceiling") else "packed"], *common]))
            print(f"{subject} {row}: {runs[row][-1]['tok_s']:.2f} tok/s", flush=True)
    rows = {}
    for row, measured in runs.items():
        ordered = sorted(measured, key=lambda m: m["tok_s"])
        rows[row] = {**ordered[(len(ordered) - 1) // 2], "runs_tok_s": [m["tok_s"] for m in measured]}
    return {"paths": paths, "rows": rows, "logits": run_child(script, ["logits", paths["packed"], *common])}


def report(results: dict, copy: dict, kernel: dict, args: argparse.Namespace, skipped: list[str]) -> str:
    headers = [
        "model",
        "tokens/s (median)",
        "each run",
        "vs bf16",
        "decode tokens/s",
        "prefill (s)",
        "weight MiB / token",
        "effective GB/s",
        "of copy bandwidth",
        "peak RSS (MiB)",
    ]
    kern, cores = kernel, os.cpu_count() or 1
    busy = max(m["load_avg"] for r in results.values() for m in r["rows"].values())
    contended = (
        f" The other jobs on this machine kept its load average at up to {busy:.1f} on {cores} cores, so every row runs on "
        f"{args.threads} thread(s): more would compete with them for the cores."
        if args.threads < cores and busy > cores - args.threads
        else ""
    )
    parts = [
        f"Batch 1, greedy, KV cache: {args.prompt}-token random prompt, {args.new_tokens} new tokens, {args.threads} torch "
        f"thread(s); every row runs in rounds over the rows, {args.repeats} at least and more until each has generated for "
        f"{args.min_seconds:g} s, and shows its median run. Memory copy: {copy['copy_gbs']:.1f} GB/s (read + written, {args.threads} thread(s)). Exports: RTN W4 g128 "
        f"sym, bf16 scales, compressed-tensors; `blockquant.load` with bf16 activations.{contended}",
        f"One layer alone ({kern['shape']}, W4 g128, one token, weights rotated through 512 MiB so that none is cached): the CPU "
        f"int4 kernel {kern['kernel_us']:.0f} µs = {kern['kernel_gbs']:.1f} GB/s of packed bytes ({kern['kernel_gbs'] / copy['copy_gbs']:.0%} "
        f"of the copy); bf16 `F.linear` {kern['dense_us']:.0f} µs = {kern['dense_gbs']:.1f} GB/s ({kern['dense_gbs'] / copy['copy_gbs']:.0%}).",
    ]
    for subject, r in results.items():
        rows, bf16 = [], r["rows"]["bf16"]
        for key, label in ROWS.items():
            m = r["rows"][key]
            gbs = m["weight_bytes"] * m["decode_tok_s"] / 1e9
            on_kernel = f" ({m['kernel_layers']} of {m['layers']} linears)" if key == "fast" else ""
            rows.append(
                [
                    label + on_kernel,
                    f"{m['tok_s']:.2f}",
                    ", ".join(f"{v:.2f}" for v in m["runs_tok_s"]),
                    f"{m['tok_s'] / bf16['tok_s']:.2f}×",
                    f"{m['decode_tok_s']:.2f}",
                    f"{m['prefill_s']:.2f}",
                    *(
                        ["-"] * 3
                        if key == "ceiling"
                        else [f"{m['weight_bytes'] / 2**20:.0f}", f"{gbs:.2f}", f"{gbs / copy['copy_gbs']:.0%}"]
                    ),
                    f"{m['peak_mb']:.0f}",
                ]
            )
        fast, lg = r["rows"]["fast"], r["logits"]
        speedup, ceiling = fast["tok_s"] / bf16["tok_s"], r["rows"]["ceiling"]["tok_s"] / bf16["tok_s"]
        rounds = ", ".join(f"{a / b:.2f}×" for a, b in zip(fast["runs_tok_s"], bf16["runs_tok_s"]))
        share = fast["weight_bytes"] * fast["decode_tok_s"] / 1e9 / copy["copy_gbs"]
        loads = ", ".join(f"{r['rows'][k]['load_avg']:.1f}" for k in ROWS)
        shares = "; ".join(
            f"{label}: "
            + ", ".join(f"{g} {v:.0%}" for g, v in r["rows"][key]["profile"].items())
            + f", the rest {1 - sum(r['rows'][key]['profile'].values()):.0%}"
            for key, label in ROWS.items()
        )
        parts += [
            f"## {subject} ({r['paths']['params'] / 1e6:.0f} M parameters)",
            markdown_table(headers, rows),
            f"Logits on the prompt (largest relative L2 difference over its {args.prompt} positions): CPU kernel vs kernels off "
            f"{lg['fast_vs_plain']:.2e}; against the same export computed in fp32: CPU kernel {lg['fast_vs_fp32']:.2e}, kernels "
            f"off {lg['plain_vs_fp32']:.2e}; against every packed layer computed exactly from bf16 activations (fp32 "
            f"dequantization and matmul, the output rounded to bf16 as the kernel rounds its sums): CPU kernel "
            f"{lg['fast_vs_exact_bf16']:.2e}, kernels off {lg['plain_vs_exact_bf16']:.2e}. Layer by layer, on the same inputs "
            f"(the prompt, then one token: {lg['layer_calls']} calls), the kernel's outputs are within "
            f"{lg['layer_fast_vs_exact']:.2e} of that exact computation"
            + f". 1-minute load average when each row started: {loads} (2 cores).",
            f"Where a decoding step's time goes (torch profiler, self CPU time of 4 steps after the prompt): {shares}.",
            "Targets:\n"
            f"- tokens/s ≥ {SPEEDUP_TARGET:.0f}× the bf16 model's: {speedup:.2f}× — {'met' if speedup >= SPEEDUP_TARGET else 'MISSED'} (round by round: {rounds}; the ceiling, every "
            f"other cost of a step kept and the decoder's linears free: {ceiling:.2f}×)\n"
            f"- effective bandwidth ≥ {BANDWIDTH_TARGET:.0%} of the memory copy: {share:.0%} — "
            f"{'met' if share >= BANDWIDTH_TARGET else 'MISSED'} (the int4 kernel alone: {kern['kernel_gbs'] / copy['copy_gbs']:.0%} "
            f"of the copy, and {fast['profile']['low-bit kernels']:.0%} of a decoding step's time)\n"
            f"- logits within {LOGITS_TARGET:g} relative of the kernels-off path: {lg['fast_vs_plain']:.2e} — "
            f"{'met' if lg['fast_vs_plain'] <= LOGITS_TARGET else 'MISSED'} (from the fp32 computation of the same export: "
            f"kernels off {lg['plain_vs_fp32']:.2e}, CPU kernel {lg['fast_vs_fp32']:.2e}; layer by layer against exact "
            f"dequantize + matmul: {lg['layer_fast_vs_exact']:.2e} — "
            f"{'met' if lg['layer_fast_vs_exact'] <= LOGITS_TARGET else 'MISSED'})",
        ]
    parts += [f"{s}: skipped ({LLAMA_CODE} is missing: ../shared is not available)." for s in skipped]
    return "\n\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help="torch threads of every measurement [2]")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens [128]")
    p.add_argument("--new-tokens", type=int, default=128, help="generated tokens [128]")
    p.add_argument("--subjects", nargs="+", default=list(SUBJECTS), choices=SUBJECTS)
    p.add_argument("--repeats", type=int, default=3, help="runs of every row, in rounds; each row keeps its median [3]")
    p.add_argument(
        "--min-seconds", type=float, default=10.0, help="more rounds until every row has generated this long (small models) [10]"
    )
    p.add_argument("--work", help="directory for the checkpoints, kept and reused (default: a temporary one, removed at the end)")
    p.add_argument("--reuse", action="store_true", help="rewrite the report from the last run's rows (bench/cache/decode.json)")
    args = p.parse_args()
    if args.one:
        job, *rest = args.one
        if job == "prepare":
            result = prepare(*rest)
        elif job == "measure":
            result = measure(rest[0], rest[1], args.threads, args.prompt, args.new_tokens)
        elif job == "logits":
            result = logits_check(rest[0], args.threads, args.prompt)
        elif job == "kernel":
            result = kernel_alone(args.threads)
        else:
            result = copy_bandwidth(args.threads)
        print(json.dumps(result))
        return
    subjects = [s for s in args.subjects if s != "llama-code" or LLAMA_CODE.is_dir()]
    skipped = [s for s in args.subjects if s not in subjects]
    cache = cache_path("decode.json")
    if args.reuse:  # the rows of the last run, with the arguments and the command line it ran with
        saved = json.loads(cache.read_text())
        vars(args).update(saved["args"])
        sys.argv = saved["argv"]
    else:
        script = Path(__file__).resolve()
        saved = {"args": {k: vars(args)[k] for k in ("threads", "prompt", "new_tokens", "repeats", "min_seconds")}, "argv": sys.argv}
        saved["copy"] = run_child(script, ["copy", "--threads", str(args.threads)])
        saved["kernel"] = run_child(script, ["kernel", "--threads", str(args.threads)])
        with tempfile.TemporaryDirectory(prefix="bq-decode-") as tmp:
            saved["results"] = {s: subject_rows(s, args.work or tmp, args) for s in subjects}
        cache.write_text(json.dumps(saved, indent=1))
    body = report(saved["results"], saved["copy"], saved["kernel"], args, skipped)
    import torch

    torch.set_num_threads(args.threads)  # the results header names the threads of the rows
    print(body)
    print(f"-> {write_result('decode', 'CPU decoding of packed W4 models', body)}")


if __name__ == "__main__":
    main()
