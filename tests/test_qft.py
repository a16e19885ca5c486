"""QFT: the parameterisation, each degree of freedom's fold, export round trips, hw presets, bad input."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from conftest import VOCAB, build_tiny

from blockquant import QuantSpec, activations, parse_recipe, quantize
from blockquant.api import calibration_batches
from blockquant.arch import arch_for, get_blocks
from blockquant.capture import ModelContext, capture_block_inputs, run_block
from blockquant.export import load, save_packed
from blockquant.fold import channel_index
from blockquant.methods import qft
from blockquant.recipe import ActSpec, Recipe, act_spec, make_step
from blockquant.report import QuantResult

SPEC = QuantSpec(bits=3, group_size=4, scale_dtype="float32")  # 4 divides every tiny width (Llama MLP 172): packable


def _context(model, calib, act=None) -> ModelContext:
    """A ModelContext on ``model`` as the pipeline builds it (FP last-block outputs as targets)."""
    arch = arch_for(model)
    blocks = get_blocks(model, arch)
    inputs = capture_block_inputs(model, blocks, calibration_batches(calib, 4, arch.kind == "encoder"), "cpu")
    h = inputs
    for block in blocks:
        h = h.with_hidden(run_block(block, h))
    return ModelContext(model, arch, inputs, h.hidden, {}, torch.device("cpu"), act, [], False)


def _out(model, ids) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)) if arch_for(model).kind == "encoder" else model(input_ids=ids)
    return (out.last_hidden_state if arch_for(model).kind == "encoder" else out.logits).float()


def _kl(model, fp_logprobs, ids) -> float:
    """Mean per-token KL(p_fp ‖ p_model): QFT's training loss."""
    pred = _out(model, ids).log_softmax(-1).flatten(0, -2)
    return float(torch.nn.functional.kl_div(pred, fp_logprobs.flatten(0, -2), log_target=True, reduction="batchmean"))


