"""``blockquant.quantize`` end to end on a tiny random model of every supported architecture."""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch
from conftest import ARCH_NAMES, assert_on_grid, build_tiny
from torch import nn
from transformers.pytorch_utils import Conv1D

import blockquant
from blockquant import QuantSpec, parse_recipe
from blockquant.arch import ARCHITECTURES, arch_for, block_linears, get_blocks
from blockquant.layers import weight_matrix
from blockquant.recipe import Recipe, make_step


@torch.no_grad()
def model_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def linear_names(model: nn.Module) -> set[str]:
    """Full names of every Linear / Conv1D inside the model's blocks."""
    arch = arch_for(model)
    return {
        f"{arch.blocks}.{i}.{n}"
        for i, block in enumerate(get_blocks(model, arch))
        for n, m in block.named_modules()
        if isinstance(m, (nn.Linear, Conv1D))
    }


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_w8_stays_close_and_on_grid(tiny_model, method, calib_ids, eval_ids):
    name, model = tiny_model
    reference = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = QuantSpec(8, 32)
    result = blockquant.quantize(model, parse_recipe(method, spec), calib_ids, progress=False)

    # every Linear / Conv1D of every block was quantized, and nothing else
    assert set(result.layers) == linear_names(model)
    after = model.state_dict()
    for key, value in after.items():
        module_name = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module_name in result.layers:
            assert not torch.equal(value, before[key]), f"{key} was not quantized"
        else:
            assert torch.equal(value, before[key]), f"{key} changed but is not a quantized weight"

    for layer_name, layer in result.layers.items():
        module = model.get_submodule(layer_name)
        w = weight_matrix(module)
        if isinstance(module, Conv1D):
            assert torch.equal(w, module.weight.detach().t())
        assert layer.scale.shape[1] == -(-w.shape[1] // 32), layer_name  # ceil(in / 32) groups
        assert_on_grid(w, layer.scale, layer.zero, spec, layer.g_idx)
        assert 0 < layer.error < 1e-3, layer_name

    err = relative_error(model_output(model, eval_ids), model_output(reference, eval_ids))
    assert err < 2e-2, f"{name} {method} W8: relative output error {err:.3e}"
    assert len(result.blocks) == 2
    assert result.blocks[0].input_error == 0.0
    assert all(0 < b.output_error < 1e-3 for b in result.blocks)


def test_w4_gptq_beats_rtn_on_last_block(tiny_model, make_tiny, calib_ids):
    name, gptq_model = tiny_model
    rtn_model = make_tiny(name)
    spec = QuantSpec(4, 32)
    gptq = blockquant.quantize(gptq_model, parse_recipe("gptq", spec), calib_ids, progress=False)
    rtn = blockquant.quantize(rtn_model, parse_recipe("rtn", spec), calib_ids, progress=False)
    assert 0 < gptq.blocks[-1].output_error < rtn.blocks[-1].output_error
    # the same holds layer by layer on the first block, where both see the same inputs
    first = [n for n in gptq.layers if ".0." in n]
    assert len(first) == len(gptq.layers) // 2
    assert 0 < sum(gptq.layers[n].error for n in first) < sum(rtn.layers[n].error for n in first)
    for layer_name, layer in gptq.layers.items():
        assert_on_grid(weight_matrix(gptq_model.get_submodule(layer_name)), layer.scale, layer.zero, spec, layer.g_idx)


@pytest.mark.parametrize(
    "options",
    [dict(act_order=True, static_groups=False), dict(act_order=True, static_groups=True), dict(act_order=False, true_sequential=False)],
    ids=["act-order", "static-groups", "natural-order-parallel"],
)
def test_gptq_option_variants_on_grid(make_tiny, calib_ids, options):
    model = make_tiny("llama")  # MLP width 172: ragged g32 groups in down_proj
    spec = QuantSpec(3, 32, sym=True)
    result = blockquant.quantize(model, Recipe(spec, [make_step("gptq", options)]), calib_ids, progress=False)
    permuted = options.get("act_order") and not options.get("static_groups")
    for layer_name, layer in result.layers.items():
        assert (layer.g_idx is not None) == bool(permuted), layer_name
        assert_on_grid(weight_matrix(model.get_submodule(layer_name)), layer.scale, layer.zero, spec, layer.g_idx)
    down = result.layers["model.layers.0.mlp.down_proj"]
    assert down.scale.shape == (64, 6)  # 172 = 5·32 + 12


def test_rtn_clip_search_and_chain(make_tiny, calib_ids):
    spec = QuantSpec(4, -1)
    plain = blockquant.quantize(make_tiny("opt"), Recipe(spec, [make_step("rtn")]), calib_ids, progress=False)
    searched_model = make_tiny("opt")
    searched = blockquant.quantize(searched_model, Recipe(spec, [make_step("rtn", {"clip_search": True})]), calib_ids, progress=False)
    assert searched.blocks[-1].output_error < plain.blocks[-1].output_error
    for layer_name, layer in searched.layers.items():
        assert_on_grid(weight_matrix(searched_model.get_submodule(layer_name)), layer.scale, layer.zero, spec, layer.g_idx)

    chained_model = make_tiny("opt")
    chained = blockquant.quantize(chained_model, parse_recipe("awq,rtn", spec), calib_ids, progress=False)
    assert chained.recipe.name == "awq,rtn"
    for layer_name, layer in chained.layers.items():  # the last step's grid is the one recorded
        assert_on_grid(weight_matrix(chained_model.get_submodule(layer_name)), layer.scale, layer.zero, spec, layer.g_idx)


def test_record_is_json_able(tiny_llama, calib_ids):
    import json

    result = blockquant.quantize(tiny_llama, parse_recipe("gptq", QuantSpec(4, 32, sym=True)), calib_ids, progress=False)
    record = json.loads(json.dumps(result.record()))
    assert (record["method"], record["bits"], record["group_size"], record["sym"]) == ("gptq", 4, 32, True)
    assert set(record["layers"]) == set(result.layers)
    assert len(record["blocks"]) == 2 and record["blocks"][1]["index"] == 1
    assert all(0 < r["relative_output_error"] < 1 for r in record["layers"].values())


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_weight_matrix_is_an_out_in_copy(name):
    """The methods keep weight_matrix() as the original weight while they write ŵ back."""
    from blockquant.layers import set_weight_matrix

    model = build_tiny(name)
    module = model.get_submodule("model.layers.0.mlp.down_proj" if name == "llama" else "transformer.h.0.mlp.c_proj")
    w = weight_matrix(module)
    assert w.shape == (64, 172) and w.dtype == torch.float32
    original = w.clone()
    set_weight_matrix(module, torch.zeros_like(w))
    assert torch.equal(w, original), "weight_matrix() aliases the module's weight"
    assert torch.count_nonzero(module.weight) == 0
    set_weight_matrix(module, original)
    assert torch.equal(weight_matrix(module), original)


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_block_linears_covers_every_linear(name):
    model = build_tiny(name)
    arch = arch_for(model)
    for block in get_blocks(model, arch):
        found = {n for n, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
        listed = block_linears(block, arch)
        assert set(listed) == found and len(listed) == len(found)
        # the table order is the execution order the methods rely on: no duplicates
        order = [n for g in arch.groups for n in g.linears]
        assert list(listed) == order and len(set(order)) == len(order)
        for feeder in (g.feeder for g in arch.groups if g.feeder):
            block.get_submodule(feeder)  # every feeder names a real module of the block


def test_block_linears_rejects_incomplete_table():
    model = build_tiny("llama")
    arch = arch_for(model)
    incomplete = dataclasses.replace(arch, groups=arch.groups[:-1])
    with pytest.raises(ValueError, match="down_proj"):
        block_linears(get_blocks(model, arch)[0], incomplete)


def test_unsupported_model_raises_listing_supported(calib_ids):
    import transformers

    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
    )
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM") as info:
        blockquant.quantize(model, parse_recipe("rtn", QuantSpec(4, 32)), calib_ids, progress=False)
    for supported in ARCHITECTURES:
        assert supported in str(info.value)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_nan_weight_raises_naming_parameter(name, calib_ids):
    model = build_tiny(name)
    param = "model.layers.1.mlp.down_proj.weight" if name == "llama" else "transformer.h.1.mlp.c_proj.weight"
    with torch.no_grad():
        model.get_parameter(param)[3, 5] = float("nan")
    before = model.get_parameter(
        "model.layers.0.self_attn.q_proj.weight" if name == "llama" else "transformer.h.0.attn.c_attn.weight"
    ).clone()
    with pytest.raises(ValueError, match=param.replace(".", r"\.")):
        blockquant.quantize(model, parse_recipe("gptq", QuantSpec(4, 32)), calib_ids, progress=False)
    after = model.get_parameter("model.layers.0.self_attn.q_proj.weight" if name == "llama" else "transformer.h.0.attn.c_attn.weight")
    assert torch.equal(before, after), "nothing may be quantized once a weight is found corrupt"


def test_inf_activation_names_the_layer(calib_ids):
    """Finite weights that overflow in the forward pass: the error names the first bad layer."""
    model = build_tiny("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.fill_(3e38)
    with pytest.raises(ValueError, match=r"block 1 .*mlp\.up_proj"):
        blockquant.quantize(model, parse_recipe("rtn", QuantSpec(4, 32)), calib_ids, progress=False)


def test_bad_calibration_shape(tiny_llama):
    with pytest.raises(ValueError, match="calibration"):
        blockquant.quantize(tiny_llama, parse_recipe("rtn", QuantSpec(4, 32)), torch.zeros(16, dtype=torch.long), progress=False)


@pytest.mark.parametrize(
    "change,error,message",
    [
        (dict(calibration=torch.rand(8, 32)), ValueError, "integer token ids"),
        (dict(calibration=torch.zeros(2, 0, dtype=torch.long)), ValueError, "none empty"),
        (dict(calibration=[[1, 2, 3]]), TypeError, "tensor of token ids"),
        (dict(calibration=torch.full((2, 8), 10**6)), ValueError, "vocabulary is [0, "),
        (dict(calibration=torch.zeros(1, 4096, dtype=torch.long)), ValueError, "exceed the model's 128 positions"),
        (dict(batch_size=0), ValueError, "batch_size must be an integer >= 1"),
        (dict(device="bogus"), ValueError, "unknown device 'bogus'"),
        (dict(device="meta"), ValueError, "unsupported device 'meta'"),
        (dict(recipe="gptq"), TypeError, "recipe must be a Recipe"),
        (dict(model="./llama"), TypeError, "model must be a torch.nn.Module"),
    ],
)
def test_quantize_names_a_bad_argument_before_the_work(tiny_llama, calib_ids, change, error, message):
    """The Python API's mistakes are named up front, not as an IndexError inside torch.embedding."""
    args = dict(model=tiny_llama, recipe=parse_recipe("rtn", QuantSpec(4, 32)), calibration=calib_ids) | change
    with pytest.raises(error, match=re.escape(message)):
        blockquant.quantize(args.pop("model"), args.pop("recipe"), args.pop("calibration"), progress=False, **args)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: QuantSpec(4, 32, sym="no"), "QuantSpec.sym must be true or false"),  # truthy: it was symmetric, silently
        (lambda: QuantSpec(4.0, 32), "QuantSpec.bits must be an integer"),
        (lambda: QuantSpec(4, 32.0), "QuantSpec.group_size must be an integer"),
        (lambda: Recipe(QuantSpec(), ["gptq"]), "make_step('gptq')"),
        (lambda: parse_recipe("rtn", None), "must be a QuantSpec"),
        (lambda: make_step("gptq", "act_order"), "must be a dict"),
    ],
)
def test_specs_and_recipes_check_their_types(make, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        make()


def test_samples_of_varying_length_are_batched_by_length_without_padding():
    """Paragraph calibration: samples of one length share a batch (at most ``batch_size``), every
    sample is used once, and batches come in the order of their first sample's draw."""
    lengths = [3, 5, 3, 3, 5, 4, 3, 3, 5]
    samples = [torch.full((n,), i) for i, n in enumerate(lengths)]
    batches = blockquant.api.calibration_batches(samples, 2, encoder=True)
    ids = [b["input_ids"] for b in batches]
    assert [t[:, 0].tolist() for t in ids] == [[0, 2], [1, 4], [3, 6], [5], [7], [8]]
    assert all(t.shape[1] == lengths[int(t[0, 0])] for t in ids)  # one length per batch, nothing padded
    assert all(torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"])) for b in batches)
    with pytest.raises(ValueError, match="1-D token id tensors"):
        blockquant.api.calibration_batches([torch.zeros(2, 3, dtype=torch.long)], 2, encoder=False)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_paragraph_calibration_quantizes_on_the_grid(family):
    """Batches of different lengths go through capture, GPTQ and block-wise FT."""
    gen = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, 256, (int(n),), generator=gen) for n in torch.randint(3, 12, (40,), generator=gen)]
    model = build_tiny(family)
    spec = QuantSpec(2, 32)
    recipe = Recipe(spec, [make_step("gptq", {}), make_step("blockft", {"steps": 6, "eval_every": 3})])
    result = blockquant.quantize(model, recipe, samples, batch_size=4, progress=False)
    arch = arch_for(model)
    for i, block in enumerate(get_blocks(model, arch)):
        for name, layer in block_linears(block, arch).items():
            r = result.layers[f"{arch.blocks}.{i}.{name}"]
            assert_on_grid(weight_matrix(layer), r.scale, r.zero, spec, r.g_idx)
    assert all(0 < b.output_error < 1 for b in result.blocks)
