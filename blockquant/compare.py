"""The method advisor: RTN, GPTQ and the block-wise fine-tuning variants on the same data.

Answers, for one model and bit width: does fine-tuning several blocks jointly, or against a
downstream objective, beat fine-tuning each block alone — by how much, for how much compute?
Each variant runs in its own process, so its wall time and peak RSS are its own.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue as queues
import signal
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

VARIANTS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "rtn": [("rtn", {})],
    "gptq": [("gptq", {})],
    "awq+gptq": [("awq", {}), ("gptq", {})],  # the start of --init awq,gptq, on request
    "blockft": [("blockft", {})],
    "joint K=2": [("blockft", {"window": 2, "stride": 2})],  # non-overlapping: the same steps per block as single-block FT
    "joint K=3": [("blockft", {"window": 3, "stride": 3})],
    "next:1": [("blockft", {"objective": "next:1"})],
    "logits": [("blockft", {"objective": "logits"})],
    # the method's other options, measured on request (not in the default set, which compares windows and objectives)
    "adaround": [("blockft", {"rounding": "adaround"})],
    "quantized-input": [("blockft", {"target": "quantized-input"})],
    "train-float": [("blockft", {"train_float": True})],  # norms and biases train too
    "joint K=2 overlap": [("blockft", {"window": 2, "stride": 1})],  # every inner block trained in two windows: n − 1 windows, not n/2
}
DEFAULT_VARIANTS = ("rtn", "gptq", "blockft", "joint K=2", "joint K=3", "next:1", "logits")
REFERENCES = ("rtn", "gptq", "awq+gptq")  # no fine-tuning: not judged against single-block FT
INITS = tuple(r.replace("+", ",") for r in REFERENCES)  # a fine-tuning start is a reference row's steps (rtn: blockft's own)


@dataclass
class CompareJob:
    model_dir: str
    calib: str
    eval: str
    bits: int
    group_size: int
    sym: bool = False
    nsamples: int = 128
    seqlen: int = 512
    max_windows: int | None = None
    device: str = "cpu"
    batch_size: int = 8
    seed: int = 0
    init: str = "gptq"  # what the fine-tuning variants start from: one of INITS
    ft_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"steps": 100}
    paragraphs: bool = False  # calibrate on whole paragraphs (nsamples × seqlen tokens in all), not windows
    generate: int | None = None  # keep this many real tokens per window and sample the rest from the FP model
    continuations: int = 1  # with generate: windows sampled per prompt (continuations × nsamples in all)


@dataclass
class CompareRow:
    variant: str
    bits: int
    group_size: int
    metric: str  # "ppl" or "cosine"
    value: float
    fp_value: float
    seconds: float
    peak_rss_mb: float
    curves: list[tuple[int, list[float]]]  # (first block, training loss per step)

    @property
    def delta_percent(self) -> float:
        return 100 * (self.value / self.fp_value - 1)

    def better_than(self, other: CompareRow) -> bool:
        return self.value < other.value if self.metric == "ppl" else self.value > other.value


def variant_steps(variant: str, job: CompareJob) -> list[tuple[str, dict[str, Any]]]:
    steps = VARIANTS[variant]
    if steps[-1][0] != "blockft":
        return steps
    init = [] if job.init == "rtn" else VARIANTS[job.init.replace(",", "+")]
    return init + [("blockft", {**job.ft_options, **steps[-1][1]})]


def measure(job: CompareJob, steps: list[tuple[str, dict[str, Any]]] | None) -> dict[str, Any]:
    """Quantize a fresh copy with ``steps`` (None: full precision) and evaluate it."""
    import torch

    from blockquant.api import quantize
    from blockquant.arch import arch_for
    from blockquant.evaluate import mean_pooled_embeddings, paragraph_batches, text_metric
    from blockquant.files import generate_calibration, load_calibration, load_model, read_text, split_paragraphs
    from blockquant.recipe import Recipe, make_step
    from blockquant.spec import QuantSpec

    torch.manual_seed(job.seed)
    model, tokenizer = load_model(job.model_dir)
    kind = arch_for(model).kind
    encoder = kind == "encoder"
    text = read_text(job.eval, "evaluation")
    # an encoder is judged on whole paragraphs, whatever the calibration length
    kw = dict(seqlen=job.seqlen, max_length=min(getattr(model.config, "max_position_embeddings", None) or 512, 512), device=job.device)
    kw |= dict(max_windows=job.max_windows or 512) if encoder else dict(max_windows=job.max_windows, batch_size=job.batch_size)
    reference = None
    if encoder:  # the full-precision embeddings, before the model is quantized in place
        paragraphs = split_paragraphs(text)[: kw["max_windows"]]
        reference = mean_pooled_embeddings(model, paragraph_batches(tokenizer, paragraphs, max_length=kw["max_length"]), job.device)
    out: dict[str, Any] = {"seconds": 0.0, "peak_rss_mb": 0.0, "curves": []}
    if steps is not None:
        calibration = load_calibration(job.calib, tokenizer, job.nsamples, job.seqlen, job.seed, encoder, job.paragraphs)
        if job.generate is not None:
            calibration = generate_calibration(model, calibration, job.generate, job.seed, job.device, continuations=job.continuations)
        recipe = Recipe(QuantSpec(job.bits, job.group_size, job.sym), [make_step(m, o) for m, o in steps])
        result = quantize(model, recipe, calibration, device=job.device, batch_size=job.batch_size, progress=False)
        curves = [(first, log.losses) for first, log in result.train_logs]
        out.update(
            seconds=result.seconds,
            cpu_seconds=result.cpu_seconds,
            peak_rss_mb=result.peak_rss_mb,
            curves=curves,
            model_steps=result.model_steps,
            step_seconds=result.step_seconds,
        )
    value, _ = text_metric(model, tokenizer, text, kind, reference=reference, **kw)
    out.update(metric="cosine" if encoder else "ppl", value=value)
    return out


def _child(job: CompareJob, steps: Any, queue: Any) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the parent prints one line per variant
    try:
        queue.put(("ok", measure(job, steps)))
    except Exception as e:  # reported by the parent, with the variant's name; a ValueError is a user mistake, said plainly
        queue.put(("error", str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"))


def measure_in_child(job: CompareJob, steps: list[tuple[str, dict[str, Any]]] | None) -> dict[str, Any]:
    """``measure`` in a fresh process (each variant starts from the same state and its peak memory is its own).

    A child that dies without a word (killed for memory, a crash in native code) is reported, not waited for.
    """
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(job, steps, queue))
    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
    try:  # Ctrl-C reaches the whole process group: the worker starts ignoring it (inherited across exec) ...
        proc.start()
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, before)
    try:
        return child_result(proc, queue, "full precision" if steps is None else ",".join(m for m, _ in steps))
    except KeyboardInterrupt:  # ... and the parent stops it: no orphan measuring on, no traceback from a vanished queue
        proc.terminate()
        proc.join()
        raise


def child_result(proc: Any, queue: Any, what: str) -> Any:
    """What ``proc`` puts on ``queue`` as ``(status, payload)``; a ValueError if it fails or exits without a word."""
    while True:
        try:
            status, payload = queue.get(timeout=1.0)
            break
        except queues.Empty:
            if proc.is_alive():
                continue
            try:  # it may have put its result just before exiting
                status, payload = queue.get(timeout=1.0)
                break
            except queues.Empty:
                raise ValueError(f"the worker measuring {what} died with exit code {proc.exitcode} (out of memory?)") from None
    proc.join()
    if status != "ok":
        raise ValueError(payload)
    return payload


def run_compare(
    job: CompareJob,
    widths: list[tuple[int, int]],
    variants: list[str],
    log=print,
    on_row=None,
    done: list[CompareRow] = (),
    on_start=None,
) -> list[CompareRow]:
    """FP once, then every variant at every (bits, group) width (windows wider than the model skipped).

    ``on_row(rows)`` is called after each variant, so long studies can save as they go; rows in
    ``done`` (an earlier, interrupted run on the same job) are kept and not measured again.
    ``on_start(text)`` is called before each measurement (which can take minutes), saying what runs.
    """
    from transformers import AutoConfig

    from blockquant.arch import ARCHITECTURES
    from blockquant.files import model_class_name

    n_blocks = AutoConfig.from_pretrained(job.model_dir).num_hidden_layers
    too_wide = [v for v in variants if VARIANTS[v][-1][1].get("window", 1) > n_blocks]
    if too_wide:
        log(f"skipped {', '.join(too_wide)}: the model has only {n_blocks} blocks")
        variants = [v for v in variants if v not in too_wide]
    arch = ARCHITECTURES[model_class_name(job.model_dir)]
    if arch.input_norm is None and "next:1" in variants:  # post-norm: block b+1 reads block b's output unchanged
        log("skipped next:1: on a post-norm model block b+1's input is block b's output, so next:1 is single-block FT")
        variants = [v for v in variants if v != "next:1"]
    if not variants:
        raise ValueError("every variant asked for was skipped on this model (the line above says why); choose others with --variants")
    rows = list(done)
    start = on_start or (lambda text: None)
    total, count = len(widths) * len(variants), 0
    if not rows:
        start("measuring the full-precision model")
    fp = {"value": rows[0].fp_value, "metric": rows[0].metric} if rows else measure_in_child(job, None)
    log(f"full precision: {fp['metric']} {fp['value']:.4f}")
    for bits, group in widths:
        wjob = CompareJob(**{**asdict(job), "bits": bits, "group_size": group})
        for variant in variants:
            count += 1
            if any((r.variant, r.bits, r.group_size) == (variant, bits, group) for r in rows):
                log(f"W{bits} g{group} {variant:10s} kept from the earlier run")
                continue
            start(f"measuring W{bits} g{group} {variant} ({count} of {total})")
            r = measure_in_child(wjob, variant_steps(variant, wjob))
            rows.append(CompareRow(variant, bits, group, r["metric"], r["value"], fp["value"], r["seconds"], r["peak_rss_mb"], r["curves"]))
            log(f"W{bits} g{group} {variant:10s} {r['metric']} {r['value']:.4f} ({rows[-1].delta_percent:+.2f} %) {r['seconds']:.0f}s")
            if on_row is not None:
                on_row(rows)
    return rows


def verdict(rows: list[CompareRow]) -> list[str]:
    """Which variant won per width, and whether joint / downstream beat single-block FT."""
    lines = []
    for bits, group in dict.fromkeys((r.bits, r.group_size) for r in rows):
        width = [r for r in rows if (r.bits, r.group_size) == (bits, group)]
        best = width[0]
        for r in width[1:]:
            best = r if r.better_than(best) else best
        lines.append(
            f"W{bits} g{group}: best is {best.variant} ({best.metric} {best.value:.4f}, {best.delta_percent:+.2f} % vs FP, {best.seconds:.0f}s)."
        )
        single = next((r for r in width if r.variant == "blockft"), None)
        for r in width:
            if single is None or r.variant in (*REFERENCES, "blockft"):
                continue
            diff = abs(r.value - single.value)
            if r.better_than(single):
                outcome = f"helped ({r.metric} {diff:.4f} better"
            elif single.better_than(r):
                outcome = f"did not help ({r.metric} {diff:.4f} worse"
            else:
                outcome = f"did not help (the same {r.metric}"
            lines.append(f"  {r.variant} vs single-block FT: {outcome}, {r.seconds / max(single.seconds, 1e-9):.1f}× the time)")
    return lines


def table(rows: list[CompareRow]) -> str:
    lines = ["| method | bits | group | metric | value | Δ% vs FP | seconds | peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.variant} | {r.bits} | {r.group_size} | {r.metric} | {r.value:.4f} | {r.delta_percent:+.2f} | {r.seconds:.1f} | {r.peak_rss_mb:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[CompareRow], path: Path) -> None:
    """Metric per method per width, and each fine-tuned window's training-loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    variants = list(dict.fromkeys(r.variant for r in rows))
    widths = list(dict.fromkeys((r.bits, r.group_size) for r in rows))
    for v in variants:
        pts = [(f"W{b} g{g}", r.value) for (b, g) in widths for r in rows if r.variant == v and (r.bits, r.group_size) == (b, g)]
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
    ax1.axhline(rows[0].fp_value, color="k", ls="--", lw=1, label="full precision")
    ax1.set_ylabel(rows[0].metric)
    ax1.set_title("metric per method per width")
    ax1.legend(fontsize=8)
    lowest = min(widths)
    for r in rows:
        if (r.bits, r.group_size) == lowest:
            for first, losses in r.curves:
                ax2.plot(losses, lw=0.8, label=f"{r.variant} block {first}")
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss")
    ax2.set_title(f"per-window training loss, W{lowest[0]} g{lowest[1]}")
    if ax2.lines:
        ax2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def describe(job: CompareJob) -> str:
    """The data and settings every row shares, so that a saved table says what it was measured on."""
    from blockquant.files import GENERATION_TEMPERATURE

    if job.paragraphs:
        calib = f"up to {job.nsamples} whole paragraphs of at most {job.seqlen} tokens"
    else:
        calib = f"{job.nsamples} windows of {job.seqlen} tokens"
    calib += f" from {job.calib}, drawn with seed {job.seed}"
    if job.generate is not None:
        calib += f"; each keeps its first {job.generate} tokens and the rest are sampled from the FP model (temperature {GENERATION_TEMPERATURE:g})"
        if job.continuations > 1:
            calib += f", {job.continuations} times per window ({job.continuations * job.nsamples} windows in all)"
    evaluation = "all windows" if job.max_windows is None else f"the first {job.max_windows} windows (or paragraphs)"
    ft = ", ".join(f"{k}={v}" for k, v in sorted(job.ft_options.items())) or "defaults"
    scheme = "symmetric" if job.sym else "asymmetric"
    return (
        f"Calibration: {calib}. Evaluation: {evaluation} of {job.eval}. Weights {scheme}; fine-tuning starts from "
        f"{job.init.upper()} with {ft}; device {job.device}, batch size {job.batch_size}."
    )


