"""How fast blockquant quantizes llama-code, against llm-compressor and AutoRound -> bench/results/speed.md.

    python bench/speed.py [--parts gptq rtn blockft profile] [--threads 2] [--seeds 0] [--max-windows N] [--fresh]
    python bench/speed.py --profile [--package-root DIR]

Subject ``../shared/subjects/llama-code`` (bf16 checkpoint). Calibration: 128 windows of 512
tokens of data/code/calib.txt drawn once per seed with ``blockquant.files.load_calibration`` and
saved to bench/cache/speed-calib-128x512-seed<S>.safetensors; every tool gets exactly those token ids.
Every row is one child process with ``--threads`` threads (OMP_NUM_THREADS and
``torch.set_num_threads``); *seconds* is the wall time of the quantization call alone (no model
load, no export, no evaluation); *peak RSS* is the child's own VmHWM when the call returns.
Every output is scored the same way in the main environment: blockquant's model in memory,
the peers' compressed-tensors checkpoints loaded with ``AutoModelForCausalLM.from_pretrained``
in fp32, each with ``blockquant.evaluate.perplexity`` on the 512-token windows of
data/code/eval.txt (``--max-windows N``: the first N of its 501 only).

Parts:
- ``gptq``: blockquant ``gptq`` W4 g128 (symmetric, bf16 scales) vs llm-compressor ``oneshot`` with
  ``GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], dampening_frac=0.01)``; blockquant
  in four variants (``GPTQ_VARIANTS``): fp32 or bf16 compute, ``true_sequential`` on (the default) or off.
- ``rtn``: blockquant ``rtn`` W4 g128 without calibration data.
- ``blockft``: blockquant ``gptq,blockft`` with its defaults, and with its training under bf16 autocast
  (``BLOCKFT_VARIANTS``), vs AutoRound with its defaults (200 iterations) at W3 g128 and W2 g64, symmetric.
- ``profile`` (also ``--profile``): cProfile of one blockquant ``gptq`` W4 g128 run, summarised
  into cost categories and the top functions. ``--package-root DIR`` profiles the blockquant of
  another checkout instead (``DIR/blockquant``), kept as the "before" profile beside this
  checkout's "after" one.

The peers run in their own virtual environment (bench/peers.py). Rows are cached in
bench/cache/speed.json, so an interrupted run resumes and later runs of other parts keep the
rows measured before with the same settings. ``--fresh`` measures the requested parts again
but keeps a "before" profile, which only ``--package-root`` measures again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import peers  # noqa: E402
from bench.common import ROOT, SHARED, cache_path, calibration_shape, markdown_table, run_child, subject_paths, write_result  # noqa: E402

SUBJECT = "llama-code"
SEQLEN = 512
PARTS = ("gptq", "rtn", "blockft", "profile")
BLOCKFT = ((3, 128), (2, 64))  # (bits, group) of the fine-tuning part
# The blockquant GPTQ rows: (GPTQ options, compute dtype). "true_sequential false": every linear group's
# Hessian from one pass over the block (as llm-compressor), instead of each group's from a pass over the
# block with the groups before it already quantized (the default). "bf16 compute": the model loaded in
# its checkpoint's bf16 (as the peers load it; blockquant's command line: --dtype bfloat16), not fp32.
ONE_PASS = "gptq (true_sequential false)"
BF16 = "gptq (bf16 compute)"
FAST = "gptq (bf16 compute, true_sequential false)"
GPTQ_VARIANTS = {
    "gptq": ({}, "float32"),
    ONE_PASS: ({"true_sequential": False}, "float32"),
    BF16: ({}, "bfloat16"),
    FAST: ({"true_sequential": False}, "bfloat16"),
}
# The blockquant block-wise FT rows: (training options of the blockft step, compute dtype). "bf16 autocast": its
# training forwards and backwards under torch.autocast(bfloat16), as AutoRound trains on CPU; "bf16 compute": the
# model loaded in its checkpoint's bf16, as AutoRound loads it (the fine-tuning's trained parameters,
# fake-quantization, optimizer and losses stay fp32, as does GPTQ's arithmetic).
AMP = "gptq,blockft (bf16 autocast)"
BF16_FT = "gptq,blockft (bf16 compute)"
BLOCKFT_VARIANTS = {"gptq,blockft": ({}, "float32"), AMP: ({"autocast": "bfloat16"}, "float32"), BF16_FT: ({}, "bfloat16")}
PAIRS = {m: ("blockquant", "llm-compressor") for m in GPTQ_VARIANTS} | {m: ("blockquant", "AutoRound") for m in BLOCKFT_VARIANTS}


def row_method(tool: str, method: str) -> str:
    """The method a tool's row is stored under: a peer's GPTQ row serves both blockquant GPTQ variants."""
    if tool == "blockquant":
        return method
    return "gptq" if method in GPTQ_VARIANTS else "gptq,blockft" if method in BLOCKFT_VARIANTS else method
PEER_METHODS = {"llm-compressor": "oneshot GPTQModifier W4A16", "AutoRound": "SignRound, its defaults"}
GPTQ_RATIO = 0.8  # check: blockquant gptq time / llm-compressor time at most this, perplexity no worse
RTN_SECONDS = 5.0  # check: data-free RTN W4 g128 within this
TOP = 10  # functions listed per profile
# The profile's cost categories: (label, [(file suffix, function name), ...]). A category's time is the time spent in its
# functions when called from outside the category (cProfile's per-caller cumulative time), so nested calls count once.
CAPTURE, GPTQ = "blockquant/capture.py", "blockquant/methods/gptq.py"
CATEGORIES = (
    (
        "block forwards: targets and propagation (`capture.run_block`, `api._advance_in_place`)",
        [(CAPTURE, "run_block"), ("blockquant/api.py", "_advance_in_place")],
    ),
    ("Hessian passes (`capture.collect_hessians`)", [(CAPTURE, "collect_hessians")]),
    (
        "GPTQ per weight: H⁻¹ and column sweep (`gptq.gptq_quantize`, `gptq_quantize_group`)",
        [(GPTQ, "gptq_quantize"), (GPTQ, "gptq_quantize_group"), (GPTQ, "_sweep")],
    ),
    ("  of which the column sweep (`gptq._sweep`)", [(GPTQ, "_sweep")]),
    ("  of which the range search (`primitives.clip_search`)", [("blockquant/primitives.py", "clip_search")]),
)
SUB = "  "  # a category label starting with this is part of the one above (not added to the total)
WRAPPERS = ("torch/utils/_contextlib.py", "torch/nn/modules/module.py")  # generic call wrappers left out of the top list


# --------------------------------------------------------------------------------------------
# Children


def vmhwm_mb() -> float:
    return peers.peak_rss_mb()


def calib_file(seed: int, nsamples: int) -> Path:
    return cache_path(f"speed-calib-{nsamples}x{SEQLEN}-seed{seed}.safetensors")


def draw_calibration(seed: int, nsamples: int) -> Path:
    """The calibration token ids of one seed, drawn once with blockquant and saved for every tool."""
    path = calib_file(seed, nsamples)
    if not path.is_file():
        import torch
        from safetensors.torch import save_file

        from blockquant.files import load_calibration, load_tokenizer

        model_dir, calib_path, _ = subject_paths(SUBJECT)
        ids = load_calibration(calib_path, load_tokenizer(model_dir), nsamples, SEQLEN, seed, False)
        save_file({"input_ids": ids.to(torch.long).contiguous()}, str(path))
    return path


def _score(model, max_windows: int | None) -> float:
    from blockquant.evaluate import perplexity
    from blockquant.files import load_tokenizer, read_text, tokenize_stream

    model_dir, _, eval_path = subject_paths(SUBJECT)
    ids = tokenize_stream(load_tokenizer(model_dir), read_text(eval_path, "evaluation"))
    return perplexity(model, ids, SEQLEN, max_windows, progress=False)


def _recipe(method: str, bits: int, group: int, steps: int | None):
    import dataclasses

    from blockquant import QuantSpec, parse_recipe

    spec = QuantSpec(bits=bits, group_size=group, sym=True, scale_dtype="bfloat16")
    if method in GPTQ_VARIANTS:
        from blockquant.recipe import Recipe, make_step

        return Recipe(spec, (make_step("gptq", GPTQ_VARIANTS[method][0]),))
    recipe = parse_recipe("gptq,blockft" if method in BLOCKFT_VARIANTS else method, spec)
    train = dict(BLOCKFT_VARIANTS.get(method, ({}, None))[0]) | ({} if steps is None else {"steps": steps})
    replaced = [
        dataclasses.replace(s, options=dataclasses.replace(s.options, train=dataclasses.replace(s.options.train, **train)))
        if hasattr(s.options, "train")
        else s
        for s in recipe.steps
    ]
    return dataclasses.replace(recipe, steps=tuple(replaced))


def one_blockquant(method: str, bits: int, group: int, seed: int, nsamples: int, max_windows: int | None, steps: int | None) -> dict:
    """Quantize with blockquant (fp32 compute, as its command line, unless the row says bf16) and score
    the model in memory in fp32."""
    import torch
    from safetensors.torch import load_file

    from blockquant import quantize
    from blockquant.files import load_model

    dtype = (GPTQ_VARIANTS | BLOCKFT_VARIANTS).get(method, ({}, "float32"))[1]
    model, _ = load_model(subject_paths(SUBJECT)[0], getattr(torch, dtype))
    calibration = None if method == "rtn" else load_file(str(calib_file(seed, nsamples)))["input_ids"]
    torch.manual_seed(seed)
    load = os.getloadavg()[0]
    recipe = _recipe(method, bits, group, steps)
    result = quantize(model, recipe, calibration, progress=False)
    peak, load = vmhwm_mb(), [load, os.getloadavg()[0]]
    if dtype != "float32":
        _checkpoint_weights(model, result, recipe.spec)
    return {"seconds": result.seconds, "peak_rss_mb": peak, "load": load, "ppl": _score(model, max_windows), "dtype": dtype}


def _checkpoint_weights(model, result, spec) -> None:
    """The model in fp32 with the weights a checkpoint of it holds, ``s·(q − z)`` in fp32, rather
    than their rounding to the bf16 the quantization ran in."""
    from blockquant.layers import set_weight_matrix, weight_matrix
    from blockquant.primitives import dequantize, quantize

    model.float()
    for name, r in result.layers.items():
        layer = model.get_submodule(name)
        scale, zero = r.scale.float(), r.zero.float()
        set_weight_matrix(layer, dequantize(quantize(weight_matrix(layer).float(), scale, zero, spec), scale, zero, spec))


def one_fp(max_windows: int | None) -> dict:
    from blockquant.files import load_model

    model, _ = load_model(subject_paths(SUBJECT)[0])
    return {"ppl": _score(model, max_windows), "peak_rss_mb": vmhwm_mb()}


def one_score(out_dir: str, max_windows: int | None) -> dict:
    """A peer's compressed-tensors checkpoint, loaded by transformers + compressed-tensors in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    return {"ppl": _score(model, max_windows)}


