"""Weight digests of the method chains on tiny models: a refactor must leave them bit-identical.

Builds a tiny Llama (hidden 64, 2 layers, MLP 172) and a tiny MONAI U-Net from fixed seeds, runs
each chain through ``blockquant.quantize`` and prints the sha256 of the resulting state dict.

    python bench/digests.py --save before.json     # on the old code
    python bench/digests.py --check before.json    # on the new code: exit 1 if any chain differs

One thread, so the digest depends on the code and the machine's kernels only.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys

import torch
import transformers
from torch import nn

from blockquant import QuantSpec, Recipe, make_step, parse_recipe, quantize
from blockquant.recipe import act_spec

LLM_CHAINS = ("rtn", "gptq", "awq,gptq", "gptq,blockft", "gptq,blockft,qft", "zeroquant,lkd")
CONV_CHAINS = ("rtn", "gptq", "admm", "admm,qft")
TRAIN = {"steps": 30, "eval_every": 10, "holdout": 0.0}  # no held-out batch: the trained state is kept
SHORT = {"blockft": TRAIN, "qft": TRAIN, "lkd": TRAIN, "admm": {"iters": 30}}


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
        max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_unet() -> nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=[4, 8, 16], strides=[2, 2], num_res_units=2, norm="batch").eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net


def recipe_for(chain: str, spec: QuantSpec, abits: bool = False) -> Recipe:
    """The chain with short training schedules (the digest checks arithmetic, not quality)."""
    recipe = parse_recipe(chain, spec, act_spec(8, "token") if abits else None)
    steps = [make_step(s.method, {**dataclasses.asdict(s.options), **SHORT.get(s.method, {})}) for s in recipe.steps]
    return dataclasses.replace(recipe, steps=steps)


def digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def run_all() -> dict[str, str]:
    torch.set_num_threads(1)
    out: dict[str, str] = {}
    calib = torch.randint(0, 256, (32, 32), generator=torch.Generator().manual_seed(0))
    for chain in LLM_CHAINS:
        model = tiny_llama()
        torch.manual_seed(0)
        recipe = recipe_for(chain, QuantSpec(bits=3, group_size=32), abits=chain.startswith("zeroquant"))
        quantize(model, recipe, calib, batch_size=4, progress=False)
        out[f"llama {chain}"] = digest(model)
    image = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    for chain in CONV_CHAINS:
        net = tiny_unet()
        torch.manual_seed(0)
        quantize(net, recipe_for(chain, QuantSpec(bits=3, group_size=-1, scale_dtype="float32")), image, progress=False)
        out[f"unet {chain}"] = digest(net)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save", metavar="FILE", help="write the digests as JSON")
    p.add_argument("--check", metavar="FILE", help="compare with digests saved earlier; exit 1 on any difference")
    args = p.parse_args()
    got = run_all()
    for chain, d in got.items():
        print(f"{chain:28s} {d}")
    if args.save:
        with open(args.save, "w") as f:
            json.dump(got, f, indent=1)
    if args.check:
        with open(args.check) as f:
            want = json.load(f)
        bad = [c for c in want if got.get(c) != want[c]]
        print("identical" if not bad else f"DIFFERENT: {', '.join(bad)}")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
