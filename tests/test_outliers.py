"""Activation quantization, scale folding, AWQ, SmoothQuant and ZeroQuant + LKD on tiny models."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from conftest import assert_on_grid, build_tiny, save_tiny
from test_cli import QUANT_ARGS, assert_usage_error

from blockquant import QuantSpec, Recipe, make_step, quantize
from blockquant.activations import ActQuantizer, fake_quant_act, per_token_qparams, quantizers
from blockquant.api import calibration_batches
from blockquant.arch import ARCHITECTURES, arch_for, get_blocks
from blockquant.capture import BlockContext, capture_block_inputs, run_block
from blockquant.cli import main
from blockquant.fold import fold_problem, fold_scales
from blockquant.layers import weight_matrix
from blockquant.methods import smoothquant
from blockquant.recipe import ActSpec, act_spec


@torch.no_grad()
def _out(model, ids):
    if arch_for(model).kind == "encoder":
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    return model(input_ids=ids).logits


def _rel(a, b) -> float:
    return float(((a - b) ** 2).sum() / (b**2).sum())


def _block_contexts(model, ids):
    """(block, BlockContext) of every block, each fed the full-precision stream."""
    arch = arch_for(model)
    blocks = get_blocks(model, arch)
    x = capture_block_inputs(model, blocks, calibration_batches(ids, 4, arch.kind == "encoder"), "cpu")
    for j, block in enumerate(blocks):
        yield block, BlockContext(j, x, arch.groups, torch.device("cpu"))
        x = x.with_hidden(run_block(block, x))


# ---------------------------------------------------------------------------------------------
# Folding: the full-precision function must not change


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "bert", "gpt2", "mistral"])
def test_scale_folding_leaves_fp_logits_unchanged(family, calib_ids, eval_ids):
    model = build_tiny(family).double()
    ref = _out(model, eval_ids)
    arch = arch_for(model)
    gen = torch.Generator().manual_seed(0)
    folded = 0
    for block in get_blocks(model, arch):
        for group in arch.groups:
            if fold_problem(block, group) is None:
                width = weight_matrix(block.get_submodule(group.linears[0])).shape[1]
                before = weight_matrix(block.get_submodule(group.linears[0]))
                fold_scales(block, group, torch.exp(torch.randn(width, generator=gen)))  # scales from 0.05 to 20
                assert not torch.allclose(weight_matrix(block.get_submodule(group.linears[0])), before)
                folded += 1
    assert folded >= len(get_blocks(model, arch))  # at least one exact fold per block
    assert _rel(_out(model, eval_ids), ref) < 1e-12  # the fold runs in fp32 (weight_matrix): rms error ~1e-7


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "bert"])
def test_smoothquant_and_awq_folds_leave_fp_logits_unchanged(family, calib_ids, eval_ids):
    """The methods' own folds (eq. 4 and AWQ scales from real statistics), before any rounding."""
    from blockquant.methods.awq import awq_scales

    model = build_tiny(family).double()
    ref = _out(model, eval_ids)
    for block, ctx in _block_contexts(model, calib_ids.long()):
        assert smoothquant.smooth(block, ctx, ctx.inputs, alpha=0.7)  # some group folds in every family
        for group in ctx.groups:
            if fold_problem(block, group) is None:
                fold_scales(block, group, awq_scales(torch.rand(weight_matrix(block.get_submodule(group.linears[0])).shape[1]) + 0.1, 0.5))
    assert _rel(_out(model, eval_ids), ref) < 1e-12  # the fold runs in fp32 (weight_matrix): rms error ~1e-7


def test_post_norm_and_gqa_groups_are_not_folded(make_tiny):
    bert, mistral = make_tiny("bert"), make_tiny("mistral")
    groups = {g.linears[0]: g for g in ARCHITECTURES["BertModel"].groups}
    assert "feeder None" in fold_problem(bert.encoder.layer[0], groups["intermediate.dense"])  # LayerNorm output is also the residual
    o_group = ARCHITECTURES["MistralForCausalLM"].groups[1]
    assert "grouped-query" in fold_problem(mistral.model.layers[0], o_group)
    with pytest.raises(ValueError, match="grouped-query"):
        fold_scales(mistral.model.layers[0], o_group, torch.ones(32))


# ---------------------------------------------------------------------------------------------
# Activation quantizers


