"""Does rotating a Llama's residual stream first help GPTQ and block-wise FT? -> bench/results/rotation.md

    python bench/rotation.py --rotation {none,hadamard,orthogonal} [--bits 2] [--group-size 64]
                             [--variant fp|gptq|blockft|"joint K=2"] [--seed N] [--max-windows N]

QuaRot / SpinQuant's R1: fold every RMSNorm weight into the linears it feeds, then rotate the
residual stream by an orthogonal Q (embeddings E·Q, readers W·Q, writers Qᵀ·W, an untied head).
The full-precision function is unchanged (the script checks the logits); the weights each
group-wise grid sees are mixed across input channels, which should spread outliers out.
The rotation is applied right after loading, so calibration, quantization and the evaluation
all see the rotated model (llama-code; the library itself has no rotation step). One run measures
one configuration and puts its row into bench/results/rotation.md, replacing that configuration's
earlier row.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import blockquant.files as files  # noqa: E402
from bench.common import SHARED, cpu_name, subject_paths, update_table  # noqa: E402
from blockquant.compare import CompareJob, measure, variant_steps  # noqa: E402


def sylvester_hadamard(n: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def rotation_matrix(d: int, kind: str, gen: torch.Generator) -> Tensor:
    """A (d, d) float64 orthogonal matrix: Haar-random (QR of a Gaussian), or random signs times
    (random m×m orthogonal ⊗ Hadamard of the largest power of two dividing d)."""
    if kind == "orthogonal":
        q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))
    p = 1 << (d.bit_length() - 1)
    while d % p:
        p //= 2
    small, _ = torch.linalg.qr(torch.randn(d // p, d // p, generator=gen, dtype=torch.float64))
    signs = torch.where(torch.rand(d, generator=gen) < 0.5, -1.0, 1.0).double()
    return signs[:, None] * torch.kron(small.contiguous(), sylvester_hadamard(p))


@torch.no_grad()
def rotate_llama(model: torch.nn.Module, q: Tensor) -> None:
    """Fold the RMSNorm weights and rotate the residual stream of a LlamaForCausalLM by ``q``, in place."""
    inner = model.model
    head = inner.embed_tokens.weight if model.config.tie_word_embeddings else model.lm_head.weight
    model.lm_head.weight = torch.nn.Parameter(((head.double() * inner.norm.weight.double()) @ q).float())
    model.config.tie_word_embeddings = False
    inner.norm.weight.fill_(1.0)
    inner.embed_tokens.weight.copy_(inner.embed_tokens.weight.double() @ q)
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm, readers in (
            (layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
            (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj)),
        ):
            for lin in readers:
                lin.weight.copy_((lin.weight.double() * norm.weight.double()) @ q)
            norm.weight.fill_(1.0)
        for lin in (attn.o_proj, mlp.down_proj):
            if lin.bias is not None:
                raise ValueError("o_proj / down_proj with a bias: this script does not rotate the writers' biases")
            lin.weight.copy_(q.T @ lin.weight.double())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rotation", choices=["none", "hadamard", "orthogonal"], required=True)
    p.add_argument("--bits", type=int, default=2, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--variant", default="gptq", choices=["fp", "gptq", "blockft", "joint K=2"], help="fp: no quantization [gptq]")
    p.add_argument("--seed", type=int, default=0, help="calibration draw (the rotation's own seed is fixed: 1234)")
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    args = p.parse_args()
    if (args.group_size < 1 and args.group_size != -1) or (args.max_windows is not None and args.max_windows < 1):
        p.error("--group-size must be >= 1 or -1, and --max-windows >= 1")
    if not (SHARED / "subjects").is_dir():
        print(f"skipped: {SHARED} is missing (benchmarks need the shared subjects)")
        return
    load = files.load_model

    def load_rotated(path: str, *a, **k):  # measure() loads the model itself: rotate it right after
        model, tokenizer = load(path, *a, **k)
        if args.rotation != "none":
            probe = torch.arange(64)[None]
            with torch.no_grad():
                before = model(probe).logits
                rotate_llama(model, rotation_matrix(model.config.hidden_size, args.rotation, torch.Generator().manual_seed(1234)))
                err = (model(probe).logits - before).abs().max().item()
            if err > 1e-3:
                raise RuntimeError(f"the rotation changed the full-precision logits by {err:.2e}")
        return model, tokenizer

    files.load_model = load_rotated
    model_dir, calib, evaluation = subject_paths("llama-code")
    job = CompareJob(model_dir, calib, evaluation, args.bits, args.group_size, max_windows=args.max_windows, seed=args.seed)
    out = measure(job, None if args.variant == "fp" else variant_steps(args.variant, job))
    print(
        f"llama-code W{args.bits} g{args.group_size} seed {args.seed} rotation {args.rotation} {args.variant}: "
        f"{out['metric']} {out['value']:.4f}, {out['seconds']:.0f} s, peak RSS {out['peak_rss_mb']:.0f} MB",
        flush=True,
    )
    row = [
        f"W{args.bits} g{args.group_size}",
        str(args.seed),
        args.rotation,
        args.variant,
        f"{cpu_name()}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thr."
        + (f", first {args.max_windows} windows" if args.max_windows else ""),
        f"{out['value']:.4f}",
        f"{out['seconds']:.0f}",
        f"{out['peak_rss_mb']:.0f}",
    ]
    intro = (
        "llama-code, calibration 128 × 512 tokens of data/code/calib.txt (draw `seed`), perplexity on all 501 windows of "
        "data/code/eval.txt, library defaults; the rotation's own seed is fixed (1234). `orthogonal`: a Haar-random Q; "
        "`hadamard`: random signs × (random 3×3 orthogonal ⊗ Hadamard 128). Each row: `python bench/rotation.py --rotation R "
        "--bits B --group-size G --variant V --seed S`; re-running a configuration on the same CPU and thread count replaces its row."
    )
    headers = ["width", "seed", "rotation", "variant", "CPU, kernels, threads", "ppl", "quantize s", "peak RSS MB"]
    path = update_table("rotation", "Residual-stream rotation before GPTQ and block-wise FT (llama-code)", intro, headers, row, 5)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
