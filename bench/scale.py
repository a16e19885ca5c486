"""Out-of-core quantization of a 1.4 B-parameter Llama on CPU: peak memory against the checkpoint -> bench/results/scale.md.

    python bench/scale.py [--layers 24 6] [--methods rtn gptq] [--dtypes float32 bfloat16]
                          [--threads 2] [--no-peer] [--peer-timeout 2400] [--reuse]

Builds (once, into bench/scale-work/, git-ignored) synthetic Llamas of one width — hidden 2048,
16 heads and 16 KV heads, MLP 5632, vocab 32000, untied head, N(0, 0.02) weights from seed 0 —
with 24 and 6 layers, saved as bf16 safetensors shards of at most 1 GB, with a byte-level BPE
tokenizer and a calibration text, both generated here. Each configuration runs
``python -m blockquant quantize MODEL --load blocks`` W4 g128 (RTN without calibration, which it
does not need; GPTQ with 32 × 512 calibration tokens) in a child process with
OMP_NUM_THREADS=--threads; its peak RSS is the child's own (``os.wait4``), seconds per block come
from the run's blockquant.json. The import footprint is the peak RSS of a child that only runs
``import torch, transformers, blockquant``.

Checks: peak RSS ≤ 25 % of the checkpoint + the import footprint; the 24-layer run's peak
≤ 1.1 × the 6-layer run's (same method and dtype).

Peer: llm-compressor's ``oneshot`` GPTQ (scheme W4A16: W4 g128 symmetric) on the 24-layer model
with the same calibration token ids, installed into bench/scale-work/peer-venv with
``pip install -c constraints.txt llmcompressor``; where it does not install, the row says why.
``--reuse`` takes rows measured before (bench/cache/scale.json) instead of running them again.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, cache_path, markdown_table, write_result  # noqa: E402

WORK = ROOT / "bench" / "scale-work"  # generated models, calibration, outputs, the peer's venv (git-ignored)
NSAMPLES, SEQLEN, BATCH = 32, 512, 8  # BATCH: blockquant quantize --batch-size default
# --diagnose: the 6-layer fp32 GPTQ run again with less calibration, then smaller batches: (samples, batch)
DIAGNOSE = [(8, 8), (8, 2)]
SHARD_BYTES = 10**9  # save_pretrained(max_shard_size="1GB")


@dataclass(frozen=True)
class Shape:
    """A Llama's shape; ``name`` is its directory under bench/scale-work/."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int = 32000

    def describe(self) -> str:
        return (
            f"hidden {self.hidden}, {self.layers} layers, {self.heads} heads / {self.kv_heads} KV heads, "
            f"MLP {self.mlp}, vocab {self.vocab}, untied head"
        )


SHAPES = {n: Shape(f"llama-2048x{n}", 2048, n, 16, 16, 5632) for n in (24, 6)}


# --------------------------------------------------------------------------------------------
# The synthetic model, tokenizer and calibration text (deterministic from the seed)

SYLLABLES = ["ka", "lo", "mi", "re", "su", "ta", "ne", "po", "di", "gu", "sha", "vel", "or", "in", "ex", "um"]