@pytest.mark.parametrize("bits,sym", [(8, True), (8, False), (4, True), (4, False)])
def test_per_token_quantizer_exact_against_reference(bits, sym):
    x = torch.randn(3, 5, 16) * torch.linspace(0.1, 10, 16)
    x[0, 0] = 0  # an all-zero token
    spec = ActSpec(bits, "token", sym)
    got = ActQuantizer(spec)(x)
    ref = torch.empty_like(x)
    qmax = 2 ** (bits - 1) - 1 if sym else 2**bits - 1
    qmin = -(2 ** (bits - 1)) if sym else 0
    for idx in range(15):  # token by token, the textbook formulas in fp32 scalars
        t = x.reshape(15, 16)[idx]
        lo, hi = torch.clamp(t.min(), max=0), torch.clamp(t.max(), min=0)
        if sym:
            s, z = torch.clamp(torch.maximum(-lo, hi) / qmax, min=1e-10), torch.tensor(0.0)
        else:
            s = torch.clamp((hi - lo) / (qmax - qmin), min=1e-10)
            z = torch.clamp(torch.round(-lo / s), qmin, qmax)
        ref.reshape(15, 16)[idx] = s * (torch.clamp(torch.round(t / s) + z, qmin, qmax) - z)
    assert torch.equal(got, ref)
    assert torch.equal(got[0, 0], torch.zeros(16))
    levels = (got.reshape(15, 16) / per_token_qparams(x, spec)[0].reshape(15, 1)).round()
    assert len(torch.unique(levels[3])) <= 2**bits


def test_per_token_quantizer_passes_gradients_straight_through():
    x = torch.randn(2, 8, requires_grad=True)
    fake_quant_act(x, *per_token_qparams(x, ActSpec(8)), ActSpec(8)).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_static_ranges_from_calibration(tiny_llama, calib_ids):
    q = copy.deepcopy(tiny_llama)
    quantize(
        q,
        Recipe(QuantSpec(8, -1), [make_step("rtn")], ActSpec(8, "tensor", range="percentile", percentile=99.0)),
        calib_ids,
        progress=False,
    )
    m = copy.deepcopy(tiny_llama)
    quantize(m, Recipe(QuantSpec(8, -1), [make_step("rtn")], ActSpec(8, "tensor")), calib_ids, progress=False)
    pct, mm = quantizers(q), quantizers(m)
    assert set(pct) == {n for n, _ in tiny_llama.named_modules() if n.endswith("_proj")}
    assert all(0 < float(pct[n].scale) < float(mm[n].scale) for n in pct)  # percentile clips, min-max does not
    assert set(quantizers(tiny_llama)) == set()  # the original is untouched
    assert not any("input_quantizer" in k for k in q.state_dict())  # checkpoints keep their layout


# ---------------------------------------------------------------------------------------------
# Methods


def _error(model, recipe, calib, eval_ids) -> float:
    q = copy.deepcopy(model)
    quantize(q, recipe, calib, batch_size=2, progress=False)
    with torch.no_grad():
        return _rel(_out(q, eval_ids), _out(model, eval_ids))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_awq_beats_rtn_and_chains_before_gptq(family, calib_ids, eval_ids):
    model = build_tiny(family)
    with torch.no_grad():  # an outlier input channel, the case AWQ protects
        norm = model.model.layers[0].input_layernorm if family == "llama" else model.model.decoder.layers[0].self_attn_layer_norm
        norm.weight[3] *= 30
    spec = QuantSpec(3, 32)
    rtn = _error(model, Recipe(spec, [make_step("rtn")]), calib_ids, eval_ids)
    awq = _error(model, Recipe(spec, [make_step("awq")]), calib_ids, eval_ids)
    assert awq < 0.8 * rtn
    q = copy.deepcopy(model)
    result = quantize(q, Recipe(spec, [make_step("awq"), make_step("gptq")]), calib_ids, progress=False)
    for name, r in result.layers.items():
        assert_on_grid(weight_matrix(q.get_submodule(name)), r.scale, r.zero, spec, r.g_idx)


def test_awq_warns_once_about_groups_it_cannot_scale(calib_ids, caplog):
    """BERT's post-norm groups have no exact feeder: the user is told once, not per block, and not only at info level."""
    with caplog.at_level("WARNING", logger="blockquant"):
        quantize(build_tiny("bert"), Recipe(QuantSpec(4, 32), [make_step("awq")]), calib_ids, progress=False)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.getMessage().startswith("awq:")]
    assert warned and all("not scaled in any block" in m for m in warned)
    assert len(warned) == len(set(warned))  # once per group, not once per block


