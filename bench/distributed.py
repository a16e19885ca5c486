"""One process vs ``torchrun --nproc-per-node 2`` on llama-code -> bench/results/distributed.md.

    python bench/distributed.py [--recipes gptq gptq,blockft bench/recipes/gptq-fp64-hessians.yaml]
                                [--threads-baseline gptq] [--nsamples 128] [--max-windows N] [--work DIR]

Each recipe is quantized by the command line, W3 g128 (the command line's symmetric grid),
calibration 128 × 512 tokens of ``data/code/calib.txt`` (seed 0), every other setting the
library's default: in one process with one thread (the reference), in two processes started by
torchrun with one thread each (``OMP_NUM_THREADS=1``), and, for the recipes of
``--threads-baseline`` (gptq), in one process with two threads — the same two cores used by
threads, and a run whose sums are added in another order, which shows how far floating-point
order alone moves the result. The table gives each checkpoint's perplexity on
``data/code/eval.txt`` (every 512-token window), the share of its integer codes equal to the
reference's, and the wall and CPU time of each step of the chain (``blockquant.json``
``step_seconds``; rank 0's) with the wall-time ratio to the reference. A recipe file (such as
bench/recipes/gptq-fp64-hessians.yaml: GPTQ with ``hessian_dtype: float64``) is shown under its name. The two-process checkpoint
is also scored by ``blockquant eval`` under torchrun (the windows split over the processes). The
checkpoints go to a temporary directory, or to ``--work DIR``, where a later run with the same
``--work`` finds and keeps them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SHARED, markdown_table, write_result  # noqa: E402

SUBJECT = SHARED / "subjects" / "llama-code"
CALIB, EVAL = SHARED / "data" / "code" / "calib.txt", SHARED / "data" / "code" / "eval.txt"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]  # = torchrun


def _env(threads: int = 1) -> dict[str, str]:
    # passive waits: threads that sleep instead of spinning when the CPU is shared with other jobs (same arithmetic)
    threads_env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    return dict(os.environ, **threads_env, TOKENIZERS_PARALLELISM="false")


def _run(cmd: list[str], threads: int = 1) -> str:
    print(f"$ OMP_NUM_THREADS={threads}", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=_env(threads), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"exit code {proc.returncode}: {' '.join(cmd)}")
    return proc.stdout


def quantize(recipe: str, processes: int, threads: int, out: Path, nsamples: int, reuse: bool) -> dict:
    """Quantize with the command line in ``processes`` processes of ``threads`` threads; the run's blockquant.json."""
    if not (reuse and (out / "blockquant.json").is_file()):
        args = ["quantize", str(SUBJECT), "--recipe", recipe, "--wbits", "3", "--group-size", "128", "--calib", str(CALIB)]
        args += ["--nsamples", str(nsamples), "--seqlen", "512", "--output", str(out), "--overwrite", "--quiet"]
        _run(([sys.executable] if processes == 1 else TORCHRUN) + ["-m", "blockquant", *args], threads)
    return json.loads((out / "blockquant.json").read_text())


def perplexity(out: Path, max_windows: int | None) -> float:
    import torch

    from blockquant.evaluate import perplexity as ppl
    from blockquant.export import load_model_any
    from blockquant.files import read_text, tokenize_stream

    torch.set_num_threads(os.cpu_count() or 1)
    model, tokenizer = load_model_any(out)
    return ppl(model, tokenize_stream(tokenizer, read_text(EVAL, "evaluation")), 512, max_windows, progress=False)


def torchrun_perplexity(out: Path, max_windows: int | None) -> float:
    args = ["eval", str(out), "--data", str(EVAL), "--json", "--quiet"] + (["--max-windows", str(max_windows)] if max_windows else [])
    return json.loads(_run(TORCHRUN + ["-m", "blockquant", *args]).strip().splitlines()[-1])["perplexity"]


def codes_equal(a: Path, b: Path) -> tuple[float, int, list[float]]:
    """Share of the integer codes two packed checkpoints have in common, how many codes there are,
    and the share block by block."""
    import blockquant
    from blockquant.export.qlinear import QuantLinear

    ma, mb = blockquant.load(a), blockquant.load(b)
    layers_b = dict(mb.named_modules())
    blocks: dict[int, list[int]] = {}
    for name, m in ma.named_modules():
        if isinstance(m, QuantLinear):
            ca, cb = m.codes(), layers_b[name].codes()
            counts = blocks.setdefault(int(name.split(".layers.")[1].split(".")[0]), [0, 0])
            counts[0] += int((ca == cb).sum())
            counts[1] += ca.numel()
    same, total = sum(c[0] for c in blocks.values()), sum(c[1] for c in blocks.values())
    return same / total, total, [blocks[i][0] / blocks[i][1] for i in sorted(blocks)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["gptq", "gptq,blockft"])
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows of 512 tokens [128]")
    p.add_argument(
        "--threads-baseline",
        nargs="*",
        default=["gptq"],
        metavar="RECIPE",
        help="recipes also run in one process with 2 threads (sums in another order) [gptq]",
    )
    p.add_argument("--max-windows", type=int, help="evaluate on the first N windows only [all 501]")
    p.add_argument(
        "--work", type=Path, help="keep the checkpoints here, and reuse those a run with the same --work left [a temporary directory]"
    )
    args = p.parse_args()
    if not SUBJECT.is_dir() or not CALIB.is_file() or not EVAL.is_file():
        print(f"bench/distributed.py: skipped, the shared subjects are missing ({SUBJECT} and {CALIB.parent})")
        return 0
    if args.work is None:
        with tempfile.TemporaryDirectory(prefix="blockquant-distributed-") as tmp:
            return study(args, Path(tmp), reuse=False)
    args.work.mkdir(parents=True, exist_ok=True)
    return study(args, args.work, reuse=True)