def make_text(n_words: int, seed: int = 0) -> str:
    """Deterministic text of pseudo-words with a skewed frequency, in lines of 14 words."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    weights = [1.0 / (i + 1) for i in range(len(vocab))]  # Zipf-like, as words are
    words = rng.choices(vocab, weights, k=n_words)
    return "\n".join(" ".join(words[i : i + 14]) + "." for i in range(0, n_words, 14)) + "\n"


def build_tokenizer(text: str, vocab_size: int = 4096):
    """A byte-level BPE trained on ``text`` (any text tokenizes; ids stay below the model's vocab)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def build_model(shape: Shape, seed: int = 0, directory: Path = WORK) -> Path:
    """``directory/shape.name``: the model as bf16 shards of at most 1 GB plus tokenizer (built once).

    Tensors are drawn one at a time (norms 1, every other weight N(0, 0.02) as transformers
    initialises a Llama) from a generator seeded by (seed, tensor index), and written shard by
    shard, so at most one shard is ever in memory; the directory appears only when complete.
    """
    import torch
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    path = directory / shape.name
    if (path / "model.safetensors.index.json").is_file():
        return path
    config = transformers.LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.mlp,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        initializer_range=0.02,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16
    with init_empty_weights():
        names = [(n, tuple(t.shape)) for n, t in transformers.LlamaForCausalLM(config).state_dict().items()]
    shards: list[list[tuple[int, str, tuple[int, ...]]]] = [[]]
    size = 0
    for i, (name, dims) in enumerate(names):
        nbytes = 2 * int(torch.Size(dims).numel())
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((i, name, dims))
        size += nbytes
    tmp = directory / f".{shape.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for i, name, dims in shard:
            if name.endswith("norm.weight"):
                t = torch.ones(dims)
            else:
                t = torch.empty(dims).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
            tensors[name] = t.to(torch.bfloat16)
            weight_map[name] = file
            total += 2 * t.numel()
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(tmp)
    build_tokenizer(make_text(20000, seed=seed + 1)).save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def calibration_file(directory: Path = WORK) -> Path:
    """A generated text holding well over 32 windows of 512 tokens (different words from the tokenizer's)."""
    path = directory / "calib.txt"
    if not path.is_file():
        path.write_text(make_text(60000, seed=2))
    return path


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


# --------------------------------------------------------------------------------------------
# Child processes, measured


def run_measured(cmd: list[str], env: dict[str, str], log: Path, timeout: float | None = None) -> dict:
    """Run ``cmd`` with stdout+stderr to ``log``; its exit code, wall seconds and own peak RSS (MiB).

    The peak is the child's VmHWM, read from /proc every 0.2 s: ``getrusage``'s ru_maxrss of a child
    also counts the parent's peak RSS, since Linux records the peak of the memory the child had
    before ``exec`` (a vfork shares the parent's); it is kept as ``ru_maxrss_mb``.

    Every half second the child's RSS, peak RSS so far, and RSS split into anonymous memory and
    mapped files go to ``log`` with suffix ``.rss.tsv`` (MiB, with the last block the run logged
    as done): where the memory goes.
    """
    start = time.perf_counter()
    with log.open("w") as out, log.with_suffix(".rss.tsv").open("w") as trace:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        trace.write("seconds\trss_mb\tpeak_mb\tanon_mb\tfile_mb\tlast_block_done\n")
        timed_out, peak = False, 0.0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if timeout is not None and time.perf_counter() - start > timeout:
                proc.kill()
                timed_out = True
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            rss = _proc_status(proc.pid)
            blocks = re.findall(r"block (\d+): error", log.read_text(errors="replace"))
            if rss:
                peak = max(peak, rss[1])
                cells = "\t".join(f"{v:.0f}" for v in rss)
                trace.write(f"{time.perf_counter() - start:.1f}\t{cells}\t{blocks[-1] if blocks else -1}\n")
                trace.flush()
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "rc": proc.returncode,
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": peak,
        "ru_maxrss_mb": usage.ru_maxrss / 1024,  # Linux: KiB
        "timed_out": timed_out,
    }