def test_smoothquant_with_unit_scales_is_naive_w8a8(tiny_llama, calib_ids, eval_ids, monkeypatch):
    """The SmoothQuant path adds nothing but its scales: with s ≡ 1 it is naive W8A8 exactly.

    Under eq. 4, α = 0 is not s ≡ 1 (it is s = 1/max|W_j|, all of the weights' range moved into the
    activations), so the identity is checked with the scales themselves.
    """
    x_max, w_max = torch.rand(8) + 0.5, torch.rand(8) + 0.5
    assert torch.allclose(smoothquant.smoothing_scales(x_max, w_max, 0.0), 1 / w_max)
    assert torch.allclose(smoothquant.smoothing_scales(x_max, w_max, 1.0), x_max)
    act = ActSpec(8, "tensor")
    naive = copy.deepcopy(tiny_llama)
    quantize(naive, Recipe(QuantSpec(8, -1), [make_step("rtn")], act), calib_ids, progress=False)
    monkeypatch.setattr(smoothquant, "smoothing_scales", lambda x, w, a: torch.ones_like(x))
    smooth = copy.deepcopy(tiny_llama)
    quantize(smooth, Recipe(QuantSpec(8, -1), [make_step("smoothquant", {"alpha": 0.0})], act), calib_ids, progress=False)
    assert torch.equal(_out(smooth, eval_ids), _out(naive, eval_ids))


def test_smoothquant_auto_alpha_beats_naive_on_outliers(calib_ids, eval_ids):
    model = build_tiny("opt")
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.self_attn_layer_norm.weight[[5, 40]] *= 50
            layer.final_layer_norm.weight[7] *= 50
    act = ActSpec(8, "tensor")
    naive = _error(model, Recipe(QuantSpec(8, -1), [make_step("rtn")], act), calib_ids, eval_ids)
    auto = _error(model, Recipe(QuantSpec(8, -1), [make_step("smoothquant", {"alpha": "auto"})], act), calib_ids, eval_ids)
    assert auto < 0.5 * naive


def test_zeroquant_lkd_beats_zeroquant(tiny_llama, eval_ids):
    calib = torch.randint(0, 256, (32, 32), generator=torch.Generator().manual_seed(3))
    act = ActSpec(8, "token")
    spec = QuantSpec(4, 32)
    plain = _error(tiny_llama, Recipe(spec, [make_step("zeroquant")], act), calib, eval_ids)
    lkd = _error(tiny_llama, Recipe(spec, [make_step("zeroquant"), make_step("lkd", {"steps": 30})], act), calib, eval_ids)
    assert lkd < plain


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "build,fragment",
    [
        (lambda: act_spec(6), "--abits must be 4, 8 or 16"),
        (lambda: make_step("smoothquant", {"alpha": 1.5}), "alpha must be in [0, 1]"),
        (lambda: make_step("smoothquant", {"alpha": -0.1}), "alpha must be in [0, 1]"),
        (lambda: Recipe(QuantSpec(8, -1), [make_step("smoothquant")]), "give --abits 8"),
        (lambda: Recipe(QuantSpec(4, 32), [make_step("zeroquant")], ActSpec(8, "tensor")), "--act-granularity token"),
        (lambda: make_step("lkd", {"input": "teacher"}), "lkd input must be"),
        (lambda: make_step("awq", {"max_shrink": 1.0}), "max_shrink"),
    ],
)
def test_bad_options_state_the_rule(build, fragment):
    with pytest.raises(ValueError) as e:
        build()
    assert fragment in str(e.value)


