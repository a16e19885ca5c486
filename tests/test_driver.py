"""The one driver and what feeds it: the method table, recipes built from flags without edits in
place, training options nested once, a group wider than its layer, the command line's output
when it is not on a terminal."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from blockquant import quantize
from blockquant.methods import METHODS
from blockquant.primitives import compute_qparams, fake_quantize, n_groups
from blockquant.recipe import Recipe, make_step, parse_recipe, step_options, with_options
from blockquant.spec import QuantSpec


def test_every_method_declares_what_it_works_on():
    for name, method in METHODS.items():
        assert method.kinds(), name
    assert METHODS["admm"].kinds() == ["convolution network"]
    assert METHODS["blockft"].kinds() == METHODS["lkd"].kinds() == ["transformer"]
    assert set(METHODS["rtn"].kinds()) == set(METHODS["gptq"].kinds()) == set(METHODS["qft"].kinds()) == {"transformer", "convolution network"}


def test_training_options_are_one_nested_config_with_each_methods_defaults():
    defaults = {m: METHODS[m].options().train for m in ("blockft", "lkd", "qft")}
    assert (defaults["blockft"].steps, defaults["lkd"].steps, defaults["qft"].steps) == (200, 100, 150)
    assert defaults["qft"].diverge == 4.0 and defaults["qft"].patience == 3 and defaults["blockft"].diverge is None
    flat = make_step("qft", {"steps": 5, "holdout": 0.2, "hw": "pow2"})
    nested = make_step("qft", {"train": {"steps": 5, "holdout": 0.2}, "hw": "pow2"})
    assert flat == nested and flat.options.train.steps == 5 and flat.options.train.patience == 3  # the rest keep qft's defaults
    assert make_step(flat.method, step_options(flat)) == flat  # the flat form round-trips
    with pytest.raises(ValueError, match="unknown option"):
        make_step("blockft", {"train": {"window": 2}})  # window is blockft's own, not a training setting
    with pytest.raises(ValueError, match="unknown option"):
        make_step("gptq", {"steps": 5})  # gptq does not train
    with pytest.raises(ValueError, match="holdout must be in"):
        make_step("lkd", {"holdout": 1.5})
    with pytest.raises(dataclasses.FrozenInstanceError):
        flat.options.train.steps = 6  # type: ignore[misc]


def test_flags_give_a_new_validated_recipe_and_leave_the_old_one_alone():
    recipe = parse_recipe("gptq,blockft", QuantSpec(bits=3))
    changed = with_options(recipe, {"steps": 7, "window": 2, "lr_scale": None})
    assert changed.steps[-1].options.train.steps == 7 and changed.steps[-1].options.window == 2
    assert recipe.steps[-1].options.train.steps == 200 and recipe.steps[-1].options.window == 1
    assert with_options(recipe, {}) == recipe
    smooth = with_options(parse_recipe("smoothquant", QuantSpec(8, -1), _act()), {"alpha": 0.8, "fold": "quantizer"})
    assert smooth.steps[0].options.alpha == 0.8 and smooth.steps[0].options.fold == "quantizer"
    with pytest.raises(ValueError, match="--window: the recipe's last step qft takes no such option; blockft takes it"):
        with_options(parse_recipe("gptq,qft", QuantSpec(bits=3)), {"window": 2})
    with pytest.raises(ValueError, match="--smooth-fold: smoothquant option"):
        with_options(recipe, {"fold": "quantizer"})
    with pytest.raises(ValueError, match="--hw: qft option"):
        with_options(recipe, {"hw": "pow2"})
    with pytest.raises(ValueError, match="--hw int-per-channel"):  # the new recipe is validated as a whole
        with_options(parse_recipe("gptq,qft", QuantSpec(bits=3, group_size=128)), {"hw": "int-per-channel"})


def _act():
    from blockquant.spec import ActSpec

    return ActSpec(8, "token")


def test_a_group_wider_than_the_layer_is_one_group_per_row():
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    wide, channel = QuantSpec(4, 128), QuantSpec(4, -1)
    assert n_groups(wide, 40) == 1
    s_wide, z_wide = compute_qparams(w, wide)
    s_chan, z_chan = compute_qparams(w, channel)
    assert torch.equal(s_wide, s_chan) and torch.equal(z_wide, z_chan)
    assert torch.equal(fake_quantize(w, s_wide, z_wide, wide), fake_quantize(w, s_chan, z_chan, channel))


def test_an_unsupported_model_is_named():
    with pytest.raises(ValueError, match="unsupported architecture Sequential"):
        quantize(torch.nn.Sequential(torch.nn.Linear(4, 4)), Recipe(QuantSpec(4, -1), [make_step("rtn")]), torch.zeros(1, 4, dtype=torch.long))


def test_rtn_runs_without_calibration_and_gives_the_calibrated_weights(make_tiny, calib_ids):
    spec = QuantSpec(bits=4, group_size=32)
    with_data, without = make_tiny("llama"), make_tiny("llama")
    quantize(with_data, parse_recipe("rtn", spec), calib_ids, progress=False)
    result = quantize(without, parse_recipe("rtn", spec), None, progress=False)
    a, b = with_data.state_dict(), without.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # RTN's grid reads the weights alone
    record = result.record()
    assert len(record["blocks"]) == 2 and record["blocks"][0]["output_error"] is None  # not measured: null, not NaN
    assert all(layer["relative_output_error"] is None for layer in record["layers"].values())


def test_a_recipe_that_needs_data_is_refused_without_calibration(make_tiny):
    for name in ("gptq", "awq,gptq", "gptq,blockft"):
        with pytest.raises(ValueError, match="need\\(s\\) calibration data"):
            quantize(make_tiny("llama"), parse_recipe(name, QuantSpec(bits=4, group_size=32)), None, progress=False)
    weighted = Recipe(QuantSpec(bits=4, group_size=32), [make_step("rtn", {"clip_search": True})])
    with pytest.raises(ValueError, match="rtn need"):  # the input-weighted search reads E[x²]
        quantize(make_tiny("llama"), weighted, None, progress=False)


def test_block_errors_follow_a_few_samples_unless_a_step_trains_on_the_fp_stream(make_tiny):
    calib = torch.randint(0, 256, (40, 16), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=3, group_size=32)
    result = quantize(make_tiny("llama"), parse_recipe("gptq", spec), calib, batch_size=8, progress=False)
    assert result.error_samples == 16 and result.record()["block_errors_on_samples"] == 16
    assert all(0 < b.output_error < 1 for b in result.blocks)
    chain = with_options(parse_recipe("gptq,blockft", spec), {"steps": 2})
    whole = quantize(make_tiny("llama"), chain, calib, batch_size=8, progress=False)
    assert whole.error_samples is None  # fine-tuning reads the whole FP stream


def test_a_layer_that_overflows_once_quantized_is_named(make_tiny, calib_ids, monkeypatch):
    """The quantized stream replaces its inputs batch by batch; a NaN/Inf output still names its layer."""
    real = METHODS["rtn"].block

    def apply_then_break(block, ctx, spec, opts):
        results = real(block, ctx, spec, opts)
        if ctx.index == 1:
            block.mlp.down_proj.register_forward_hook(lambda _m, _a, out: out * float("inf"))
        return results

    monkeypatch.setitem(METHODS, "rtn", dataclasses.replace(METHODS["rtn"], block=apply_then_break))
    with pytest.raises(ValueError, match="block 1 \\(quantized\\): NaN/Inf output, first produced by layer mlp.down_proj"):
        quantize(make_tiny("llama"), parse_recipe("rtn", QuantSpec(bits=4, group_size=32)), calib_ids, progress=False)
