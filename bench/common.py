"""Shared bench plumbing: locate ../shared, run one configuration per subprocess, write tables.

Each quantization runs in its own process so that its peak RSS is its own. Every script writes one
current table, ``bench/results/<script>.md``, overwritten when it runs again; row caches for
resuming and plots go to ``bench/cache/`` (not tracked).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / "bench" / "cache"  # row caches and plots (git-ignored)


def run_child(script: Path, args: list[str]) -> dict:
    """Run ``script --one ARGS`` and parse the JSON line it prints last."""
    proc = subprocess.run([sys.executable, str(script), "--one", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise RuntimeError(f"{script.name} {' '.join(args)} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU model: results that amplify float rounding (MiniLM GPTQ moved by 0.004 between environments) name it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> str:
    """torch version, CPU, kernel level and threads: a result says where it ran."""
    return f"torch {torch.__version__}, {cpu_name()} ({torch.backends.cpu.get_cpu_capability()} kernels), {torch.get_num_threads()} threads"


def command_line() -> str:
    """The command that is running, as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    where = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python", str(where), *sys.argv[1:]])


def write_result(name: str, title: str, body: str) -> Path:
    """Write ``bench/results/<name>.md`` (replacing it): title, the command, date and environment, then ``body``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(f"# {title}\n\n`{command_line()}` — {time.strftime('%Y-%m-%d')}, {environment()}\n\n{body}\n")
    return path


def cache_path(name: str) -> Path:
    """``bench/cache/<name>``: where a script keeps its rows for ``--resume`` and its plots."""
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE / name


def update_table(name: str, title: str, intro: str, headers: list[str], row: list[str], key: int) -> Path:
    """Put ``row`` into the table of ``bench/results/<name>.md``, replacing the row whose first ``key`` cells
    equal its own, and rewrite the file: title, ``intro``, the table, then whatever text followed the old table.

    For scripts that measure one configuration per run: the file stays one current table of every
    configuration measured, and re-running a configuration overwrites its row.
    """
    path = RESULTS / f"{name}.md"
    rows: list[list[str]] = []
    after = ""
    if path.is_file():
        lines = path.read_text().splitlines()
        head = "| " + " | ".join(headers) + " |"
        if head in lines:
            i = lines.index(head) + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split(" | ")])
                i += 1
            after = "\n".join(lines[i:]).strip()
    same = [i for i, r in enumerate(rows) if r[:key] == row[:key]]
    if same:
        rows[same[0]] = row
    else:
        rows.append(row)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\n{intro}\n\n{markdown_table(headers, rows)}\n" + (f"\n{after}\n" if after else ""))
    return path


# (samples, tokens per sample) of each subject's calibration: 65 536 tokens for every one. MiniLM runs on at
# most 256 tokens (sentence_bert_config.json; trained on 128), so its 512-token windows would show the
# quantizer positions it never uses: it gets 512 framed samples of 128 ([CLS] … [SEP]) instead.
CALIBRATION = {"minilm": (512, 128)}
CALIBRATION_TEXT = "calibration 65 536 tokens (seed 0): 128 samples × 512 for the Llamas, 512 × 128 ([CLS] … [SEP]) for MiniLM"


def calibration_shape(name: str) -> tuple[int, int]:
    return CALIBRATION.get(name, (128, 512))


def subject_paths(name: str) -> tuple[str, str, str]:
    """(model dir, calibration text, evaluation text) of a shared LM subject, or of MiniLM (Shakespeare text)."""
    if name == "minilm":
        from blockquant.demo import minilm_dir

        data = SHARED / "data" / "shakespeare"
        return str(minilm_dir()), str(data / "calib.txt"), str(data / "eval.txt")
    data = SHARED / "data" / {"llama-code": "code", "llama-shakespeare": "shakespeare"}[name]
    return str(SHARED / "subjects" / name), str(data / "calib.txt"), str(data / "eval.txt")


GENERATE_HELP = (
    "keep each calibration window's first N tokens and sample the rest from the full-precision model (temperature 1), "
    "as `blockquant quantize --calib-generate N`"
)
PARAGRAPHS_HELP = "whole paragraphs of the calibration file (at most T tokens each, N × T tokens in all) instead of N windows of T"


def calibration_text(shape: tuple[int, int] | None, paragraphs: bool, seed: int = 0) -> str:
    """How a study calibrated, for its results file: the default windows, ``--calib-shape`` or paragraphs."""
    if paragraphs:
        text = (
            f"calibration: whole paragraphs of at most {shape[1]} tokens, {shape[0] * shape[1]} tokens in all (seed 0)"
            if shape
            else "calibration: whole paragraphs of the calibration file, 65536 tokens in all (seed 0), "
            "each cut at the subject's window (MiniLM 128 tokens, the Llamas 512)"
        )
    else:
        text = f"calibration {shape[0]} × {shape[1]} tokens (seed 0)" if shape else CALIBRATION_TEXT
    return text.replace("seed 0", f"seed {seed}")


def calib_shape(text: str) -> tuple[int, int]:
    """``NxT`` → (samples, tokens per sample); argparse turns the ValueError into one usage line."""
    m = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if not m or min(int(m[1]), int(m[2])) < 1:
        raise argparse.ArgumentTypeError(f"expected NxT with positive integers, e.g. 2048x32; got {text!r}")
    return int(m[1]), int(m[2])
