"""Architecture tables: where a model's blocks are and which linears share which input.

Every method reads these tables and nothing else about a model family: GPTQ's true-sequential
order is the order of ``groups``; AWQ / SmoothQuant read the ``feeder`` of each group (the norm
or linear whose output is the group's input and nothing else's, ``None`` where no exact fold
exists: across a GELU, from outside the block, or from a post-norm LayerNorm whose output is
also the residual). A new family is a new entry, not new branches.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class LinearGroup:
    """Linears (names relative to the block) that read the same input tensor."""

    feeder: str | None
    linears: tuple[str, ...]
    part: tuple[int, int] = (0, 1)  # the linears read slice i of n equal slices of the feeder's output
    heads: bool = False  # per attention head: with grouped-query attention each query head reads its KV head's channels


@dataclass(frozen=True)
class ArchSpec:
    blocks: str  # dotted path of the ModuleList of blocks
    groups: tuple[LinearGroup, ...]  # in execution (true-sequential) order
    input_norm: str | None  # the norm a block applies to its input (None: post-norm blocks)
    final_norm: str | None  # model-level norm after the last block
    head: str | None  # the LM head (None for encoders)
    kind: str = "causal-lm"  # or "encoder"
    # config flags that give linears a bias in a saved checkpoint (QFT's bias corrections on layers built without one)
    bias_flags: tuple[tuple[str, tuple[str, ...]], ...] = ()


def _g(feeder: str | None, *linears: str, part: tuple[int, int] = (0, 1), heads: bool = False) -> LinearGroup:
    return LinearGroup(feeder, linears, part, heads)


_LLAMA_GROUPS = (
    _g("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    _g("self_attn.v_proj", "self_attn.o_proj", heads=True),
    _g("post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj"),
    _g("mlp.up_proj", "mlp.down_proj"),
)
_LLAMA_BIAS = (
    ("attention_bias", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")),
    ("mlp_bias", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("model.layers", _LLAMA_GROUPS, "input_layernorm", "model.norm", "lm_head", bias_flags=_LLAMA_BIAS),
    "MistralForCausalLM": ArchSpec("model.layers", _LLAMA_GROUPS, "input_layernorm", "model.norm", "lm_head"),
    "Qwen2ForCausalLM": ArchSpec("model.layers", _LLAMA_GROUPS, "input_layernorm", "model.norm", "lm_head"),
    "OPTForCausalLM": ArchSpec(
        "model.decoder.layers",
        (
            _g("self_attn_layer_norm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            _g("self_attn.v_proj", "self_attn.out_proj", heads=True),
            _g("final_layer_norm", "fc1"),
            _g("fc1", "fc2"),  # ReLU is positively homogeneous: positive scales fold through it
        ),
        "self_attn_layer_norm",  # pre-norm OPT; post-norm variants (OPT-350m) normalise later
        "model.decoder.final_layer_norm",
        "lm_head",
    ),
    "GPT2LMHeadModel": ArchSpec(
        "transformer.h",
        (
            _g("ln_1", "attn.c_attn"),
            _g("attn.c_attn", "attn.c_proj", part=(2, 3)),  # c_proj reads v, the last third of c_attn's output
            _g("ln_2", "mlp.c_fc"),
            _g(None, "mlp.c_proj"),  # behind a GELU: no exact fold
        ),
        "ln_1",
        "transformer.ln_f",
        "lm_head",
    ),
    "BertModel": ArchSpec(
        "encoder.layer",
        (
            _g(None, "attention.self.query", "attention.self.key", "attention.self.value"),
            _g("attention.self.value", "attention.output.dense", heads=True),
            # post-norm: this LayerNorm's output is also the residual into output.LayerNorm, so
            # scaling it would change the block's function: no exact fold
            _g(None, "intermediate.dense"),
            _g(None, "output.dense"),  # behind a GELU: no exact fold
        ),
        None,  # post-norm: a block's input is already the previous block's LayerNorm output
        None,
        None,
        kind="encoder",
    ),
}


def arch_for(model: nn.Module) -> ArchSpec:
    """The table for ``model``'s class, or a ValueError listing the supported classes."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {name}; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name]


def get_blocks(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return model.get_submodule(spec.blocks)


def block_linears(block: nn.Module, spec: ArchSpec) -> dict[str, nn.Module]:
    """The quantizable linears of a block, in table order; the table must cover them all."""
    found = {n: m for n, m in block.named_modules() if is_linear(m)}
    listed = [name for group in spec.groups for name in group.linears]
    missing = set(found) - set(listed)
    if missing:
        raise ValueError(f"architecture table misses linear(s) {sorted(missing)} of the block")
    return {name: block.get_submodule(name) for name in listed}


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))