def one_profile(seed: int, nsamples: int, package_root: str, dump: str) -> dict:
    """cProfile of one blockquant ``gptq`` W4 g128 run (``package_root``: that checkout's blockquant);
    the whole profile goes to ``dump`` (``python -m pstats DUMP`` reads it)."""
    if package_root != "-":
        sys.path.insert(0, package_root)
    import cProfile
    import pstats

    import torch
    from safetensors.torch import load_file

    import blockquant
    from blockquant import quantize
    from blockquant.files import load_model

    where = Path(blockquant.__file__).resolve()
    expected = Path(package_root if package_root != "-" else ROOT).resolve()
    if not where.is_relative_to(expected):
        raise RuntimeError(f"profiled blockquant is {where}, not the one under {expected}")
    model, _ = load_model(subject_paths(SUBJECT)[0])
    calibration = load_file(str(calib_file(seed, nsamples)))["input_ids"]
    recipe = _recipe("gptq", 4, 128, None)
    torch.manual_seed(seed)
    profiler = cProfile.Profile()
    load = os.getloadavg()[0]
    start = time.perf_counter()
    profiler.enable()
    quantize(model, recipe, calibration, progress=False)
    profiler.disable()
    total = time.perf_counter() - start
    load = [load, os.getloadavg()[0]]
    profiler.dump_stats(dump)
    return {
        "seconds": total,
        "load": load,
        "categories": categories(pstats.Stats(profiler), total),
        "top": top_functions(pstats.Stats(profiler)),
    }


