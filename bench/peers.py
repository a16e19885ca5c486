"""The peers of bench/speed.py — llm-compressor's GPTQ and AutoRound — in their own virtual environment.

The environment, bench/cache/peers/llmc (git-ignored), is made by ``ensure_venv`` with

    python -m venv bench/cache/peers/llmc
    bench/cache/peers/llmc/bin/pip install -c bench/cache/peers/constraints-torch.txt llmcompressor

where constraints-torch.txt is constraints.txt without its transformers and tokenizers pins: every
llmcompressor release requires a transformers older than the one constraints.txt pins, so the
peers run with the transformers pip resolves for them (5.17) on the torch of constraints.txt
(2.13.0, CPU wheel), blockquant's torch. AutoRound comes with llmcompressor, which requires it.

The main environment calls ``ensure_venv`` and ``run_peer``; ``run_peer`` starts this file in the
peer environment (``--one TOOL ...``), where ``llmcompressor_gptq`` or ``autoround`` quantizes the
subject on the calibration token ids of a safetensors file and saves a compressed-tensors
checkpoint that the main environment loads with ``AutoModelForCausalLM.from_pretrained`` and
scores with blockquant's perplexity. Nothing here imports blockquant.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "bench" / "cache" / "peers"
VENV = PEERS / "llmc"
CONSTRAINTS = PEERS / "constraints-torch.txt"  # constraints.txt less the pins llmcompressor cannot meet
UNPINNED = ("transformers", "tokenizers")
PACKAGES = ("llmcompressor", "auto_round", "transformers", "torch", "compressed_tensors")
PEER_BATCH = 8  # AutoRound's default batch_size: the calibration ids reach it in batches of this many samples


def python() -> Path:
    return VENV / "bin" / "python"


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM, MiB): ``getrusage`` would also count the memory the
    parent held before ``exec``."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status)[1]) / 1024


def write_constraints() -> Path:
    """constraints.txt without the transformers and tokenizers pins, as bench/cache/peers/constraints-torch.txt."""
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    kept = [line for line in lines if re.split(r"[=<>!~ ]", line.strip(), maxsplit=1)[0] not in UNPINNED]
    text = "\n".join(kept) + "\n"
    PEERS.mkdir(parents=True, exist_ok=True)
    if not CONSTRAINTS.is_file() or CONSTRAINTS.read_text() != text:
        CONSTRAINTS.write_text(text)
    return CONSTRAINTS


def versions() -> dict[str, str] | None:
    """The peer environment's package versions, or None when it does not import llmcompressor and auto_round."""
    if not python().is_file():
        return None
    code = f"import importlib.metadata as m, json; print(json.dumps({{p: m.version(p.replace('_', '-')) for p in {PACKAGES!r}}}))"
    check = "import llmcompressor, auto_round; "
    proc = subprocess.run([str(python()), "-c", check + code], capture_output=True, text=True, env=peer_env(1))
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None


