"""QFT on convolution networks: each DoF's fold, the saved directory reproducing the trained model,
exact equalization pairs (and the warning naming the layers without one), training, the CLI.

Networks are tiny MONAI 3-D U-Nets built here (two residual subunits per level: conv → PReLU → conv
pairs exist; transposed convs in the up path), with random BatchNorm statistics folded first.
"""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("monai")
from safetensors.torch import save_file  # noqa: E402
from test_unet import tiny_unet as unet_with  # noqa: E402

from blockquant import quantize  # noqa: E402
from blockquant.cli import main  # noqa: E402
from blockquant.convnet import fold_batchnorm, layers_in_order  # noqa: E402
from blockquant.layers import weight_matrix  # noqa: E402
from blockquant.methods import qft_conv  # noqa: E402
from blockquant.methods.qft import QFTLinear, QFTOptions  # noqa: E402
from blockquant.recipe import ActSpec, QuantSpec, Recipe, make_step  # noqa: E402
from blockquant.unet import load_network, save_network  # noqa: E402

ARGS = dict(spatial_dims=3, in_channels=1, out_channels=3, channels=[4, 8, 16], strides=[2, 2], num_res_units=2, norm="batch")
SPEC = QuantSpec(bits=3, group_size=-1, scale_dtype="float32")
PAIRS = {  # conv → BN → dropout → PReLU → conv inside each two-subunit ResidualUnit
    ("model.0.conv.unit0.conv", "model.0.conv.unit1.conv"),
    ("model.1.submodule.0.conv.unit0.conv", "model.1.submodule.0.conv.unit1.conv"),
    ("model.1.submodule.1.submodule.conv.unit0.conv", "model.1.submodule.1.submodule.conv.unit1.conv"),
}


def tiny_unet(seed: int = 0) -> nn.Module:
    return unet_with(seed, ARGS, prelu_slope=0.1)  # a visible negative slope: equalization must commute with it


def grids_of(res) -> dict:
    """Each layer's (scale, zero) from a QuantResult."""
    return {n: (r.scale, r.zero) for n, r in res.layers.items()}


def volume(seed: int = 0, shape=(16, 16, 16)) -> torch.Tensor:
    return torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(seed))


def _folded(act: ActSpec | None = None):
    """A BN-folded tiny U-Net, its layers and per-layer specs (static input quantizers attached when ``act``)."""
    net, x = tiny_unet(), volume()
    fold_batchnorm(net, x)
    order = layers_in_order(net, x)
    if act is not None:
        quantize(net, Recipe(QuantSpec(8, -1, scale_dtype="float32"), [make_step("rtn")], act), x, progress=False)
    return net, order, {n: SPEC for n in order}


def _perturb(kinds: dict[str, list], which: str, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in kinds[which]:
            scale = {"weight": 0.6, "bias": 0.05}.get(which, 0.3)
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def _on_grid(net: nn.Module, grids: dict, bits: int) -> None:
    for name, (scale, zero) in grids.items():
        codes = weight_matrix(net.get_submodule(name)) / scale + zero
        assert (codes - codes.round()).abs().max() < 1e-3, name
        assert codes.min() > -0.01 and codes.max() < 2**bits - 1 + 0.01, name


def test_exact_pairs_and_the_warning_naming_every_other_layer(caplog):
    net, order, specs = _folded()
    assert set(qft_conv.equalizable_pairs(net, order)) == PAIRS
    with caplog.at_level(logging.WARNING, logger="blockquant.methods.qft_conv"):
        _, kinds, _, notes = qft_conv.setup(net, order, {}, specs, QFTOptions(), None)
    assert len(kinds["equalize"]) == len(PAIRS)
    skipped = set(order) - {p for p, _ in PAIRS}
    assert set(notes["no_equalization"]) == skipped
    text = " ".join(r.getMessage() for r in caplog.records if "no equalization" in r.getMessage())
    assert all(name in text for name in skipped)  # every layer is named, none silently


def test_non_homogeneous_op_or_shifted_batchnorm_breaks_a_pair():
    def seq(*mid: nn.Module) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), *mid, nn.Conv2d(4, 3, 3, padding=1)).eval()

    x = torch.randn(1, 2, 8, 8)
    shifted = nn.BatchNorm2d(4).eval()
    shifted.running_mean.fill_(0.5)
    for mid, pairs in (
        ((nn.PReLU(),), [("0", "2")]),
        ((nn.GELU(),), []),
        ((shifted, nn.ReLU()), []),
        ((nn.Dropout(0.1), nn.ReLU()), [("0", "3")]),
    ):
        net = seq(*mid)
        assert qft_conv.equalizable_pairs(net, layers_in_order(net, x)) == pairs, mid