def _perturb(kinds: dict[str, list], which: str, seed: int = 0) -> None:
    """Move one kind of trainable tensor away from its initial value (as training would)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in kinds[which]:
            if which == "weight":
                p.add_(torch.randn(p.shape, generator=gen) * 0.6)
            elif which == "bias":
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
            else:  # log step sizes / log equalization factors / log activation scales, zero points
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "bert"])
def test_fold_and_export_reproduce_the_fake_quant_model(family, tmp_path, calib_ids):
    """Every DoF moved at once: the folded plain model and its packed checkpoint give the fake-quant logits."""
    model = build_tiny(family)
    ctx = _context(model, calib_ids)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped, kinds, undo = qft._setup(ctx, SPEC, qft.QFTOptions())
    assert kinds["equalize"] and kinds["bias"]
    for which in ("scale", "weight", "equalize", "bias"):
        _perturb(kinds, which)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))
    fake = _out(model, ids)
    layers = qft.fold(ctx, wrapped, undo)
    assert not any(isinstance(m, qft.QFTLinear) for m in model.modules())
    torch.testing.assert_close(_out(model, ids), fake, rtol=1e-5, atol=1e-5)
    for name, r in layers.items():  # every weight is on its grid: codes integer, in range
        w = model.get_submodule(name).weight.detach().float()
        codes = w / r.scale.repeat_interleave(4, 1)[:, : w.shape[1]] + r.zero.repeat_interleave(4, 1)[:, : w.shape[1]]
        assert (codes - codes.round()).abs().max() < 1e-3 and codes.min() >= -0.01 and codes.max() <= SPEC.qmax + 0.01
    result = QuantResult(Recipe(SPEC, [make_step("qft")]), layers)
    save_packed(model, result, tmp_path / "out", dtype=torch.float32)
    torch.testing.assert_close(_out(load(tmp_path / "out"), ids), fake, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["scale", "weight", "equalize", "bias", "act"])
def test_each_dof_folds_exactly(which, calib_ids):
    """One DoF at a time on Llama (norm and linear producers, GQA-free v → o): the fold is exact."""
    model = build_tiny("llama")
    act = act_spec(8, "tensor") if which == "act" else None
    if act is not None:  # static input quantizers, as the pipeline attaches them
        quantize(model, Recipe(SPEC, [make_step("rtn")], act), calib_ids, batch_size=4, progress=False)
    ctx = _context(model, calib_ids, act)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped, kinds, undo = qft._setup(ctx, SPEC, qft.QFTOptions())
    assert kinds[which]
    _perturb(kinds, which, seed=3)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(6))
    fake = _out(model, ids)
    qft.fold(ctx, wrapped, undo)
    torch.testing.assert_close(_out(model, ids), fake, rtol=1e-5, atol=1e-5)


def test_equalization_is_a_pure_reparameterisation_before_rounding():
    """e folded into a norm and a GQA v → o pair leaves the full-precision function unchanged."""
    model = build_tiny("qwen2")  # grouped-query attention: 4 query heads read 2 KV heads
    arch = arch_for(model)
    block = get_blocks(model, arch)[0]
    v_to_o = arch.groups[1]
    index, problem = channel_index(block, v_to_o, model.config.hidden_size // model.config.num_attention_heads)
    assert problem is None and index.shape == (64,) and int(index.max()) == 31
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    before = _out(model, ids)
    e = torch.rand(32, generator=torch.Generator().manual_seed(1)) + 0.5
    with torch.no_grad():  # v's rows and bias ÷ e, o's columns × e[index]
        block.self_attn.v_proj.weight.div_(e.unsqueeze(1))
        block.self_attn.v_proj.bias.div_(e)
        block.self_attn.o_proj.weight.mul_(e[index].unsqueeze(0))
    torch.testing.assert_close(_out(model, ids), before, rtol=1e-4, atol=1e-5)


def test_qft_after_gptq_lowers_held_out_kl_and_writes_biases_into_the_config(tmp_path):
    calib = torch.randint(0, VOCAB, (32, 32), generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(bits=2, group_size=32)
    base = build_tiny("llama")
    quantize(base, parse_recipe("gptq", spec), calib, batch_size=4, progress=False)
    model = build_tiny("llama")
    recipe = Recipe(spec, [make_step("gptq"), make_step("qft", {"steps": 40, "eval_every": 10, "lr_weight": 5e-3})])
    result = quantize(model, recipe, calib, batch_size=4, progress=False)
    notes = result.record()["qft"]
    evals = [v for _, v in notes["held_out_loss"]]
    assert min(evals) < evals[0], evals  # training found a better held-out state than GPTQ's
    assert notes["hw"] == "int-per-group" and set(notes["bias_flags"]) == {"attention_bias", "mlp_bias"}
    assert model.config.attention_bias and model.config.mlp_bias
    ids = calib[-4:]  # held-out batch: the kept state is the best one there
    fp = _out(build_tiny("llama"), ids).log_softmax(-1)

    assert _kl(model, fp, ids) < _kl(base, fp, ids)
    model.save_pretrained(tmp_path / "deq")  # a plain checkpoint: transformers rebuilds the biases from the config
    import transformers

    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "deq").eval()
    torch.testing.assert_close(_out(again, ids), _out(model, ids))


def test_pow2_gives_only_power_of_two_scales(calib_ids):
    model = build_tiny("opt")
    act = act_spec(8, "tensor")
    recipe = Recipe(SPEC, [make_step("rtn"), make_step("qft", {"steps": 4, "hw": "pow2"})], act)
    result = quantize(model, recipe, calib_ids, batch_size=4, progress=False)
    for r in result.layers.values():
        assert torch.equal(torch.exp2(torch.log2(r.scale).round()), r.scale)
    static = [q["scale"] for q in result.activations["static_ranges"].values()]
    assert static and all(s == 2.0 ** round(math.log2(s)) for s in static)


def test_static_activation_scales_are_learned_and_shared_per_group(calib_ids):
    model = build_tiny("llama")
    recipe = Recipe(
        SPEC, [make_step("gptq"), make_step("qft", {"steps": 6, "eval_every": 3, "holdout": 0.0, "lr_act": 0.05})], act_spec(8, "tensor")
    )
    before = build_tiny("llama")
    quantize(before, Recipe(SPEC, [make_step("gptq")], act_spec(8, "tensor")), calib_ids, batch_size=4, progress=False)
    result = quantize(model, recipe, calib_ids, batch_size=4, progress=False)
    ranges = result.activations["static_ranges"]
    start = activations.record(before, ActSpec(8, "tensor"))["static_ranges"]
    q = "model.layers.0.self_attn."
    assert ranges[q + "q_proj"] == ranges[q + "k_proj"] == ranges[q + "v_proj"]
    assert ranges[q + "q_proj"]["scale"] != start[q + "q_proj"]["scale"]
    assert not any("input_quantizer" in k for k in model.state_dict())


def test_hw_preset_the_grid_cannot_satisfy_is_refused_before_work():
    parse_recipe("gptq,qft", QuantSpec(bits=3, group_size=128))  # the default preset follows the grid
    parse_recipe("gptq,qft", QuantSpec(bits=3, group_size=-1))
    with pytest.raises(ValueError, match="int-per-channel .* --group-size -1"):
        Recipe(QuantSpec(bits=3, group_size=128), [make_step("qft", {"hw": "int-per-channel"})])
    with pytest.raises(ValueError, match="int-per-group .* --group-size g"):
        Recipe(QuantSpec(bits=3, group_size=-1), [make_step("qft", {"hw": "int-per-group"})])
    with pytest.raises(ValueError, match="unknown --hw 'fp8'; choose one of int-per-channel, int-per-group, pow2"):
        make_step("qft", {"hw": "fp8"})
    with pytest.raises(ValueError, match="then qft"):
        quantize(build_tiny("llama"), parse_recipe("qft,gptq", QuantSpec()), torch.zeros(2, 8, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="accumulate .* must be >= 1"):
        make_step("qft", {"accumulate": 0})
    with pytest.raises(ValueError, match="nothing to train"):
        make_step("qft", {"step_sizes": False, "equalize": False, "bias": False, "weights": False})


def test_cli_rejects_bad_hw_in_one_line(tmp_path, llama_dir, calib_file, capsys):
    from blockquant.cli import main

    code = main([
        "quantize", str(llama_dir), "--recipe", "gptq,qft", "--hw", "int-per-channel", "--group-size", "32",
        "--calib", str(calib_file), "--output", str(tmp_path / "out"), "--quiet",
    ])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("blockquant: error: --hw int-per-channel")
    assert not (tmp_path / "out").exists()
    code = main(
        ["quantize", str(llama_dir), "--recipe", "gptq", "--hw", "pow2", "--calib", str(calib_file), "--output", str(tmp_path / "o")]
    )
    assert code == 2 and "--hw" in capsys.readouterr().err


def test_unknown_producer_mapping_switches_equalization_off_with_a_warning(calib_ids, caplog):
    model = build_tiny("bert")
    with caplog.at_level(logging.WARNING, logger="blockquant.methods.qft"):
        result = quantize(model, Recipe(SPEC, [make_step("rtn"), make_step("qft", {"steps": 2})]), calib_ids, batch_size=4, progress=False)
    text = caplog.text
    assert "no equalization for attention.self.query, attention.self.key, attention.self.value" in text
    assert "intermediate.dense" in text and "output.dense" in text
    assert set(result.model_steps["qft"]["no_equalization"]) == {
        "attention.self.query, attention.self.key, attention.self.value",
        "intermediate.dense",
        "output.dense",
    }


def test_diverging_loss_stops_and_restores_the_best_state(calib_ids, caplog):
    spec = QuantSpec(bits=2, group_size=32)
    base = build_tiny("llama")
    quantize(base, parse_recipe("gptq", spec), calib_ids, batch_size=2, progress=False)
    model = build_tiny("llama")
    opts = {"steps": 30, "eval_every": 2, "lr_weight": 50.0, "lr_scale": 5.0, "lr_bias": 5.0, "lr_equalize": 5.0, "grad_clip": 1e9}
    with caplog.at_level(logging.WARNING):
        result = quantize(model, Recipe(spec, [make_step("gptq"), make_step("qft", opts)]), calib_ids, batch_size=2, progress=False)
    assert result.model_steps["qft"]["stopped"] == "diverged"
    assert "diverged" in caplog.text
    ids = calib_ids[-2:]
    best = min(v for _, v in result.model_steps["qft"]["held_out_loss"])
    fp = _out(build_tiny("llama"), ids).log_softmax(-1)
    assert _kl(model, fp, ids) == pytest.approx(best, rel=1e-4)
    assert json.dumps(result.record())  # the record stays JSON


def test_bf16_checkpoint_reloads_the_trained_model_exactly(tmp_path, calib_ids):
    """Scales, folded norms and biases trained on the checkpoint dtype's grid: the bf16 export changes nothing."""
    model = build_tiny("llama").to(torch.bfloat16).float()  # a bf16 checkpoint computed in fp32, as the CLI does
    spec = QuantSpec(bits=3, group_size=4, scale_dtype="bfloat16")
    ctx = _context(model, calib_ids)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped, kinds, undo = qft._setup(ctx, spec, qft.QFTOptions())
    for which in ("scale", "weight", "equalize", "bias"):
        _perturb(kinds, which, seed=7)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(8))
    fake = _out(model, ids)
    layers = qft.fold(ctx, wrapped, undo)
    save_packed(model, QuantResult(Recipe(spec, [make_step("qft")]), layers), tmp_path / "out", dtype=torch.bfloat16)
    record = json.loads((tmp_path / "out" / "blockquant.json").read_text())
    assert record["export"]["scale_rounding"]["weights_changed"] == 0
    torch.testing.assert_close(_out(load(tmp_path / "out", dtype=torch.float32), ids), fake, rtol=1e-5, atol=1e-5)