def ensure_venv() -> dict[str, str]:
    """Make (once) the peer environment; reuse it when it imports both peers. Its package versions."""
    found = versions()
    if found:
        return found
    if not python().is_file():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    log = PEERS / "llmc.log"
    cmd = [str(VENV / "bin" / "pip"), "install", "-c", str(write_constraints()), "llmcompressor"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None:
            if re.search(r"^(Collecting|Downloading) nvidia-(?!ml-py)", log.read_text(), re.M):  # CUDA wheels: gigabytes
                proc.kill()
                proc.wait()
                raise RuntimeError(f"installing llmcompressor started to download CUDA packages (nvidia-*); see {log}")
            time.sleep(1)
    found = versions()
    if proc.returncode or not found:
        tail = (log.read_text().strip().splitlines() or ["pip failed"])[-1]
        raise RuntimeError(f"the peer environment {VENV} did not install ({tail}); see {log}")
    return found


def peer_env(threads: int) -> dict[str, str]:
    """The peers' environment variables: their venv alone on the path, fixed threads, no hub access."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    return env


def run_peer(args: list[str], threads: int, log: Path, timeout: float | None = None) -> dict:
    """Run ``peers.py --one ARGS`` in the peer environment (output to ``log``); the JSON line it prints last."""
    cmd = [str(python()), str(Path(__file__).resolve()), "--one", *args, "--threads", str(threads)]
    with log.open("w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=peer_env(threads), cwd=ROOT, timeout=timeout)
    lines = log.read_text(errors="replace").strip().splitlines()
    if proc.returncode != 0:
        sys.stderr.write("\n".join(lines[-40:]) + "\n")
        raise RuntimeError(f"peer run {' '.join(args)} failed with exit code {proc.returncode}; log: {log}")
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------
# Inside the peer environment


def _load(model_dir: str, threads: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")  # the checkpoint's dtype (bf16), as their examples load
    return model, AutoTokenizer.from_pretrained(model_dir)


def llmcompressor_gptq(model_dir: str, ids_file: str, out_dir: str, threads: int) -> dict:
    """llm-compressor ``oneshot`` GPTQ, scheme W4A16 (4-bit symmetric, groups of 128), on the given token ids."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import load_file

    ids = load_file(ids_file)["input_ids"]  # (N, T)
    model, tokenizer = _load(model_dir, threads)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], dampening_frac=0.01)
    load, start = os.getloadavg()[0], time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=data,
        recipe=recipe,
        max_seq_length=ids.shape[1],
        num_calibration_samples=ids.shape[0],
    )
    seconds = time.perf_counter() - start
    peak, load = peak_rss_mb(), [load, os.getloadavg()[0]]
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
    return {"seconds": seconds, "peak_rss_mb": peak, "load": load, "dtype": str(model.dtype).removeprefix("torch.")}


def autoround(model_dir: str, ids_file: str, out_dir: str, bits: int, group: int, threads: int, iters: int | None = None) -> dict:
    """AutoRound (SignRound) with its defaults — 200 iterations, its learning rate, batch 8 — at ``bits`` /
    ``group`` symmetric on CPU, calibrated on the given token ids; saved in its ``llm_compressor`` format
    (compressed-tensors pack-quantized). ``iters``: another number of iterations (trial runs only)."""
    from auto_round import AutoRound
    from safetensors.torch import load_file

    ids = load_file(ids_file)["input_ids"]  # (N, T)
    model, tokenizer = _load(model_dir, threads)
    extra = {} if iters is None else {"iters": iters}
    load, start = os.getloadavg()[0], time.perf_counter()
    ar = AutoRound(
        model,
        tokenizer,
        bits=bits,
        group_size=group,
        sym=True,
        dataset=list(ids.split(PEER_BATCH)),  # batches of token ids: AutoRound reads no dataset of its own
        nsamples=ids.shape[0],
        seqlen=ids.shape[1],
        device_map="cpu",
        **extra,
    )
    ar.quantize()
    seconds = time.perf_counter() - start
    peak, load = peak_rss_mb(), [load, os.getloadavg()[0]]
    ar.save_quantized(out_dir, format="llm_compressor")
    return {"seconds": seconds, "peak_rss_mb": peak, "load": load, "dtype": str(model.dtype).removeprefix("torch."), "iters": ar.iters}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--one", nargs="+", metavar="ARG", required=True, help="llmcompressor MODEL IDS OUT | autoround MODEL IDS OUT BITS GROUP [ITERS]"
    )
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    tool, *rest = args.one
    if tool == "llmcompressor":
        row = llmcompressor_gptq(*rest, threads=args.threads)
    elif tool == "autoround":
        model_dir, ids_file, out_dir, bits, group, *iters = rest
        row = autoround(model_dir, ids_file, out_dir, int(bits), int(group), args.threads, int(iters[0]) if iters else None)
    else:
        p.error(f"unknown peer {tool!r}; use llmcompressor or autoround")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