def scored(out: Path, score: Callable[[Path, int | None], float], max_windows: int | None, reuse: bool) -> float:
    """``score(out, max_windows)``, kept in ``out`` for a later run with the same ``--work`` (a checkpoint's scores do not change)."""
    path, key = out / "bench-distributed.json", f"{score.__name__} {max_windows}"
    kept = json.loads(path.read_text()) if reuse and path.is_file() else {}
    if key not in kept:
        kept[key] = score(out, max_windows)
        if reuse:
            path.write_text(json.dumps(kept))
    return kept[key]


def seconds(record: dict, step: str, kind: str = "seconds") -> float:
    """Wall (``seconds``) or CPU (``cpu_seconds``) time of one step of the chain, or of the whole run (``total``)."""
    return record[kind] if step == "total" else record["step_seconds"][step][kind]


RUNS = {"1 process": (1, 1), "2 processes": (2, 1), "1 process, 2 threads": (1, 2)}  # (processes, threads each); the first is the reference


def study(args: argparse.Namespace, work: Path, reuse: bool) -> int:
    rows, per_block = [], []
    for recipe in args.recipes:
        runs = {run: pt for run, pt in RUNS.items() if pt[1] == 1 or recipe in args.threads_baseline}
        label = Path(recipe).stem if recipe.endswith(".yaml") else recipe  # a recipe file: its name
        outs = {run: work / f"{label.replace(',', '+')}-{p}proc-{t}thr" for run, (p, t) in runs.items()}
        records = {run: quantize(recipe, p, t, outs[run], args.nsamples, reuse) for run, (p, t) in runs.items()}
        ref = next(iter(RUNS))
        steps = [*records[ref]["step_seconds"], "total"]

        for run, out in outs.items():
            ppl = scored(out, perplexity, args.max_windows, reuse)
            if run == ref:
                ref_ppl = ppl
            same, count, blocks = codes_equal(outs[ref], out)
            if run != ref:
                per_block.append([f"`{label}`", run, *(f"{100 * b:.2f} %" for b in blocks)])
            rows.append(
                [
                    f"`{label}`",
                    run,
                    f"{ppl:.4f}",
                    "–" if run == ref else f"{100 * (ppl / ref_ppl - 1):+.3f} %",
                    "–" if run == ref else f"{100 * same:.2f} % of {count / 1e6:.1f} M",
                    f"{scored(out, torchrun_perplexity, args.max_windows, reuse):.4f}" if RUNS[run][0] > 1 else "",
                    " / ".join(f"{step} {seconds(records[run], step):.0f}" for step in steps),
                    "–"
                    if run == ref
                    else " / ".join(f"{step} {seconds(records[run], step) / seconds(records[ref], step):.2f}" for step in steps),
                    " / ".join(f"{step} {seconds(records[run], step, 'cpu_seconds'):.0f}" for step in steps),
                    f"{records[run]['peak_rss_mb']:.0f}",
                ]
            )
        print(markdown_table(HEADERS, rows), flush=True)
    windows = f"the first {args.max_windows}" if args.max_windows else "all 501"
    body = (
        f"llama-code, W3 g128 symmetric (the command line's default grid), calibration {args.nsamples} × 512 tokens of "
        "data/code/calib.txt (seed 0), every method option the library's default but those a recipe file "
        "(bench/recipes/NAME.yaml, shown as NAME) sets. *1 process*: `OMP_NUM_THREADS=1 "
        "blockquant quantize …` (the reference); *2 processes*: `OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m "
        "blockquant quantize …` (gloo, one thread each); *1 process, 2 threads*: `OMP_NUM_THREADS=2 blockquant quantize …`, "
        "whose sums run in another order than the reference's: how far floating-point order alone moves the result. "
        f"Perplexity on {windows} 512-token windows of data/code/eval.txt; *torchrun eval*: the same checkpoint scored "
        "by `torchrun --nproc-per-node 2 -m blockquant eval`, the windows split over the processes. Codes: the share "
        "of the checkpoint's integer codes equal to the reference's. Seconds per step of the chain and in all "
        "(`blockquant.json`, rank 0's), wall and CPU (one process's, all its threads); *wall / ref*: wall time "
        "relative to the reference; peak RSS of one process.\n\n"
        + markdown_table(HEADERS, rows)
        + "\n\nCodes equal to the reference's, block by block (a difference in one block changes the inputs, and so the "
        "statistics, of every later block):\n\n"
        + markdown_table(["recipe", "run", *(f"block {i}" for i in range(len(per_block[0]) - 2))], per_block)
    )
    path = write_result("distributed", "One process vs two (torchrun, CPU)", body)
    print(f"written: {path}")
    return 0


HEADERS = ["recipe", "run", "perplexity", "vs 1 process", "codes equal", "torchrun eval", "wall s", "wall / ref", "CPU s", "peak RSS MB"]

if __name__ == "__main__":
    sys.exit(main())
