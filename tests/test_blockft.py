"""Block-wise fine-tuning: on-grid result, windows, downstream objectives, bad input, NaN guard."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import assert_on_grid
from torch.nn.utils import parametrize

import blockquant.methods.blockft as blockft_module
from blockquant import QuantSpec, quantize
from blockquant.arch import arch_for, block_linears, get_blocks
from blockquant.finetune import FakeQuantLinear, output_loss, train
from blockquant.layers import weight_matrix
from blockquant.primitives import compute_qparams, expand, fake_quantize
from blockquant.recipe import Recipe, make_step

SPEC = QuantSpec(bits=2, group_size=32)


@pytest.fixture
def calib_ids():
    """32 random sequences: 8 batches of 4, one held out for early stopping."""
    return torch.randint(0, 256, (32, 32), generator=torch.Generator().manual_seed(1))


def run(model, calib, *steps, spec=SPEC):
    recipe = Recipe(spec, [make_step(name, opts) for name, opts in steps])
    return quantize(model, recipe, calib, batch_size=4, progress=False)


def all_on_grid(model, result, spec=SPEC):
    arch = arch_for(model)
    for i, block in enumerate(get_blocks(model, arch)):
        for name, layer in block_linears(block, arch).items():
            r = result.layers[f"{arch.blocks}.{i}.{name}"]
            assert_on_grid(weight_matrix(layer), r.scale, r.zero, spec, r.g_idx)


@pytest.mark.parametrize("rounding", ["ste", "adaround"])
def test_trained_model_is_on_the_integer_grid(make_tiny, calib_ids, rounding):
    model = make_tiny("llama")
    result = run(model, calib_ids, ("blockft", {"steps": 12, "rounding": rounding, "eval_every": 4}))
    all_on_grid(model, result)


def test_blockft_beats_rtn_on_block_error(make_tiny, calib_ids):
    rtn = run(make_tiny("llama"), calib_ids, ("rtn", {}))
    ft = run(make_tiny("llama"), calib_ids, ("blockft", {"steps": 40, "eval_every": 10}))
    for a, b in zip(ft.blocks, rtn.blocks):
        assert a.output_error < b.output_error


def test_gptq_init_then_blockft_stays_on_grid_and_improves(make_tiny, calib_ids):
    gptq = run(make_tiny("qwen2"), calib_ids, ("gptq", {}))
    model = make_tiny("qwen2")
    chained = run(model, calib_ids, ("gptq", {}), ("blockft", {"steps": 30, "eval_every": 10}))
    all_on_grid(model, chained)
    assert chained.blocks[-1].output_error < gptq.blocks[-1].output_error


def test_window_one_equals_single_block_and_is_deterministic(make_tiny, calib_ids):
    opts = {"steps": 10, "eval_every": 5}
    a, b = make_tiny("llama"), make_tiny("llama")
    run(a, calib_ids, ("blockft", opts))
    run(b, calib_ids, ("blockft", {**opts, "window": 1, "stride": 1}))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("window,stride", [(1, 1), (2, 1)])
def test_targets_from_the_driver_equal_the_fp_window_run_again(make_tiny, calib_ids, monkeypatch, window, stride):
    """The window's targets are the driver's FP outputs (not computed twice): training on them is
    bit for bit training on the FP window run again on its FP input."""
    import dataclasses

    import blockquant.api as api

    opts = {"steps": 6, "eval_every": 3, "window": window, "stride": stride}
    a, b = make_tiny("llama"), make_tiny("llama")
    reused = run(a, calib_ids, ("gptq", {}), ("blockft", opts))
    made = api.WindowContext
    monkeypatch.setattr(api, "WindowContext", lambda *args, **kw: dataclasses.replace(made(*args, **kw), fp_outputs=None))
    recomputed = run(b, calib_ids, ("gptq", {}), ("blockft", opts))
    assert [log.losses for _, log in reused.train_logs] == [log.losses for _, log in recomputed.train_logs]
    assert [(r.input_error, r.output_error) for r in reused.blocks] == [(r.input_error, r.output_error) for r in recomputed.blocks]
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("window,stride", [(2, 1), (2, 2)])
def test_joint_window_on_grid_with_one_report_per_block(make_tiny, calib_ids, window, stride):
    model = make_tiny("llama")
    result = run(model, calib_ids, ("blockft", {"steps": 8, "window": window, "stride": stride, "eval_every": 4}))
    assert [b.index for b in result.blocks] == [0, 1]
    all_on_grid(model, result)


@pytest.mark.parametrize(
    "family,objective,linears,floats",
    [("llama", "next:1", 7, False), ("llama", "logits", 7, False), ("bert", "logits", 6, False), ("llama", "next:1", 7, True)],
)
def test_downstream_gradient_reaches_only_the_trained_block(make_tiny, calib_ids, monkeypatch, family, objective, linears, floats):
    """During block 0's training, no parameter outside block 0's fake-quant wrappers (and, with
    ``train_float``, its norms) gets a gradient."""
    model = make_tiny(family)
    seen = []

    def checking_train(
        modules, loss_on, train_items, eval_items, cfg, progress=True, groups=None, penalty=None, label="train", share=None, per_sample=None
    ):
        trainable = {id(p) for ps, _ in groups for p in ps}
        with torch.enable_grad():
            loss = loss_on(train_items[0])
            loss.backward()
        outside = [n for n, p in model.named_parameters() if p.grad is not None and id(p) not in trainable]
        inside = [m for m in modules if m.weight.grad is not None and m.weight.grad.abs().sum() > 0]
        norms = [n for n, p in model.named_parameters() if "norm" in n and p.grad is not None and p.grad.abs().sum() > 0]
        seen.append((outside, len(inside), len(modules), norms))
        for ps, _ in groups:
            for p in ps:
                p.grad = None
        return train(modules, loss_on, train_items, eval_items, cfg, progress, groups, penalty)

    monkeypatch.setattr(blockft_module, "train", checking_train)
    run(model, calib_ids, ("blockft", {"steps": 2, "objective": objective, "train_float": floats}))
    outside, inside, total, norms = seen[0]
    assert outside == []
    assert inside == total == linears  # every linear of block 0, and only those, is trained
    assert len(norms) == (2 if floats else 0) and all(n.startswith("model.layers.0.") for n in norms)


def test_nan_loss_restores_best_state_and_warns(make_tiny, calib_ids, monkeypatch, caplog):
    model = make_tiny("llama")
    calls = {"n": 0}
    real_forward = FakeQuantLinear.forward

    def poisoned(self, x):
        calls["n"] += 1
        y = real_forward(self, x)
        return y * float("nan") if self.training and calls["n"] > 60 else y

    monkeypatch.setattr(FakeQuantLinear, "forward", poisoned)
    with caplog.at_level(logging.WARNING):
        result = run(model, calib_ids, ("blockft", {"steps": 20, "eval_every": 2}))
    assert any("NaN" in r.message and "block" in r.message for r in caplog.records)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(log.stopped == "nan" for _, log in result.train_logs)
    all_on_grid(model, result)


def quantized_weights(model) -> set[str]:
    """Names of the weights the methods quantize (every other block parameter stays float)."""
    arch = arch_for(model)
    return {f"{arch.blocks}.{i}.{n}.weight" for i, b in enumerate(get_blocks(model, arch)) for n in block_linears(b, arch)}


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_float_tensors_train_as_the_checkpoint_stores_them(make_tiny, calib_ids, family):
    """``train_float``: the norms and the linears' biases move, each to a value the checkpoint's
    dtype holds exactly; the linears stay on their grids; nothing is left parametrized or trainable."""
    spec = QuantSpec(bits=2, group_size=32, scale_dtype="bfloat16")
    before = make_tiny(family)
    model = make_tiny(family)
    result = run(model, calib_ids, ("blockft", {"steps": 12, "eval_every": 4, "train_float": True, "lr_float": 1e-2}), spec=spec)
    all_on_grid(model, result, spec)
    arch = arch_for(model)
    quantized = quantized_weights(model)
    old = dict(before.named_parameters())
    floats = {n: p for n, p in model.named_parameters() if n.startswith(arch.blocks) and n not in quantized}
    assert any(n.endswith("norm.weight") or n.endswith("LayerNorm.weight") for n in floats)
    if family == "bert":
        assert any(n.endswith("dense.bias") for n in floats)
    for name, p in floats.items():
        assert not torch.equal(p, old[name]), name
        assert torch.equal(p, p.to(torch.bfloat16).float()), name
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(p.requires_grad == old[n].requires_grad for n, p in model.named_parameters())


def _one_layer() -> FakeQuantLinear:
    """A 2-bit fake-quant 8 → 4 linear with fixed N(0, 1) weights, for tests of ``train`` alone."""
    layer = torch.nn.Linear(8, 4)
    torch.nn.init.normal_(layer.weight, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(2, 8)
    return FakeQuantLinear(layer, spec, *compute_qparams(layer.weight.detach(), spec))


def test_proximal_term_holds_the_codes_near_their_start(make_tiny, calib_ids, monkeypatch):
    """``prox`` pulls the master weights back towards the codes each block started from (GPTQ's): a
    strong pull changes far fewer of them than none, and the result is still on the grid."""
    changed = []

    def counting_train(modules, *args, **kwargs):
        start = [fq.weight.detach().round() for fq in modules]
        log = train(modules, *args, **kwargs)
        moved = sum(int((fq.weight.detach().round() != s).sum()) for fq, s in zip(modules, start))
        changed[-1] += moved / sum(s.numel() for s in start)
        return log

    monkeypatch.setattr(blockft_module, "train", counting_train)
    for prox in (0.0, 1e4):
        changed.append(0.0)
        model = make_tiny("llama")
        opts = {"steps": 30, "lr_weight": 0.1, "holdout": 0.0, "prox": prox}  # no early stop: the last state is kept
        all_on_grid(model, run(model, calib_ids, ("gptq", {}), ("blockft", opts)))
    assert changed[0] > 0.05
    assert changed[1] < changed[0] / 4


def test_a_penalty_drives_training_but_not_the_held_out_loss():
    """``train``'s penalty joins the training objective only: early stopping judges the data loss."""
    from blockquant.finetune import TrainConfig

    def setup():
        fq = _one_layer()
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
        start = fq.weight.detach().clone()
        return fq, (lambda i: fq(x).pow(2).mean()), (lambda: 1e3 * torch.sum((fq.weight - (start + 3)) ** 2)), start

    cfg = TrainConfig(steps=20, eval_every=1, settle=0.9, patience=100)
    fq, loss_on, penalty, start = setup()
    data_loss = float(loss_on(0).detach())
    log = train([fq], loss_on, [0], [0], cfg, progress=False, penalty=penalty)
    assert log.evals[0][1] == pytest.approx(data_loss)  # the penalty (1e3 · 9 · 32 at the start) is not in it
    fq, loss_on, penalty, start = setup()
    train([fq], loss_on, [0], [], cfg, progress=False, penalty=penalty)  # no held-out items: the last state is kept
    assert float((fq.weight.detach() - start).mean()) > 0.15  # Adam at lr 0.02 on the cosine: at most 0.21 in 20 steps, up towards +3


def test_float_tensors_stay_put_by_default(make_tiny, calib_ids):
    before, model = make_tiny("bert"), make_tiny("bert")
    run(model, calib_ids, ("blockft", {"steps": 6, "eval_every": 3}))
    quantized = quantized_weights(model)
    old = dict(before.named_parameters())
    assert all(torch.equal(p, old[n]) for n, p in model.named_parameters() if n not in quantized)


@pytest.mark.parametrize(
    "opts,match",
    [
        ({"window": 3}, "window 3 is larger than the model's 2 blocks"),
        ({"objective": "next:5"}, "points past the last block"),
        ({"objective": "next:0"}, "objective must be"),
        ({"objective": "bogus"}, "objective must be"),
        ({"lr_scale": 0.0}, "learning rates must be > 0"),
        ({"lr_weight": -1e-5}, "learning rates must be > 0"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"window": 2, "stride": 3}, "stride <= window"),
        ({"rounding": "floor"}, "rounding must be"),
        ({"lr_float": 0.0}, "lr_float must be > 0"),
        ({"prox": -1.0}, "prox must be >= 0"),
        ({"prox": 1.0, "rounding": "adaround"}, "does not apply to rounding 'adaround'"),
        ({"accumulate": 0}, "accumulate .* must be >= 1"),
        ({"autocast": "float8"}, "autocast must be"),
    ],
)
def test_bad_options_raise(make_tiny, calib_ids, opts, match):
    with pytest.raises(ValueError, match=match):
        run(make_tiny("llama"), calib_ids, ("blockft", opts))