OUTPUT_FILES = ("compare.md", "compare.png", "compare.json")


def load_rows(out_dir: Path, setup: str) -> list[CompareRow]:
    """The rows an earlier (interrupted) comparison saved in ``out_dir``, refused unless it was
    measured on the same data and settings (``setup``, as ``describe`` writes it into compare.md)."""
    md, js = out_dir / "compare.md", out_dir / "compare.json"
    if not (md.is_file() and js.is_file()):
        raise ValueError(f"--resume: {out_dir} holds no earlier comparison (compare.md and compare.json)")
    if setup not in md.read_text():
        raise ValueError(f"--resume: the comparison in {out_dir} was measured on other data or settings (see its compare.md)")
    try:
        return [CompareRow(**{**r, "curves": [tuple(c) for c in r["curves"]]}) for r in json.loads(js.read_text())]
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"--resume: cannot read {js}: {e}") from None


def check_output(out_dir: Path, overwrite: bool = False) -> None:
    """Refuse, before any measuring, a ``--output`` that ``save`` could not fill, or whose earlier
    results (hours of measuring) it would replace without ``overwrite``."""
    from blockquant.files import check_output_dir

    if out_dir.is_dir():  # compare writes its three files into an existing folder
        busy = [f for f in OUTPUT_FILES if (out_dir / f).exists() and not (out_dir / f).is_file()]
        if busy:
            raise ValueError(f"--output {out_dir} holds {', '.join(busy)}, which is not a file; remove it or choose another --output")
        earlier = [f for f in OUTPUT_FILES if (out_dir / f).is_file()]
        if earlier and not overwrite:
            raise ValueError(
                f"--output {out_dir} already holds {', '.join(earlier)} of an earlier comparison; add --overwrite to replace them"
            )
        if not os.access(out_dir, os.W_OK):
            raise ValueError(f"cannot write in --output {out_dir}")
        return
    check_output_dir(out_dir, overwrite=False)


def save(rows: list[CompareRow], out_dir: Path, title: str, setup: str = "") -> list[Path]:
    """compare.md (setup, table, verdict), compare.png and compare.json in ``out_dir``.

    Each is written to a temporary name first and all three are renamed at the end, so a failure leaves the folder as it was.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = {f: out_dir / f".{f}.tmp-{os.getpid()}{Path(f).suffix}" for f in OUTPUT_FILES}
    try:
        head = f"# {title}\n\n" + (f"{setup}\n\n" if setup else "")
        tmp["compare.md"].write_text(f"{head}{table(rows)}\n\n" + "\n".join(verdict(rows)) + "\n")
        tmp["compare.json"].write_text(json.dumps([asdict(r) for r in rows], indent=1))
        plot(rows, tmp["compare.png"])
        for name, path in tmp.items():
            os.replace(path, out_dir / name)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    return [out_dir / f for f in OUTPUT_FILES]