def _where(key: tuple[str, int, str]) -> str:
    file, line, name = key
    if file == "~":  # a builtin
        return name
    for marker in ("blockquant/", "torch/", "transformers/"):
        if marker in file:
            file = marker + file.rsplit(marker, 1)[1]
            break
    return f"{file}:{line}({name})"


def categories(stats, total: float) -> list[list]:
    """[label, seconds] per cost category; the last is everything else."""
    rows, counted = [], 0.0
    for label, functions in CATEGORIES:
        members = {k for k in stats.stats if any(k[0].endswith(f) and k[2] == name for f, name in functions)}
        if not members:  # e.g. a function an older checkout does not have
            rows.append([label, None])
            continue
        seconds = sum(c[3] for key in members for caller, c in stats.stats[key][4].items() if caller not in members)
        rows.append([label, seconds])
        if not label.startswith(SUB):
            counted += seconds
    rows.append(["everything else", total - counted])
    return rows


def top_functions(stats) -> list[list]:
    """The TOP functions by cumulative time, less the quantize call itself and generic call wrappers:
    [function, calls, own seconds, cumulative seconds]."""
    items = []
    for key, (_cc, nc, tt, ct, _callers) in stats.stats.items():
        if any(key[0].endswith(w) for w in WRAPPERS) or key[2] in ("quantize", "<method 'disable' of '_lsprof.Profiler' objects>"):
            continue
        items.append([_where(key), nc, tt, ct])
    items.sort(key=lambda r: -r[3])
    return items[:TOP]