def test_an_encoders_output_objective_is_its_pooled_embedding(make_tiny, calib_ids):
    """An encoder has no LM head: ``logits`` measures the mean-pooled embedding, which token-level
    errors that cancel in the mean leave untouched."""
    target = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
    cancel = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    assert output_loss(None, target + cancel - cancel.mean(1, keepdim=True), target) < 1e-12
    assert output_loss(None, 1.1 * target, target) == pytest.approx(0.01, rel=1e-4)  # relative to the embedding's mean square
    model = make_tiny("bert")
    result = run(model, calib_ids, ("gptq", {}), ("blockft", {"objective": "logits", "steps": 4, "eval_every": 2}))
    all_on_grid(model, result)


def test_next_one_on_a_post_norm_model_is_single_block_ft_and_says_so(make_tiny, calib_ids, caplog):
    """BERT's block b+1 reads block b's output unnormalised, so next:1 measures the single-block loss."""
    opts = {"steps": 6, "eval_every": 3}
    a, b = make_tiny("bert"), make_tiny("bert")
    run(a, calib_ids, ("blockft", opts))
    with caplog.at_level(logging.WARNING):
        run(b, calib_ids, ("blockft", {**opts, "objective": "next:1"}))
    assert any("post-norm" in r.message for r in caplog.records)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_adaround_after_gptq_starts_at_its_codes_and_may_move_towards_the_fp_weight():
    """GPTQ leaves every weight on the grid: each AdaRound offset starts at GPTQ's code and chooses
    between it and the neighbouring code on the full-precision weight's side (down as well as up)."""
    spec = QuantSpec(bits=3, group_size=8, scale_dtype="float32")
    fp = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    scale, zero = compute_qparams(fp, spec)
    layer = torch.nn.Linear(16, 6, bias=False)
    layer.weight.data = fake_quantize(fp, scale, zero, spec)  # on the grid, as GPTQ leaves it
    fq = FakeQuantLinear(layer, spec, scale, zero, "adaround", reference=fp)
    codes = (layer.weight / expand(scale, 16, 8)).round()
    assert torch.equal(fq.dequantized(hard=True), layer.weight)  # the start is GPTQ's result
    assert torch.allclose(fq.w_floor + fq.soft_rounding(), codes, atol=0.011)
    below = fp < layer.weight
    assert below.any() and (~below).any()
    assert torch.equal(fq.w_floor, torch.where(below, codes - 1, codes))  # the other candidate lies towards the FP weight