def test_equalization_is_a_pure_reparameterisation_before_rounding():
    """For every pair: producer rows and bias ÷ e, consumer input channels × e leaves the FP network unchanged (PReLU included)."""
    net, order, _ = _folded()
    x = volume(3)
    before = net(x)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for producer, consumer in qft_conv.equalizable_pairs(net, order):
            p, c = net.get_submodule(producer), net.get_submodule(consumer)
            e = torch.rand(p.out_channels, generator=gen) + 0.5
            p.weight.div_(e.view(-1, 1, 1, 1, 1))
            p.bias.div_(e)
            c.weight.mul_(e.view(1, -1, 1, 1, 1))
    torch.testing.assert_close(net(x), before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("which", ["scale", "weight", "equalize", "bias", "act"])
def test_each_dof_folds_exactly(which):
    act = ActSpec(8, "tensor", sym=False) if which == "act" else None
    net, order, specs = _folded(act)
    for p in net.parameters():
        p.requires_grad_(False)
    wrapped, kinds, undo, _ = qft_conv.setup(net, order, {}, specs, QFTOptions(), act)
    assert kinds[which] and any(isinstance(m, QFTLinear) for m in net.modules())
    _perturb(kinds, which, seed=3)
    x = volume(5)
    with torch.no_grad():
        fake = net(x)
    grids = qft_conv.fold(net, wrapped, undo)
    assert not any(isinstance(m, QFTLinear) for m in net.modules())
    torch.testing.assert_close(net(x), fake, rtol=1e-5, atol=1e-5)
    _on_grid(net, grids, SPEC.bits)


def test_every_dof_at_once_survives_save_and_reload(tmp_path):
    """The saved directory, reloaded through MONAI, gives the fake-quant trained model's logits; weights on the grids."""
    net, order, specs = _folded()
    for p in net.parameters():
        p.requires_grad_(False)
    wrapped, kinds, undo, _ = qft_conv.setup(net, order, {}, specs, QFTOptions(), None)
    assert any(isinstance(net.get_submodule(n), QFTLinear) and isinstance(wrapped[n].layer, nn.ConvTranspose3d) for n in order)
    for which in ("scale", "weight", "equalize", "bias"):
        _perturb(kinds, which)
    x = volume(7)
    with torch.no_grad():
        fake = net(x)
    grids = qft_conv.fold(net, wrapped, undo)
    save_network(net, {"monai_unet": ARGS}, tmp_path / "q", {"method": "rtn,qft", "bits": 3}, grids, overwrite=False)
    loaded, _ = load_network(tmp_path / "q")
    torch.testing.assert_close(loaded(x), fake, rtol=1e-5, atol=1e-5)
    _on_grid(loaded, grids, SPEC.bits)


def test_pow2_gives_power_of_two_scales():
    net, x = tiny_unet(), volume()
    recipe = Recipe(SPEC, [make_step("rtn"), make_step("qft", {"steps": 3, "hw": "pow2"})])
    res = quantize(net, recipe, x, progress=False, ends_bits=None)
    for scale, _ in grids_of(res).values():
        assert torch.equal(scale, torch.exp2(torch.round(torch.log2(scale))))
    _on_grid(net, grids_of(res), SPEC.bits)


def test_admm_then_qft_lowers_the_held_out_loss_and_keeps_the_ends_at_8_bits():
    net, x = tiny_unet(), volume(1, (16, 32, 32))
    fp = copy.deepcopy(net)
    recipe = Recipe(
        QuantSpec(2, -1, scale_dtype="float32"),
        [make_step("admm", {"iters": 30, "rho_every": 10}), make_step("qft", {"steps": 40, "eval_every": 10, "tile_voxels": 4096})],
    )
    res = quantize(net, recipe, x, progress=False)  # the U-Net's strides 2, 2: tiles are multiples of 4
    q = res.model_steps["qft"]
    assert q["tiles"] == [[16, 16, 16], 4, 1] and q["trained"]["equalize"] > 0
    assert q["held_out_loss"][-1][1] < q["held_out_loss"][0][1]
    assert min(v for _, v in q["held_out_loss"]) < 0.9 * q["held_out_loss"][0][1]
    bits = {n: r.bits for n, r in res.layers.items()}
    assert sorted(set(bits.values())) == [2, 8]
    for bit in (2, 8):
        _on_grid(net, {n: g for n, g in grids_of(res).items() if bits[n] == bit}, bit)
    assert res.record()["qft"]["steps_run"] > 0 and fp is not net


# ---------------------------------------------------------------- the command line


def _dirs(tmp_path):
    d = tmp_path / "net"
    d.mkdir()
    (d / "unet_config.json").write_text(json.dumps({"monai_unet": ARGS, "intensity": "clip(HU/2, 0, 1)"}))
    save_file({k: v.contiguous() for k, v in tiny_unet().state_dict().items()}, str(d / "model.safetensors"))
    rng = np.random.default_rng(0)
    img = (rng.random((24, 16, 16)) * 2).astype(np.float32)
    lab = np.zeros(img.shape, dtype=np.uint8)
    lab[4:12, 4:12, 4:12], lab[6:9, 6:9, 6:9] = 1, 2
    np.savez(tmp_path / "vol.npz", img=img, lab=lab)
    return str(d), str(tmp_path / "vol.npz")


def test_cli_admm_qft_round_trip(tmp_path, capsys):
    net_dir, vol = _dirs(tmp_path)
    out = tmp_path / "q"
    argv = ["quantize", net_dir, "--recipe", "admm,qft", "--wbits", "2", "--calib", vol, "--crop", "0:16", "--steps", "5"]
    assert main(argv + ["--output", str(out), "--quiet"]) == 0
    assert "qft: 5 steps" in capsys.readouterr().out
    record = json.loads((out / "blockquant.json").read_text())
    assert record["method"] == "admm,qft" and record["recipe"]["steps"][1]["train"]["steps"] == 5
    assert record["qft"]["steps_run"] == 5
    assert main(["eval", str(out), "--data", vol, "--region", "8:", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["dice"]) == {"class1", "class2"}


@pytest.mark.parametrize(
    "recipe, extra, match",
    [
        ("qft", [], "optionally followed by qft"),
        ("admm,qft,qft", [], "qft appears more than once"),
        ("admm", ["--steps", "5"], "transformer-model option"),
        ("admm,qft", ["--window", "2"], "transformer-model option"),
        ("admm,qft", ["--hw", "int-per-group"], "--group-size g"),
        ("{recipe_file}", [], "feature_weight"),
    ],
)
def test_cli_bad_qft_inputs(tmp_path, capsys, recipe, extra, match):
    net_dir, vol = _dirs(tmp_path)
    if recipe == "{recipe_file}":
        recipe = str(tmp_path / "r.yaml")
        (tmp_path / "r.yaml").write_text("steps:\n  - method: admm\n  - method: qft\n    feature_weight: 0.1\n")
    out = tmp_path / "q"
    assert (
        main(["quantize", net_dir, "--recipe", recipe, "--wbits", "2", "--calib", vol, "--crop", "0:16", "--output", str(out), *extra]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("blockquant: error:") and match in err and "\n" not in err, err
    assert not out.exists()