def _proc_status(pid: int) -> tuple[float, ...] | None:
    """(RSS, peak RSS, anonymous RSS, file-backed RSS) of a running process in MiB, from /proc (None without /proc)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"))
    except (OSError, KeyError, ValueError):
        return None


def trace_peak(trace: Path) -> float | None:
    """The highest VmHWM a trace of ``run_measured`` saw (None for an empty or missing trace)."""
    if not trace.is_file():
        return None
    return max((float(line.split("\t")[2]) for line in trace.read_text().splitlines()[1:]), default=None)


def with_trace_peak(row: dict, trace: Path) -> dict:
    """A row measured with ru_maxrss alone (which counts the parent's peak too) gets its trace's VmHWM."""
    if "ru_maxrss_mb" in row or (peak := trace_peak(trace)) is None:
        return row
    return row | {"ru_maxrss_mb": row["peak_rss_mb"], "peak_rss_mb": peak, "peak_after_block0_mb": peak_after_block0(trace)}


def peak_after_block0(trace: Path) -> float | None:
    """The child's peak RSS when it logged block 0 done (capture, block 0's load, quantization and write)."""
    rows = [line.split("\t") for line in trace.read_text().splitlines()[1:]]
    return next((float(r[2]) for r in rows if int(r[-1]) >= 0), None)


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


FOOTPRINT = "import torch, transformers, blockquant"
MODEL_CLASS = "from transformers import LlamaForCausalLM"  # transformers imports a model family's code on first use


def import_footprint(threads: int, code: str = FOOTPRINT) -> float:
    """Peak RSS (MiB) of a child that only runs ``code`` (by default: imports torch, transformers and blockquant),
    as the child reads its own VmHWM when done (too short a run for ``run_measured``'s sampling)."""
    report = "; import re; print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])"
    proc = subprocess.run([sys.executable, "-c", code + report], env=child_env(threads), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"the import child failed: {proc.stderr[-2000:]}")
    return int(proc.stdout.split()[-1]) / 1024


def run_blockquant(
    model_dir: Path,
    calib: Path,
    method: str,
    dtype: str,
    threads: int,
    nsamples: int = NSAMPLES,
    batch: int = BATCH,
    cap: float | None = None,
) -> dict:
    """``blockquant quantize --load blocks`` W4 g128 in a child; its measurements and blockquant.json.

    A run stopped at ``cap`` seconds gives the peak and block times of the blocks it finished, and a status."""
    name = f"{model_dir.name}-{method}-{dtype}" + ("" if (nsamples, batch) == (NSAMPLES, BATCH) else f"-n{nsamples}-b{batch}")
    out = WORK / "out" / name
    out.parent.mkdir(exist_ok=True)
    for stale in (out, out.parent / f".{name}.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    cmd = [sys.executable, "-m", "blockquant", "quantize", str(model_dir), "--recipe", method, "--wbits", "4", "--group-size", "128"]
    if method != "rtn":  # RTN needs no calibration: it quantizes each block's weights alone
        cmd += ["--calib", str(calib), "--nsamples", str(nsamples), "--seqlen", str(SEQLEN)]
    cmd += ["--output", str(out)]
    cmd += ["--load", "blocks", "--dtype", dtype] + ([] if batch == BATCH else ["--batch-size", str(batch)])
    log = WORK / f"{name}.log"
    r = run_measured(cmd, child_env(threads), log, cap)
    text = log.read_text()
    if r["timed_out"]:
        seconds = [float(x) for x in re.findall(r"block \d+: error .*, ([\d.]+)s$", text, re.M)]
        shutil.rmtree(out.parent / f".{name}.partial", ignore_errors=True)
        return r | {
            "status": f"stopped at the {cap:.0f} s cap after {len(seconds)} of {model_dir.name.split('x')[-1]} blocks",
            "quantize_s": None,
            "block_s": seconds,
            "peak_after_block0_mb": peak_after_block0(log.with_suffix(".rss.tsv")),
            "command": shlex_join(cmd),
        }
    if r["rc"]:
        raise RuntimeError(f"{shlex_join(cmd)} failed ({r['rc']}):\n{text[-3000:]}")
    record = json.loads((out / "blockquant.json").read_text())
    shutil.rmtree(out)
    return r | {
        "quantize_s": record["seconds"],
        "block_s": [b["seconds"] for b in record["blocks"]],
        "last_output_error": record["blocks"][-1]["output_error"],  # None without calibration
        "peak_after_block0_mb": peak_after_block0(log.with_suffix(".rss.tsv")),
        "command": shlex_join(cmd),
    }


def shlex_join(cmd: list[str]) -> str:
    import shlex

    return shlex.join("python" if c == sys.executable else str(c).replace(str(ROOT) + "/", "") for c in cmd)


# --------------------------------------------------------------------------------------------
# The peer: llm-compressor in its own virtual environment

PEER_VENV = WORK / "peer-venv"


def install_peer() -> str | None:
    """Install llmcompressor into PEER_VENV (once); None when it is there, else why not."""
    python = PEER_VENV / "bin" / "python"
    if python.is_file() and subprocess.run([str(python), "-c", "import llmcompressor"], capture_output=True).returncode == 0:
        return None
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    log = WORK / "peer-install.log"
    cmd = [str(PEER_VENV / "bin" / "pip"), "install", "-c", str(ROOT / "constraints.txt"), "llmcompressor"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None:
            if re.search(r"^(Collecting|Downloading) nvidia-", log.read_text(), re.M):
                proc.kill()
                proc.wait()
                return "the install started to download CUDA packages (nvidia-*); stopped"
            time.sleep(1)
    if proc.returncode == 0:
        return None
    text = log.read_text()
    causes = re.findall(r"^\s+(llmcompressor \S+ depends on .+)$", text, re.M)
    pins = ", ".join(line.strip() for line in (ROOT / "constraints.txt").read_text().splitlines() if line.strip()[:1].isalpha())
    if causes:
        return f"no llmcompressor release fits constraints.txt ({pins}): " + "; ".join(causes[:2])
    return (text.strip().splitlines() or ["pip failed"])[-1]


def peer_one(model_dir: str, calib: str, out_dir: str) -> None:
    """Runs in PEER_VENV: llm-compressor oneshot GPTQ W4A16 (W4 g128 sym) on the given token ids; prints a JSON line."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ids = load_file(calib)["input_ids"]  # (N, T)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], dampening_frac=0.01)
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0])
    seconds = time.perf_counter() - start
    model.save_pretrained(out_dir, save_compressed=True)
    print(json.dumps({"seconds": seconds}))


def run_peer(model_dir: Path, calib: Path, threads: int, timeout: float) -> dict:
    """The peer row: measured like blockquant's, or the reason it has no numbers."""
    why = install_peer()
    if why:
        return {"status": f"did not install: {why}"}
    import torch
    from safetensors.torch import save_file

    from blockquant.files import load_calibration, load_tokenizer

    ids_file = WORK / f"calib-{NSAMPLES}x{SEQLEN}.safetensors"  # the token ids blockquant's CLI draws (seed 0)
    save_file({"input_ids": load_calibration(calib, load_tokenizer(model_dir), NSAMPLES, SEQLEN, 0).to(torch.long)}, str(ids_file))
    out = WORK / "out" / f"{model_dir.name}-llmcompressor"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(PEER_VENV / "bin" / "python"), str(Path(__file__).resolve()), "--peer-one", str(model_dir), str(ids_file), str(out)]
    env = child_env(threads)
    env.pop("PYTHONPATH")  # the peer's venv, not blockquant
    log = WORK / "llmcompressor.log"
    r = run_measured(cmd, env, log, timeout)
    shutil.rmtree(out, ignore_errors=True)
    if r["timed_out"]:
        return r | {"status": f"timed out after {timeout:.0f} s"}
    if r["rc"]:
        return r | {"status": f"failed ({r['rc']}): {(log.read_text().strip().splitlines() or [''])[-1][:200]}"}
    return r | {"status": "ok", "quantize_s": json.loads(log.read_text().strip().splitlines()[-1])["seconds"]}


# --------------------------------------------------------------------------------------------
# The table


def table_rows(rows: list[dict], footprint: float) -> list[list[str]]:
    out = []
    for r in rows:
        ckpt_mb = r["checkpoint_bytes"] / 2**20
        status = r.get("status", "ok")
        if "peak_rss_mb" not in r:  # the peer did not run
            cells = ["-"] * 6 + [status]
        else:
            blocks = r.get("block_s") or []
            cells = [
                f"{r['peak_rss_mb']:.0f}",
                f"{(r['peak_rss_mb'] - footprint) / ckpt_mb:.1%}",
                f"{r['wall_s']:.0f}",
                "-" if r.get("quantize_s") is None else f"{r['quantize_s']:.0f}",
                f"{sum(blocks) / len(blocks):.1f}" if blocks else "-",
                "-" if r.get("peak_after_block0_mb") is None else f"{r['peak_after_block0_mb']:.0f}",
                "" if status == "ok" else status,
            ]
        out.append(
            [
                r["tool"],
                str(r["layers"]),
                r["method"],
                r["dtype"],
                "4",
                "128",
                f"{r['checkpoint_bytes'] / 2**30:.2f}",
                f"{footprint:.0f}",
                *cells,
            ]
        )
    return out


HEADERS = [
    "tool",
    "layers",
    "method",
    "compute dtype",
    "bits",
    "group",
    "checkpoint GiB",
    "import footprint MiB",
    "peak RSS MiB",
    "(peak − footprint) / checkpoint",
    "seconds total",
    "quantize s",
    "s / block",
    "peak RSS after block 0 MiB",
    "note",
]


def checks(rows: list[dict], footprint: float, with_class: float) -> list[str]:
    """The bound (25 % of the checkpoint above the import footprint) against the bare footprint
    and against the one that includes the model's class (the code every run imports), and the depth ratio."""

    def verdict(peak: float, bound: float) -> str:
        return "met" if peak <= bound else f"NOT met (over by {peak - bound:.0f} MiB)"

    out = []
    ours = [r for r in rows if r["tool"] == "blockquant"]
    for r in ours:
        if r["layers"] != 24:  # the bound is the 1.4 B model's; the 6-layer runs serve the depth ratio
            continue
        quarter = 0.25 * r["checkpoint_bytes"] / 2**20
        partial = f" ({r['status']}: the peak until then)" if r.get("status", "ok") != "ok" else ""
        out.append(
            f"- {r['layers']} layers, {r['method']}, {r['dtype']}{partial}: peak RSS {r['peak_rss_mb']:.0f} MiB against 25 % of the "
            f"{r['checkpoint_bytes'] / 2**20:.0f} MiB checkpoint + the {footprint:.0f} MiB bare import footprint = "
            f"{quarter + footprint:.0f} MiB — {verdict(r['peak_rss_mb'], quarter + footprint)}; + the {with_class:.0f} MiB "
            f"footprint with the model's class = {quarter + with_class:.0f} MiB — {verdict(r['peak_rss_mb'], quarter + with_class)}."
        )
    by = {(r["layers"], r["method"], r["dtype"]): r for r in ours}
    for (layers, method, dtype), big in by.items():
        small = by.get((6, method, dtype))
        if layers == 24 and small is not None:
            peak, low = big["peak_rss_mb"], small["peak_rss_mb"]
            partial = any(r.get("status", "ok") != "ok" for r in (big, small))
            out.append(
                f"- {method}, {dtype}: 24 layers peak at {peak:.0f} MiB, 6 layers at {low:.0f} MiB: ratio {peak / low:.3f} "
                f"against ≤ 1.1 — {'met' if peak <= 1.1 * low else 'NOT met'}"
                + (" (a run stopped before its end: the peaks until then)." if partial else ".")
            )
    peer = next((r for r in rows if r["tool"] == "llm-compressor" and "peak_rss_mb" in r), None)
    mine = by.get((24, "gptq", "bfloat16"))
    if peer is not None and mine is not None and "quantize_s" in peer and mine.get("quantize_s"):
        out.append(
            f"- gptq, 24 layers, blockquant out of core vs llm-compressor: peak RSS {mine['peak_rss_mb']:.0f} vs "
            f"{peer['peak_rss_mb']:.0f} MiB ({mine['peak_rss_mb'] / peer['peak_rss_mb']:.2f}×), quantize {mine['quantize_s']:.0f} vs "
            f"{peer['quantize_s']:.0f} s ({mine['quantize_s'] / peer['quantize_s']:.2f}×)."
        )
    return out


def diagnose(cache: Path, done: dict, calib: Path, threads: int, footprint: float, only_cached: bool = False) -> str:
    """The 6-layer fp32 GPTQ run with 32, then 8 samples, then batches of 2: a table of peaks."""
    model_dir = build_model(SHAPES[6])
    rows = []
    for nsamples, batch in [(NSAMPLES, BATCH), *DIAGNOSE]:
        key = f"blockquant/6/gptq/float32/{threads}" + ("" if (nsamples, batch) == (NSAMPLES, BATCH) else f"/n{nsamples}/b{batch}")
        if key not in done and only_cached:
            continue
        if key not in done:
            print(f"diagnosis: {model_dir.name} gptq float32, {nsamples} samples, batch {batch} ...", flush=True)
            done[key] = run_blockquant(model_dir, calib, "gptq", "float32", threads, nsamples, batch)
            save_row(cache, key, done[key])
        r = (
            with_trace_peak(done[key], WORK / f"{model_dir.name}-gptq-float32.rss.tsv")
            if (nsamples, batch) == (NSAMPLES, BATCH)
            else done[key]
        )
        block0 = "-" if r.get("peak_after_block0_mb") is None else f"{r['peak_after_block0_mb']:.0f}"
        rows.append([f"{nsamples} × {SEQLEN}", str(batch), f"{r['peak_rss_mb']:.0f}", f"{r['peak_rss_mb'] - footprint:.0f}", block0])
    headers = ["calibration", "batch", "peak RSS MiB", "peak − footprint MiB", "peak RSS after block 0 MiB"]
    return "Where the memory goes: the 6-layer model, GPTQ, float32, with less calibration and smaller batches.\n\n" + markdown_table(
        headers, rows
    )


def save_row(cache: Path, key: str, row: dict) -> None:
    """Add one row to the row cache, re-read first: runs of other configurations may have added theirs."""
    rows = json.loads(cache.read_text()) if cache.is_file() else {}
    rows[key] = row
    part = cache.with_name(cache.name + ".new")
    part.write_text(json.dumps(rows, indent=1))
    os.replace(part, cache)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer-one", nargs=3, metavar=("MODEL", "IDS", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--layers", nargs="+", type=int, default=[24, 6], choices=sorted(SHAPES))
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq"], choices=["rtn", "gptq"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every child [2]")
    p.add_argument("--cap", type=float, default=3600, help="seconds before a blockquant run is stopped (its row says so) [3600]")
    p.add_argument("--no-peer", action="store_true", help="skip the llm-compressor row")
    p.add_argument("--peer-timeout", type=float, default=2400, help="seconds before the peer run is stopped [2400]")
    p.add_argument(
        "--only-cached", action="store_true", help="with --reuse: leave out the configurations not measured yet instead of running them"
    )
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="also run the 6-layer fp32 GPTQ with 8 samples, then with batches of 2: which part of the peak scales with what",
    )
    p.add_argument("--reuse", action="store_true", help="take rows measured before (bench/cache/scale.json) instead of rerunning them")
    args = p.parse_args()
    if args.peer_one:
        peer_one(*args.peer_one)
        return
    missing = [m for m in ("accelerate", "tokenizers", "safetensors") if __import__("importlib").util.find_spec(m) is None]
    if missing:
        print(f"skipped: {', '.join(missing)} not installed (pip install -c constraints.txt -e .)")
        return
    WORK.mkdir(parents=True, exist_ok=True)
    cache = cache_path("scale.json")
    done = json.loads(cache.read_text()) if args.reuse and cache.is_file() else {}
    calib = calibration_file()
    footprint = import_footprint(args.threads)
    with_class = import_footprint(args.threads, f"{FOOTPRINT}; {MODEL_CLASS}")
    print(
        f"import footprint (torch, transformers, blockquant): {footprint:.0f} MiB; with the Llama class: {with_class:.0f} MiB", flush=True
    )
    rows = []
    for layers in args.layers:
        model_dir = build_model(SHAPES[layers])
        for dtype in args.dtypes:
            for method in args.methods:
                key = f"blockquant/{layers}/{method}/{dtype}/{args.threads}"
                if key not in done and args.only_cached:
                    continue
                if key not in done:
                    print(f"{model_dir.name} {method} {dtype} ...", flush=True)
                    done[key] = run_blockquant(model_dir, calib, method, dtype, args.threads, cap=args.cap) | {
                        "tool": "blockquant",
                        "layers": layers,
                        "method": method,
                        "dtype": dtype,
                        "checkpoint_bytes": checkpoint_bytes(model_dir),
                    }
                    save_row(cache, key, done[key])
                done[key] = with_trace_peak(done[key], WORK / f"{model_dir.name}-{method}-{dtype}.rss.tsv")
                rows.append(done[key])
                r = done[key]
                per_block = f"{sum(r['block_s']) / len(r['block_s']):.1f}" if r["block_s"] else "-"
                print(f"  peak RSS {r['peak_rss_mb']:.0f} MiB, {r['wall_s']:.0f} s, {per_block} s/block {r.get('status', '')}", flush=True)
    if not args.no_peer:
        model_dir = build_model(SHAPES[24])
        key = f"llmcompressor/24/gptq/bfloat16/{args.threads}"
        if key not in done and not args.only_cached:
            print("llm-compressor oneshot GPTQ W4A16 ...", flush=True)
            done[key] = run_peer(model_dir, calib, args.threads, args.peer_timeout) | {
                "tool": "llm-compressor",
                "layers": 24,
                "method": "gptq",
                "dtype": "bfloat16",
                "checkpoint_bytes": checkpoint_bytes(model_dir),
            }
            save_row(cache, key, done[key])
        if key in done:
            rows.append(done[key])
            print(f"  {done[key].get('status')}", flush=True)
    diagnosis = diagnose(cache, done, calib, args.threads, footprint, args.only_cached) if args.diagnose else ""
    example = next((r["command"] for r in rows if "command" in r), "")
    parts = [
        f"Synthetic Llama, {SHAPES[24].describe()}; 24 layers = "
        f"{parameters(SHAPES[24]) / 1e9:.2f} B parameters, 6 layers = {parameters(SHAPES[6]) / 1e9:.2f} B; bf16 shards ≤ 1 GB; "
        f"N(0, 0.02) weights, seed 0. GPTQ calibration {NSAMPLES} × {SEQLEN} tokens of generated text (seed 0); "
        "RTN runs without calibration (it reads the weights alone). "
        f"W4 g128 symmetric, CPU, OMP_NUM_THREADS={args.threads}, one child process per row; "
        "MiB = 2^20 bytes, GiB = 2^30. Seconds total: the child's wall time (imports, opening, calibration, quantization, writing); "
        "quantize s: blockquant.json's 'seconds'; s / block: mean of its per-block seconds.",
        f"Each row runs, e.g.: `{example.replace(sys.executable, 'python')}`",
        peer_setup(rows),
        f"The seconds are wall-clock times on a machine that other jobs may share: the 15-minute load average when this table "
        f"was written was {os.getloadavg()[2]:.1f} on {os.cpu_count()} cores.",
        markdown_table(HEADERS, table_rows(rows, footprint)),
        "\n".join(checks(rows, footprint, with_class)),
        diagnosis,
        f"Import footprints: `{FOOTPRINT}` peaks at {footprint:.0f} MiB (the bare footprint); every run also imports the "
        f"model's class, which transformers loads on first use (with torch._dynamo, sympy and scipy): "
        f"`{FOOTPRINT}; {MODEL_CLASS}` peaks at {with_class:.0f} MiB. Both are fixed costs of the software, whatever the "
        "model's size; the checks state the bound against each.",
    ]
    body = "\n\n".join(p for p in parts if p)
    print("\n" + body)
    print(f"\nwritten to {write_result('scale', 'Out-of-core quantization: peak memory against checkpoint size', body)}")