# --------------------------------------------------------------------------------------------
# The parent: jobs, cache, tables


def checkout_label(root: Path) -> str:
    """The commit of a checkout, with "+ changes" when its blockquant/ differs from it."""

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" + changes" if git("status", "--porcelain", "--", "blockquant") else "")


def settings_key(args: argparse.Namespace) -> str:
    return f"t{args.threads}/w{args.max_windows or 'all'}/n{args.nsamples}/i{args.iters or 'default'}"


def row_key(tool: str, method: str, bits: int, group: int, seed: int | str, args: argparse.Namespace) -> str:
    return f"{tool}/{method}/W{bits}g{group}/seed{seed}/{settings_key(args)}"


def profile_key(which: str, args: argparse.Namespace) -> str:
    return f"profile/{which}/t{args.threads}/n{args.nsamples}"


def windows_arg(args: argparse.Namespace) -> str:
    return "-" if args.max_windows is None else str(args.max_windows)


def measure_blockquant(method: str, bits: int, group: int, seed: int, args: argparse.Namespace) -> dict:
    steps = "-" if args.iters is None else str(args.iters)
    child = ["blockquant", method, str(bits), str(group), str(seed), str(args.nsamples), windows_arg(args), steps]
    return run_child(Path(__file__), [*child, "--threads", str(args.threads)]) | {"tool": "blockquant", "commit": checkout_label(ROOT)}


def measure_peer(tool: str, bits: int, group: int, seed: int, args: argparse.Namespace) -> dict:
    """Quantize in the peer environment, then score its checkpoint here."""
    model_dir = subject_paths(SUBJECT)[0]
    ids = str(calib_file(seed, args.nsamples))
    out = cache_path("speed-out") / f"{tool}-W{bits}g{group}-seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    log = cache_path("speed-logs")
    log.mkdir(exist_ok=True)
    log = log / f"{tool}-W{bits}g{group}-seed{seed}.log"
    if tool == "llm-compressor":
        row = peers.run_peer(["llmcompressor", model_dir, ids, str(out)], args.threads, log)
    else:
        iters = [] if args.iters is None else [str(args.iters)]
        row = peers.run_peer(["autoround", model_dir, ids, str(out), str(bits), str(group), *iters], args.threads, log)
    row |= run_child(Path(__file__), ["score", str(out), windows_arg(args), "--threads", str(args.threads)])
    shutil.rmtree(out, ignore_errors=True)
    return row | {"tool": tool}


def jobs(args: argparse.Namespace) -> list[tuple[str, ...]]:
    """(key, kind, ...) of every row the requested parts need, in running order."""
    out: list[tuple] = []
    if set(args.parts) & {"gptq", "rtn", "blockft"}:
        out.append((f"fp/{settings_key(args)}", "fp"))
    for seed in args.seeds:
        if "gptq" in args.parts:
            for method in GPTQ_VARIANTS:
                out.append((row_key("blockquant", method, 4, 128, seed, args), "blockquant", method, 4, 128, seed))
            out.append((row_key("llm-compressor", "gptq", 4, 128, seed, args), "llm-compressor", "gptq", 4, 128, seed))
    if "rtn" in args.parts:
        out.append((row_key("blockquant", "rtn", 4, 128, "-", args), "blockquant", "rtn", 4, 128, 0))
    for seed in args.blockft_seeds:
        if "blockft" in args.parts:
            for bits, group in args.blockft_widths:
                for method in BLOCKFT_VARIANTS:
                    out.append((row_key("blockquant", method, bits, group, seed, args), "blockquant", method, bits, group, seed))
                out.append((row_key("AutoRound", "gptq,blockft", bits, group, seed, args), "AutoRound", "gptq,blockft", bits, group, seed))
    if "profile" in args.parts:
        which = "before" if args.package_root else "after"
        out.append((profile_key(which, args), "profile", which))
    return out