def test_unknown_feeder_mapping_names_the_method(calib_ids, monkeypatch):
    model = build_tiny("bert")
    no_feeders = dataclasses.replace(
        ARCHITECTURES["BertModel"], groups=tuple(dataclasses.replace(g, feeder=None) for g in ARCHITECTURES["BertModel"].groups)
    )
    monkeypatch.setitem(ARCHITECTURES, "BertModel", no_feeders)
    with pytest.raises(ValueError, match="awq fold.*norm or linear that feeds each group"):
        quantize(model, Recipe(QuantSpec(4, 32), [make_step("awq")]), calib_ids, progress=False)
    quantize(model, Recipe(QuantSpec(4, 32), [make_step("rtn")]), calib_ids, progress=False)  # RTN needs no feeders
    monkeypatch.delitem(ARCHITECTURES, "BertModel")
    with pytest.raises(ValueError, match="unsupported architecture BertModel: smoothquant"):
        quantize(model, Recipe(QuantSpec(8, -1), [make_step("smoothquant")], ActSpec()), calib_ids, progress=False)


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--abits", "6"], "--abits must be 4, 8 or 16"),
        (["--recipe", "smoothquant", "--abits", "8", "--alpha", "2"], "alpha must be in [0, 1]"),
        (["--recipe", "smoothquant", "--abits", "8", "--alpha", "much"], "--alpha must be a number in [0, 1] or auto"),
        (["--recipe", "gptq", "--alpha", "0.5"], "put smoothquant in the recipe"),
        (["--recipe", "gptq", "--smooth-fold", "quantizer"], "--smooth-fold: smoothquant option(s); put smoothquant in the recipe"),
        (["--recipe", "smoothquant"], "give --abits 8"),
        (["--recipe", "zeroquant", "--abits", "8", "--act-granularity", "tensor"], "--act-granularity token"),
    ],
)
def test_cli_bad_activation_options(extra, fragment, llama_dir, calib_file, tmp_path, capsys):
    rc = main(["quantize", str(llama_dir), "--calib", str(calib_file), "--output", str(tmp_path / "out"), *QUANT_ARGS, *extra])
    assert_usage_error(capsys, rc, fragment)
    assert not (tmp_path / "out").exists()