def peer_setup(rows: list[dict]) -> str:
    """How the peer row was run, with the versions its virtual environment holds; empty without one."""
    if not any(r.get("tool") == "llm-compressor" and "peak_rss_mb" in r for r in rows):
        return ""
    query = "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in ('llmcompressor', 'transformers', 'torch')}))"
    proc = subprocess.run([str(PEER_VENV / "bin" / "python"), "-c", query], capture_output=True, text=True)
    versions = ", ".join(f"{k} {v}" for k, v in json.loads(proc.stdout).items()) if proc.returncode == 0 else "versions unknown"
    return (
        "llm-compressor: the model loaded whole with `AutoModelForCausalLM.from_pretrained(dir, dtype=torch.bfloat16)`, then "
        '`oneshot` with `GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], dampening_frac=0.01)` (W4 g128 '
        "symmetric; its defaults otherwise) on the same calibration token ids; quantize s: loading and `oneshot`, without "
        f"saving. In its own virtual environment (bench/scale-work/peer-venv): {versions}."
    )


def parameters(shape: Shape) -> int:
    attn = 2 * shape.hidden * shape.hidden + 2 * shape.hidden * (shape.hidden // shape.heads * shape.kv_heads)
    block = attn + 3 * shape.hidden * shape.mlp + 2 * shape.hidden
    return shape.layers * block + 2 * shape.vocab * shape.hidden + shape.hidden


if __name__ == "__main__":
    main()