def test_recipe_chains_blockft_then_qft(calib_ids):
    model = build_tiny("opt")
    recipe = Recipe(SPEC, [make_step("gptq"), make_step("blockft", {"steps": 2}), make_step("qft", {"steps": 2})])
    result = quantize(model, recipe, calib_ids, batch_size=4, progress=False)
    assert [first for first, _ in result.train_logs] == [0, 1, 0]  # two blockft windows, then qft
    assert result.model_steps["qft"]["steps_run"] == 2
    times = result.record()["step_seconds"]  # each step of the chain costed on its own (bench/qft.py's cost ratio)
    assert set(times) == {"gptq", "blockft", "qft"}
    assert all(0 < t["seconds"] <= result.seconds and t["cpu_seconds"] >= 0 for t in times.values())


def test_cli_quantize_with_qft_writes_a_checkpoint_that_evaluates(tmp_path, llama_dir, calib_file, capsys):
    from blockquant.cli import main

    out = tmp_path / "out"
    args = ["quantize", str(llama_dir), "--recipe", "gptq,qft", "--wbits", "3", "--group-size", "4", "--steps", "3"]
    assert main([*args, "--nsamples", "8", "--seqlen", "32", "--calib", str(calib_file), "--output", str(out), "--quiet"]) == 0
    record = json.loads((out / "blockquant.json").read_text())
    assert record["qft"]["steps_run"] == 3 and record["qft"]["hw"] == "int-per-group"
    assert main(["eval", str(out), "--data", str(calib_file), "--seqlen", "32", "--quiet", "--json"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_cli_qft_alone_reports_its_own_loss_and_writes_strict_json(tmp_path, llama_dir, calib_file, capsys):
    """QFT alone has no per-block errors: the summary gives QFT's held-out loss and the record holds null, not NaN."""
    from blockquant.cli import main

    out = tmp_path / "out"
    args = ["quantize", str(llama_dir), "--recipe", "qft", "--wbits", "4", "--group-size", "-1", "--steps", "2", "--batch-size", "1"]
    assert main([*args, "--nsamples", "8", "--seqlen", "32", "--calib", str(calib_file), "--output", str(out), "--quiet"]) == 0
    assert "qft held-out loss" in capsys.readouterr().out

    def refuse(constant: str):
        raise AssertionError(f"{constant} in blockquant.json")

    record = json.loads((out / "blockquant.json").read_text(), parse_constant=refuse)
    assert {v["relative_output_error"] for v in record["layers"].values()} == {None}