def test_cli_smoothquant_w8a8_records_activations(tmp_path, calib_file, capsys):
    model_dir = save_tiny("opt", tmp_path / "opt")
    out = tmp_path / "out"
    args = ["--recipe", "smoothquant", "--alpha", "auto", "--abits", "8", "--act-granularity", "tensor"]
    rc = main(
        [
            "quantize",
            str(model_dir),
            "--calib",
            str(calib_file),
            "--output",
            str(out),
            *QUANT_ARGS,
            *args,
            "--wbits",
            "8",
            "--batch-size",
            "2",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    record = json.loads((out / "blockquant.json").read_text())
    assert record["activations"]["bits"] == 8 and record["activations"]["granularity"] == "tensor"
    assert len(record["activations"]["static_ranges"]) == 12  # 6 linears × 2 blocks, each with its calibrated scale
    assert record["recipe"]["steps"][0]["alpha"] == "auto"


def test_recipe_file_sets_activations(tmp_path):
    from blockquant import parse_recipe

    path = tmp_path / "r.yaml"
    path.write_text(
        "abits: 8\nact_granularity: tensor\nact_range: percentile\nact_percentile: 99.9\nsteps:\n  - method: smoothquant\n    alpha: 0.8\n"
    )
    recipe = parse_recipe(str(path), QuantSpec(8, -1))
    assert recipe.act == ActSpec(8, "tensor", True, "percentile", 99.9) and recipe.steps[0].options.alpha == 0.8
    assert parse_recipe(str(path), QuantSpec(8, -1), ActSpec(4)).act.bits == 8  # the file overrides the command line
    path.write_text("abits: 16\nsteps: [rtn]\n")
    assert parse_recipe(str(path), QuantSpec(4, 32), ActSpec(8)).act is None
    assert recipe.to_dict()["act"]["granularity"] == "tensor"


def test_smoothquant_quantizer_fold_keeps_fp_function(calib_ids, eval_ids):
    """BERT: s⁻¹ of the post-norm groups goes in front of the input quantizers; FP logits unchanged."""
    model = build_tiny("bert").double()
    ref = _out(model, eval_ids)
    for block, ctx in _block_contexts(model, calib_ids.long()):
        smoothed = smoothquant.smooth(block, ctx, ctx.inputs, alpha=0.8, fold="quantizer")
        assert len(smoothed) == 6  # every linear of the block, not only the v → o group
    assert _rel(_out(model, eval_ids), ref) < 1e-12
    q = build_tiny("bert")
    steps = [make_step("smoothquant", {"fold": "quantizer"}), make_step("lkd", {"steps": 3})]  # and trains through it
    quantize(q, Recipe(QuantSpec(8, -1), steps, ActSpec(8, "token")), calib_ids, batch_size=2, progress=False)
    assert _rel(_out(q, eval_ids), _out(build_tiny("bert"), eval_ids)) < 1e-3


@pytest.mark.parametrize("granularity", ["tensor", "token"])
def test_activation_scheme_and_smoothing_survive_the_checkpoint(granularity, tmp_path, calib_ids, eval_ids):
    """A saved W8A8 model (with ``fold: quantizer`` smoothing) evaluates as it was quantized; plain
    transformers, which knows nothing of activations, gets the quantized weights' function."""
    from transformers import AutoModel

    from blockquant.activations import SMOOTHING_FILE
    from blockquant.export import load_model_any
    from blockquant.export.checkpoint import DEQUANTIZED, save_checkpoint

    q = build_tiny("bert")
    steps = [make_step("smoothquant", {"fold": "quantizer", "alpha": 0.8})]
    result = quantize(q, Recipe(QuantSpec(8, -1), steps, ActSpec(8, granularity)), calib_ids, batch_size=2, progress=False)
    expected = _out(q, eval_ids)
    assert len(result.activations["layers"]) == 12  # every linear of the 2 blocks
    assert len(result.activations["smoothing"]["layers"]) == 10  # all but attention.output (v → o folds exactly)
    save_checkpoint(DEQUANTIZED, q, None, tmp_path / "o", result.record(), result)
    assert (tmp_path / "o" / SMOOTHING_FILE).is_file()
    assert _rel(_out(q, eval_ids), expected) == 0  # saving put the smoothed weights back exactly

    loaded, _ = load_model_any(tmp_path / "o")
    assert len(quantizers(loaded)) == 12
    assert _rel(_out(loaded, eval_ids), expected) < 1e-10

    plain = AutoModel.from_pretrained(tmp_path / "o")  # no blockquant hooks: weights Ŵ·diag(1/s), FP activations
    without_act = copy.deepcopy(q)
    from blockquant import activations

    activations.detach(without_act)
    for module in without_act.modules():
        if hasattr(module, activations.SMOOTHING_ATTR):
            module._forward_pre_hooks.clear()
            s = getattr(module, activations.SMOOTHING_ATTR)
            module.weight.data /= s.unsqueeze(0)
    assert _rel(_out(plain, eval_ids), _out(without_act, eval_ids)) < 1e-10
    assert _rel(_out(plain, eval_ids), _out(build_tiny("bert"), eval_ids)) < 1e-3  # W8: close to full precision


def test_cli_quantizer_fold_writes_dequantized_and_refuses_packed(tmp_path, calib_file, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("abits: 8\nact_granularity: tensor\nsteps:\n  - method: smoothquant\n    fold: quantizer\n")
    bert_dir = save_tiny("bert", tmp_path / "bert")
    args = [
        "quantize",
        str(bert_dir),
        "--calib",
        str(calib_file),
        *QUANT_ARGS,
        "--recipe",
        str(recipe),
        "--wbits",
        "8",
        "--group-size",
        "-1",
    ]
    capsys.readouterr()
    rc = main([*args, "--output", str(tmp_path / "packed"), "--format", "compressed-tensors"])
    assert_usage_error(capsys, rc, "packed formats have no place for", "--format dequantized")
    assert not (tmp_path / "packed").exists()
    flags = ["--recipe", "smoothquant", "--smooth-fold", "quantizer", "--abits", "8", "--act-granularity", "tensor"]
    rc = main([*args[: args.index("--recipe")], *args[args.index("--recipe") + 2 :], *flags, "--output", str(tmp_path / "o")])
    assert rc == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "o" / "blockquant.json").read_text())
    assert record["activations"]["smoothing"]["file"] == "activation_smoothing.safetensors"
    assert (tmp_path / "o" / "activation_smoothing.safetensors").is_file()


def test_awq_before_another_step_hands_on_fp_weights(calib_ids, eval_ids):
    """Chained (``awq,gptq``): scales folded, weights neither rounded nor clamped — FP function unchanged."""
    from blockquant.methods import awq

    model = build_tiny("llama").double()
    ref = _out(model, eval_ids)
    for block, ctx in _block_contexts(model, calib_ids.long()):
        results = awq.apply(block, dataclasses.replace(ctx, final=False), QuantSpec(3, 32), awq.AWQOptions())
        assert set(results) == {n for g in ctx.groups for n in g.linears}  # the searched grids, for blockft
    assert _rel(_out(model, eval_ids), ref) < 1e-12