def test_finetuning_must_come_last(make_tiny, calib_ids):
    with pytest.raises(ValueError, match="per-block methods come first"):
        run(make_tiny("llama"), calib_ids, ("blockft", {"steps": 2}), ("rtn", {}))


def test_trained_zero_points_stay_in_the_code_range():
    """A zero point trained past qmax is used, and committed, clamped: packed export stores only grid codes."""
    from blockquant.primitives import compute_qparams

    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 4)
    spec = QuantSpec(2, 8)
    scale, zero = compute_qparams(layer.weight.detach(), spec)
    fq = FakeQuantLinear(layer, spec, scale, zero)
    with torch.no_grad():
        fq.zero.add_(10)  # far outside [0, 3]
    scale, zero = fq.commit()
    assert zero.min() >= spec.qmin and zero.max() <= spec.qmax
    codes = layer.weight.detach() / scale.repeat_interleave(8, 1) + zero.repeat_interleave(8, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.min() >= spec.qmin - 1e-4 and codes.max() <= spec.qmax + 1e-4


def _scripted_train(held_out: list[float], steps: int, settle: float):
    """``train`` on one layer whose held-out losses are the script (one value per evaluation)."""
    from blockquant.finetune import TrainConfig

    fq = _one_layer()
    script = iter(held_out)
    x = torch.randn(16, 8)

    def loss_on(i: int) -> torch.Tensor:
        if i == 1:  # the held-out item
            return torch.tensor(next(script))
        return fq(x).pow(2).mean()

    cfg = TrainConfig(steps=steps, eval_every=1, patience=2, settle=settle)
    return train([fq], loss_on, [0], [1], cfg, progress=False)


def test_a_step_does_not_depend_on_the_scale_of_the_loss():
    """Adam's ε sits far below any calibration gradient: a loss 10⁹ times smaller (a model with small
    activations, or a 4-bit model's small errors) moves the weights just as far."""
    from blockquant.finetune import TrainConfig

    moves = []
    for factor in (1.0, 1e-9):
        fq = _one_layer()
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
        target = 10 * torch.randn(16, 4, generator=torch.Generator().manual_seed(1))  # far: the gradient keeps its sign
        start = fq.weight.detach().clone()

        def loss_on(i: int, fq=fq, x=x, target=target, factor=factor) -> torch.Tensor:
            return factor * (fq(x) - target).pow(2).mean()

        train([fq], loss_on, [0], [], TrainConfig(steps=10, grad_clip=1e9), progress=False)  # no clipping: it rescales steps unevenly
        moves.append(fq.weight.detach() - start)
    assert moves[0].abs().mean() > 0.05  # ten steps of lr 0.02 on the cosine schedule
    assert float(moves[1].abs().mean()) == pytest.approx(float(moves[0].abs().mean()), rel=0.02)  # with torch's ε 1e-8: a tenth


def test_early_stopping_waits_for_the_annealing_half_of_the_schedule():
    """A held-out loss that plateaus while the rate is high and falls as it anneals is not cut short;
    one that stops improving in the second half is (the best state being kept either way)."""
    plateau_then_fall = [1.0, 0.8, 0.9, 0.9, 0.9, 0.9, 0.7, 0.6, 0.5]  # evaluations at steps 0 … 8
    log = _scripted_train(plateau_then_fall, steps=8, settle=0.5)
    assert log.stopped == "steps" and log.best == 0.5
    assert _scripted_train(plateau_then_fall, steps=8, settle=0.0).stopped == "early"  # the old rule stopped at step 3
    overfit = [1.0, 0.8, 0.7, 0.6, 0.5, 0.6, 0.7, 0.8, 0.9]
    log = _scripted_train(overfit, steps=8, settle=0.5)
    assert log.stopped == "early" and len(log.losses) == 7 and log.best == 0.5  # counted from step 5's 0.6; step 4's state kept
    early_luck = [1.0, 0.5, 0.9, 0.9, 0.9, 0.9, 0.8, 0.7, 0.6]  # a lucky early evaluation does not cut the annealing short
    log = _scripted_train(early_luck, steps=8, settle=0.5)
    assert log.stopped == "steps" and log.best == 0.5


def test_accumulated_batches_make_one_step_on_their_mean_loss():
    """``accumulate`` k: one optimizer step on the mean of k batches' losses, one backward per batch."""
    from blockquant.finetune import TrainConfig

    xs = [torch.randn(16, 8, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    target = 3 * torch.randn(16, 4, generator=torch.Generator().manual_seed(5))

    def batch_loss(fq: FakeQuantLinear, i: int) -> torch.Tensor:
        return (fq(xs[i]) - target).pow(2).mean()

    calls, grads = [], []
    for accumulate in (2, 1):
        torch.manual_seed(0)  # _one_layer's bias is drawn from the global generator
        fq = _one_layer()

        def loss_on(i: int, fq=fq, accumulate=accumulate) -> torch.Tensor:
            calls.append(i)  # the reference (accumulate 1) is one batch holding both, its loss the mean of the two
            return batch_loss(fq, i) if accumulate == 2 else (batch_loss(fq, 0) + batch_loss(fq, 1)) / 2

        cfg = TrainConfig(steps=1, accumulate=accumulate, grad_clip=1e9)  # no clipping: it would rescale the gradients
        train([fq], loss_on, [0, 1], [], cfg, progress=False)
        grads.append([p.grad.clone() for p in (fq.weight, fq.scale, fq.zero)])  # the last step's gradients stay on them
    assert calls == [0, 1, 0]  # one step read both batches
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    fq = _one_layer()
    train([fq], lambda i: batch_loss(fq, i), [0, 1, 0], [], TrainConfig(steps=3, accumulate=2), progress=False)  # wraps round
    with pytest.raises(ValueError, match="accumulate"):
        TrainConfig(accumulate=0)


@pytest.mark.parametrize("method", ["blockft", "qft"])
def test_accumulate_reaches_the_training_loop(make_tiny, calib_ids, monkeypatch, method):
    """The recipe option ``accumulate`` of block-wise FT and QFT is the loop's batches per step."""
    import blockquant.methods.qft as qft_module

    module = blockft_module if method == "blockft" else qft_module
    seen = []

    def counting_train(modules, loss_on, train_items, eval_items, cfg, *args, **kwargs):
        calls = []

        def counted(i: int) -> torch.Tensor:
            if torch.is_grad_enabled():
                calls.append(i)
            return loss_on(i)

        log = train(modules, counted, train_items, eval_items, cfg, *args, **kwargs)
        seen.append((cfg.accumulate, len(calls), len(log.losses)))
        return log

    monkeypatch.setattr(module, "train", counting_train)
    run(make_tiny("llama"), calib_ids, ("gptq", {}), (method, {"steps": 3, "accumulate": 2}))
    assert seen and all(acc == 2 and calls == 2 * steps for acc, calls, steps in seen)


def test_autocast_trains_in_bfloat16_and_ends_on_the_grid(make_tiny, calib_ids, monkeypatch):
    """``autocast: bfloat16``: the training forwards' matmuls see bf16 inputs; the trained
    parameters stay fp32, the result is on the grid and still beats RTN."""
    seen = set()
    original = torch.nn.functional.linear

    def spy(x, w, b=None):
        if torch.is_grad_enabled():
            seen.add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype)
        return original(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    model = make_tiny("llama")
    result = run(model, calib_ids, ("blockft", {"steps": 40, "eval_every": 10, "autocast": "bfloat16"}))
    assert seen == {torch.bfloat16}
    all_on_grid(model, result)
    rtn = run(make_tiny("llama"), calib_ids, ("rtn", {}))
    for a, b in zip(result.blocks, rtn.blocks):
        assert a.output_error < b.output_error


def test_one_sample_at_a_time_gives_the_batch_gradient():
    """``reproducible``: the step's gradient, taken one sample at a time and added in fp64, is the
    gradient of the batches' mean loss (here 2 batches of 3 and 2 samples, accumulated)."""
    from blockquant.finetune import PerSample, TrainConfig

    xs = [torch.randn(n, 5, 8, generator=torch.Generator().manual_seed(s)) for s, n in enumerate((3, 2))]
    target = [3 * torch.randn(n, 5, 4, generator=torch.Generator().manual_seed(9 + s)) for s, n in enumerate((3, 2))]
    grads, losses = [], []
    for reproducible in (False, True):
        torch.manual_seed(0)
        fq = _one_layer()

        def loss_on(i: int, r: int | None = None, fq=fq) -> torch.Tensor:
            x, t = (xs[i], target[i]) if r is None else (xs[i][r : r + 1], target[i][r : r + 1])
            return (fq(x) - t).pow(2).mean()

        cfg = TrainConfig(steps=1, accumulate=2, grad_clip=1e9, reproducible=reproducible)
        log = train([fq], loss_on, [0, 1], [], cfg, progress=False, per_sample=PerSample(loss_on, lambda i: (len(xs[i]),) * 2))
        grads.append([p.grad.clone() for p in (fq.weight, fq.scale, fq.zero)])
        losses.append(log.losses[0])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    with pytest.raises(ValueError, match="one sample at a time"):
        train([_one_layer()], lambda i: torch.zeros(()), [0], [], TrainConfig(steps=1, reproducible=True), progress=False)


@pytest.mark.parametrize("family, objective", [("llama", "block"), ("llama", "next:1"), ("llama", "logits"), ("bert", "logits")])
def test_one_sample_at_a_time_measures_the_same_losses(make_tiny, calib_ids, family, objective):
    """blockft's per-sample loss (each sample's block call cut from its batch's, the pooled loss
    relative to the batch's mean square) adds up to the batch loss: the held-out losses before
    training agree with the batch ones."""
    evals = []
    for reproducible in (False, True):
        opts = {"steps": 4, "eval_every": 2, "objective": objective, "reproducible": reproducible}
        evals.append([log.evals[0][1] for _, log in run(make_tiny(family), calib_ids, ("blockft", opts)).train_logs])
    assert evals[1] == pytest.approx(evals[0], rel=1e-5)


def test_qft_refuses_one_sample_at_a_time(make_tiny, calib_ids):
    with pytest.raises(ValueError, match="reproducible"):
        run(make_tiny("llama"), calib_ids, ("qft", {"reproducible": True}))