def run_job(job: tuple, args: argparse.Namespace) -> dict:
    kind = job[1]
    if kind == "fp":
        return run_child(Path(__file__), ["fp", windows_arg(args), "--threads", str(args.threads)])
    if kind == "profile":
        root = Path(args.package_root).resolve() if args.package_root else ROOT
        dump = cache_path(f"speed-profile-{job[2]}.prof")
        child = ["profile", str(args.seeds[0]), str(args.nsamples), str(root) if args.package_root else "-", str(dump)]
        row = run_child(Path(__file__), [*child, "--threads", str(args.threads)])
        return row | {"checkout": checkout_label(root), "seed": args.seeds[0]}
    _, tool, method, bits, group, seed = job
    if tool == "blockquant":
        return measure_blockquant(method, bits, group, seed, args)
    return measure_peer(tool, bits, group, seed, args) | {"versions": peers.versions()}


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def speed_table(rows: dict, args: argparse.Namespace) -> tuple[str, list[str]]:
    """The perplexity / time table and the checks' lines."""
    fp = rows[f"fp/{settings_key(args)}"]["ppl"]
    lines = [["FP (bf16 checkpoint, fp32 compute)", "-", "16", "-", "-", f"{fp:.4f}", "-", "-", "-", "-", "-"]]
    checks = []
    def measured(t: str, m: str, b: int, g: int, seeds: list = args.seeds) -> bool:
        return all(row_key(t, row_method(t, m), b, g, s, args) in rows for s in seeds)

    groups = []
    groups += [(m, 4, 128, args.seeds) for m in GPTQ_VARIANTS if measured("blockquant", m, 4, 128)]
    if row_key("blockquant", "rtn", 4, 128, "-", args) in rows:
        groups.append(("rtn", 4, 128, ["-"]))
    groups += [(m, b, g, args.blockft_seeds) for b, g in BLOCKFT for m in BLOCKFT_VARIANTS if measured("blockquant", m, b, g, args.blockft_seeds)]
    peers_shown = set()  # a peer's rows once, below the blockquant rows compared with them
    for method, bits, group, seeds in groups:
        tools = [t for t in PAIRS.get(method, ("blockquant",)) if measured(t, method, bits, group, seeds)]
        runs = {t: [rows[row_key(t, row_method(t, method), bits, group, s, args)] for s in seeds] for t in tools}
        peer = next((t for t in tools if t != "blockquant"), None)
        later = groups[groups.index((method, bits, group, seeds)) + 1 :]
        last_of_pair = not any(PAIRS.get(m, ())[1:] == (peer,) and (b, g) == (bits, group) for m, b, g, _ in later)
        for tool in tools:
            if tool != "blockquant" and ((tool, bits, group) in peers_shown or not last_of_pair):
                continue
            peers_shown.add((tool, bits, group))
            shown = list(zip(seeds, runs[tool])) + ([("mean", None)] if len(seeds) > 1 else [])
            for i, (seed, r) in enumerate(shown):
                rs = runs[tool] if r is None else [r]
                ppl, secs = _mean([x["ppl"] for x in rs]), _mean([x["seconds"] for x in rs])
                ratio = "-"
                if tool == "blockquant" and peer is not None:
                    theirs = runs[peer] if r is None else [runs[peer][i]]
                    ratio = f"{secs / _mean([x['seconds'] for x in theirs]):.2f}"
                peak = max(x["peak_rss_mb"] for x in rs)
                cells = [f"{ppl:.4f}", f"{ppl - fp:+.4f}", f"{secs:.{1 if secs >= 10 else 2}f}", f"{peak:.0f}", ratio, _load(rs)]
                lines.append([tool, PEER_METHODS.get(tool, method), str(bits), str(group), str(seed), *cells])
        checks += check_lines(method, bits, group, runs)
        if method in GPTQ_VARIANTS and method != "gptq" and measured("blockquant", "gptq", bits, group):
            checks[-1] = checks[-1][:-1] + "; " + _paired("gptq", method, bits, group, args, rows)
    headers = [
        "tool",
        "method",
        "bits",
        "group",
        "seed",
        "perplexity",
        "Δ vs FP",
        "quantize s",
        "peak RSS MiB",
        "blockquant / peer time",
        "load",
    ]
    return markdown_table(headers, lines), checks


def _paired(base: str, method: str, bits: int, group: int, args: argparse.Namespace, rows: dict) -> str:
    """Perplexity of ``method`` minus ``base``'s on the same calibration draws: mean ± spread."""
    diffs = [
        rows[row_key("blockquant", method, bits, group, s, args)]["ppl"] - rows[row_key("blockquant", base, bits, group, s, args)]["ppl"]
        for s in args.seeds
    ]
    spread = f" ± {statistics.stdev(diffs):.4f}" if len(diffs) > 1 else ""
    return f"perplexity vs blockquant `{base}` on the same draws {_mean(diffs):+.4f}{spread}."


def _load(rs: list[dict]) -> str:
    """The machine's 1-minute load average at the start and the end of the quantization call(s)."""
    if any("load" not in r for r in rs):
        return "-"
    return f"{min(r['load'][0] for r in rs):.1f}–{max(r['load'][1] for r in rs):.1f}"


def _verdict(problems: list[str]) -> str:
    return "met" if not problems else "not met: " + " and ".join(problems)


def check_lines(method: str, bits: int, group: int, runs: dict[str, list[dict]]) -> list[str]:
    mean = {t: (_mean([r["ppl"] for r in rs]), _mean([r["seconds"] for r in rs])) for t, rs in runs.items()}
    bq_ppl, bq_s = mean["blockquant"]
    if method == "rtn":
        ok = bq_s <= RTN_SECONDS
        return [f"- RTN W4 g128 without calibration within {RTN_SECONDS:.0f} s: **{'met' if ok else 'not met'}** ({bq_s:.2f} s)."]
    peer = PAIRS[method][1]
    if peer not in mean:
        return []
    p_ppl, p_s = mean[peer]
    ratio = bq_s / p_s
    if method in GPTQ_VARIANTS:
        problems = [
            what for what, bad in ((f"time ratio above {GPTQ_RATIO}", ratio > GPTQ_RATIO), ("perplexity worse", bq_ppl > p_ppl)) if bad
        ]
        return [
            f"- {'GPTQ' if method == 'gptq' else method} W4 g128, blockquant time / llm-compressor time ≤ {GPTQ_RATIO} with perplexity no worse: "
            f"**{_verdict(problems)}** — {bq_s:.1f} s vs {p_s:.1f} s (ratio {ratio:.2f}), "
            f"perplexity {bq_ppl:.4f} vs {p_ppl:.4f} ({bq_ppl - p_ppl:+.4f})."
        ]
    problems = [what for what, bad in (("perplexity not better", bq_ppl >= p_ppl), ("slower", bq_s > p_s)) if bad]
    verdict = _verdict(problems)
    return [
        f"- W{bits} g{group}, blockquant `{method}` better perplexity than AutoRound at no more time: **{verdict}** — "
        f"perplexity {bq_ppl:.4f} vs {p_ppl:.4f} ({bq_ppl - p_ppl:+.4f}), {bq_s:.0f} s vs {p_s:.0f} s (ratio {ratio:.2f})."
    ]


def profile_tables(rows: dict, args: argparse.Namespace) -> str:
    sides = [(w, rows[profile_key(w, args)]) for w in ("before", "after") if profile_key(w, args) in rows]
    if not sides:
        return ""
    headers = ["cost category"]
    for which, r in sides:
        headers += [f"{which} ({r['checkout']}) s", f"{which} %"]
    lines = []
    for label in [c[0] for c in CATEGORIES] + ["everything else"]:
        cells = [label.replace(SUB, "↳ ", 1) if label.startswith(SUB) else label]
        for _, r in sides:
            seconds = dict(r["categories"]).get(label)
            cells += ["-", "-"] if seconds is None else [f"{seconds:.1f}", f"{seconds / r['seconds']:.0%}"]
        lines.append(cells)
    total = ["total (the quantize call under the profiler)"]
    for _, r in sides:
        total += [f"{r['seconds']:.1f}", "100%"]
    lines.append(total)
    load = ["machine load (1-minute average, start–end)"]
    for _, r in sides:
        load += [_load([r]), ""]
    lines.append(load)
    out = [markdown_table(headers, lines)]
    for which, r in sides:
        top = [[f"`{f}`", str(n), f"{tt:.1f}", f"{ct:.1f}"] for f, n, tt, ct in r["top"]]
        out.append(
            f"Top {TOP} functions by cumulative time, {which} ({r['checkout']}):\n\n"
            + markdown_table(["function", "calls", "own s", "cumulative s"], top)
        )
    return "\n\n".join(out)


def note(rows: dict, args: argparse.Namespace) -> str:
    import transformers

    main_tf = transformers.__version__
    versions = next((r["versions"] for k, r in rows.items() if "versions" in r and k.endswith(settings_key(args))), None)
    windows = f"the first {args.max_windows} of its 501 eval windows" if args.max_windows else "all 501 eval windows"
    text = (
        f"Subject llama-code (bf16 checkpoint, 12.6 M parameters). Calibration: the same {args.nsamples} × {SEQLEN}-token windows "
        f"of data/code/calib.txt for every tool (seed{'s' if len(args.seeds) > 1 else ''} {', '.join(map(str, args.seeds))}; the "
        f"fine-tuning rows: seed{'s' if len(args.blockft_seeds) > 1 else ''} {', '.join(map(str, args.blockft_seeds))}; drawn by "
        "`blockquant.files.load_calibration`). Perplexity: blockquant's `evaluate.perplexity` on "
        f"{windows} (512 tokens), fp32 compute for every row: blockquant's model in memory after `quantize`, the peers' "
        f"compressed-tensors checkpoints loaded by transformers {main_tf} + compressed-tensors in fp32. *quantize s*: wall time of the "
        "quantization call alone (blockquant `quantize` → `result.seconds`; llm-compressor `oneshot`; AutoRound "
        "`AutoRound(...)` + `quantize()`), without loading, export or evaluation; *peak RSS*: the child process's VmHWM when "
        f"the call returns (loading included). Every row is its own process with {args.threads} thread"
        f"{'s' if args.threads > 1 else ''} (OMP_NUM_THREADS and `torch.set_num_threads`), on a machine shared with other jobs. "
        "*blockquant / peer time*: blockquant's seconds over the peer's on the same calibration; *load*: the machine's "
        f"1-minute load average at the start and the end of the call: the machine has {os.cpu_count()} cores, and a load above "
        "them means other jobs competed for them and stretched the seconds.\n\n"
        "blockquant: fp32 compute (its command line's default), symmetric grid with bf16 scales "
        f'(`QuantSpec(bits, group_size, sym=True, scale_dtype="bfloat16")`), default options. '
        "Methods: `gptq` W4 g128; `gptq (true_sequential false)`: the same with every linear group's Hessian from one pass "
        "over the block, as llm-compressor does (the default takes each group's from its own pass, the groups before it "
        "already quantized); `gptq (bf16 compute…)`: the same two with the model loaded in its checkpoint's bf16, as the "
        "peers load it (`--dtype bfloat16` on the command line; GPTQ's own arithmetic stays fp32), scored in fp32 with the "
        "weights its checkpoint holds; `rtn` W4 g128 without calibration data; `gptq,blockft` (GPTQ, then block-wise "
        "fine-tuning with its defaults) at W3 g128 and W2 g64, and `gptq,blockft (bf16 autocast)`: the same with the "
        "fine-tuning's forwards and backwards under `torch.autocast(bfloat16)` (option `autocast: bfloat16`), as AutoRound "
        "trains on CPU, and `gptq,blockft (bf16 compute)`: the model loaded in its checkpoint's bf16, as AutoRound loads "
        "it (`--dtype bfloat16`; the trained parameters, fake-quantization, optimizer and losses stay fp32), scored like "
        "the GPTQ bf16 rows.\n\n"
    )
    if versions:
        text += (
            f"Peers, in their own virtual environment (bench/peers.py): llm-compressor {versions['llmcompressor']} and AutoRound "
            f"{versions['auto_round']} with transformers {versions['transformers']} — the newest llmcompressor allows "
            f"(≤ 5.17), where blockquant runs with transformers {main_tf} — and torch {versions['torch']}, the same torch as "
            "blockquant. Both load the checkpoint in its dtype (bf16), as their examples do. llm-compressor: `oneshot` with "
            '`GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], dampening_frac=0.01)` (W4 g128 symmetric), '
            "its defaults otherwise (batch 1). AutoRound: `AutoRound(model, tokenizer, bits, group_size, sym=True, "
            'dataset=<the token ids in batches of 8>, nsamples=N, seqlen=512, device_map="cpu")` with its defaults '
            "(200 iterations, its learning rate, batch 8; on CPU it trains under bf16 autocast and compiles each block with "
            "`torch.compile`, whose compile time is inside its seconds), saved in its `llm_compressor` format.\n"
        )
    return text


def provenance(rows: dict, args: argparse.Namespace) -> str:
    """When each part's rows were measured and on which blockquant (rows of earlier runs come from the cache)."""
    parts = []
    for part, methods in (("gptq", tuple(GPTQ_VARIANTS)), ("rtn", ("rtn",)), ("blockft", tuple(BLOCKFT_VARIANTS))):
        found = [r for k, r in rows.items() if k.endswith(settings_key(args)) and k.split("/")[1] in methods]
        if found:
            dates = ", ".join(sorted({r["date"] for r in found}))
            commits = ", ".join(sorted({r["commit"] for r in found if "commit" in r}))
            parts.append(f"{part} {dates} (blockquant {commits})")
    return "Measured: " + "; ".join(parts) + "."


def write_tables(rows: dict, args: argparse.Namespace) -> str:
    body = [note(rows, args)]
    if f"fp/{settings_key(args)}" in rows:
        table, checks = speed_table(rows, args)
        body.append(table)
        if checks:
            body.append("Checks:\n\n" + "\n".join(checks))
        body.append(provenance(rows, args))
    profiles = profile_tables(rows, args)
    if profiles:
        body.append(
            "## Where the time goes: blockquant `gptq` W4 g128 under cProfile\n\n"
            f"One run on calibration seed {args.seeds[0]}, {args.threads} thread{'s' if args.threads > 1 else ''}. A category "
            "counts the time spent in its functions called from outside it (nested calls once); the profiler's own cost "
            "inflates the Python-heavy parts, so the total is above the unprofiled time of the table above. Seconds scale with the "
            "machine's load: where the two profiles ran under different loads, compare the shares. The top list "
            "leaves out the `quantize` call itself and generic call wrappers (torch's `no_grad` decorator, `Module.__call__`).\n\n"
            + profiles
        )
    return "\n\n".join(body)


def _width(text: str) -> tuple[int, int]:
    """``3g128`` -> (3, 128)."""
    bits, _, group = text.partition("g")
    try:
        return int(bits), int(group)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BITSgGROUP such as 3g128, got {text!r}") from None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--profile", action="store_true", help="the profile part only (same as --parts profile)")
    p.add_argument("--package-root", help="profile the blockquant of another checkout (DIR/blockquant) as the 'before' profile")
    p.add_argument("--threads", type=int, default=2, help="threads of every child [2]")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="calibration draws [0]")
    p.add_argument("--blockft-seeds", nargs="+", type=int, default=[0], help="calibration draws of the blockft part [0]")
    p.add_argument(
        "--blockft-widths",
        nargs="+",
        type=_width,
        default=list(BLOCKFT),
        metavar="BITSgGROUP",
        help="the widths of the blockft part [3g128 2g64]; rows measured before at other widths stay in the table",
    )
    p.add_argument("--max-windows", type=int, help="perplexity on the first N of the 501 eval windows only [all]")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="measure the requested parts again, not from bench/cache/speed.json ('before' profile: only with --package-root)",
    )
    p.add_argument("--iters", type=int, help=argparse.SUPPRESS)  # trial runs: fine-tuning steps / AutoRound iterations
    p.add_argument("--nsamples", type=int, default=calibration_shape(SUBJECT)[0], help=argparse.SUPPRESS)  # trial runs
    args = p.parse_args()
    os.environ.update(
        OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1"
    )
    import torch

    torch.set_num_threads(args.threads)
    if args.one:
        kind, *rest = args.one
        windows = lambda s: None if s == "-" else int(s)  # noqa: E731
        if kind == "fp":
            row = one_fp(windows(rest[0]))
        elif kind == "score":
            row = one_score(rest[0], windows(rest[1]))
        elif kind == "profile":
            row = one_profile(int(rest[0]), int(rest[1]), rest[2], rest[3])
        else:
            method, bits, group, seed, nsamples, max_windows, steps = rest
            row = one_blockquant(
                method, int(bits), int(group), int(seed), int(nsamples), windows(max_windows), None if steps == "-" else int(steps)
            )
        print(json.dumps(row))
        return 0
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} (reference subjects and data) is missing")
        return 0
    if args.profile:
        args.parts = ["profile"]
    if args.package_root and not (Path(args.package_root) / "blockquant" / "__init__.py").is_file():
        p.error(f"--package-root {args.package_root} holds no blockquant/__init__.py; give a checkout of this repository")
    cache = cache_path("speed.json")
    rows = json.loads(cache.read_text()) if cache.is_file() else {}
    todo = jobs(args)
    for job in todo:  # --fresh: the requested parts again, but a "before" profile needs the other checkout
        if (args.fresh and job[2:] != ("before",)) or (args.package_root and job[2:] == ("before",)):
            rows.pop(job[0], None)
    if any(j[1] in ("llm-compressor", "AutoRound") for j in todo if j[0] not in rows):
        print(f"peer environment: {peers.ensure_venv()}", flush=True)
    for seed in sorted(set(args.seeds) | set(args.blockft_seeds)):
        draw_calibration(seed, args.nsamples)
    for job in todo:
        if job[0] in rows:
            continue
        start = time.perf_counter()
        rows[job[0]] = run_job(job, args) | {"date": time.strftime("%Y-%m-%d")}
        r = rows[job[0]]
        shown = ", ".join(f"{k} {r[k]:.4f}" for k in ("ppl", "seconds") if k in r)
        print(f"{job[0]}: {shown} ({time.perf_counter() - start:.0f} s in all)", flush=True)
        cache.write_text(json.dumps(rows, indent=1))
    body = write_tables(rows, args)
    if args.iters is not None or args.nsamples != calibration_shape(SUBJECT)[0]:
        print(f"{body}\n\n(trial settings: bench/results/speed.md not written)")
        return 0
    path = write_result("speed", "Quantization speed on llama-code: blockquant vs llm-compressor and AutoRound", body)
    print(f"{body}\n\nwrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
