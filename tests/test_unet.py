"""EfficientQ on convolution networks: walking, BatchNorm folding, im2col, ADMM, attention, CLI.

Every network here is a tiny MONAI 3-D U-Net built in the test (no ../shared), with random
BatchNorm statistics so that folding has something to fold.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("monai")
from monai.networks.nets import UNet  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from blockquant import quantize  # noqa: E402
from blockquant.cli import main  # noqa: E402
from blockquant.convnet import fold_batchnorm, layer_stats, layers_in_order  # noqa: E402
from blockquant.layers import set_weight_matrix, weight_matrix  # noqa: E402
from blockquant.methods.admm import ADMMOptions, admm, attention_map, pool_attention, project  # noqa: E402
from blockquant.primitives import compute_qparams, fake_quantize  # noqa: E402
from blockquant.recipe import ActSpec, QuantSpec, Recipe, make_step  # noqa: E402
from blockquant.unet import size_problem  # noqa: E402

ARGS = dict(spatial_dims=3, in_channels=1, out_channels=3, channels=[4, 8, 16], strides=[2, 2], num_res_units=1, norm="batch")


def tiny_unet(seed: int = 0, args: dict | None = None, prelu_slope: float | None = None) -> nn.Module:
    """A tiny MONAI U-Net with random BatchNorm statistics (and, if given, every PReLU at ``prelu_slope``)."""
    torch.manual_seed(seed)
    net = UNet(**(args or ARGS)).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            if isinstance(m, nn.PReLU) and prelu_slope is not None:
                m.weight.fill_(prelu_slope)
    return net


def volume(seed: int = 0, shape=(16, 16, 16)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 1, *shape, generator=g)


def test_fold_batchnorm_matches_original_and_walks_every_layer():
    net, x = tiny_unet(), volume()
    ref = net(x)
    order = layers_in_order(net, x)
    pairs = fold_batchnorm(net, x)
    assert len(pairs) == sum(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)
    kinds = {type(net.get_submodule(n)).__name__ for n in order}
    assert kinds == {"Conv3d", "ConvTranspose3d"}
    assert len(order) == sum(isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) for m in net.modules())


def test_fold_batchnorm_refuses_a_conv_output_that_also_feeds_another_path():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3).eval()
            self.bn.running_mean.fill_(1.0)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    net, x = Fork(), torch.randn(1, 2, 8, 8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="another path"):
        fold_batchnorm(net, x)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])  # restored


LAYERS = [
    (nn.Conv3d(3, 4, 3, stride=2, padding=1), (1, 3, 8, 8, 8)),
    (nn.Conv2d(3, 4, 3, padding=2, dilation=2), (2, 3, 9, 9)),
    (nn.Conv1d(3, 4, 5, stride=2), (2, 3, 20)),
    (nn.ConvTranspose3d(3, 4, 3, stride=2, padding=1, output_padding=1), (1, 3, 5, 5, 5)),
    (nn.ConvTranspose2d(3, 4, 4, stride=2, padding=1), (2, 3, 6, 7)),
    (nn.ConvTranspose2d(3, 4, 3, stride=3, padding=0, dilation=2), (1, 3, 4, 4)),
    (nn.ConvTranspose1d(3, 4, 1, stride=2), (1, 3, 6)),
    (nn.Linear(6, 4), (5, 7, 6)),
]


@pytest.mark.parametrize("layer,shape", LAYERS, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "")
@pytest.mark.parametrize("sample", [None, 37])
def test_im2col_rows_reproduce_the_layer(layer, shape, sample):
    """The statistics are those of rows r with y = W r + b: C = H Wᵀ + x̄ bᵀ and ȳ = W x̄ + b."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    with torch.no_grad():
        y = layer(x)
    st = layer_stats(layer, x, y, max_positions=sample or 10**9)
    w, b = weight_matrix(layer), layer.bias.detach()
    torch.testing.assert_close(st.cross, st.gram @ w.t() + torch.outer(st.x_mean, b), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(st.y_mean, w @ st.x_mean + b, rtol=1e-4, atol=1e-4)
    assert st.rows == min(st.total, sample or st.total)
    before = layer.weight.detach().clone()
    set_weight_matrix(layer, w)
    assert torch.equal(layer.weight, before)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("bits", [2, 3])
def test_projection_lands_on_the_grid_and_beats_min_max(sym, per_tensor, bits):
    spec = QuantSpec(bits, -1, sym=sym, per_tensor=per_tensor)
    v = torch.randn(16, 54) * torch.rand(16, 1)
    scale, zero = compute_qparams(v, spec)
    g, s, z = project(v, spec, scale, zero, iters=4)
    q = z + g / s
    assert torch.allclose(q, torch.round(q), atol=1e-4)
    assert q.min() >= spec.qmin - 1e-4 and q.max() <= spec.qmax + 1e-4
    assert s.shape == scale.shape and torch.equal(z, torch.round(z))
    rtn = fake_quantize(v, scale, zero, spec)
    assert torch.sum((g - v) ** 2) <= torch.sum((rtn - v) ** 2)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_admm_layer_error_below_rtn_on_a_random_layer(bits):
    torch.manual_seed(bits)
    layer = nn.Conv3d(6, 8, 3, padding=1)
    x_fp = torch.randn(1, 6, 10, 10, 10)
    x_q = x_fp + 0.05 * torch.randn_like(x_fp)  # the input as the quantized upstream leaves it
    with torch.no_grad():
        y = layer(x_fp)
    spec = QuantSpec(bits, -1)
    st = layer_stats(layer, x_q, y)
    gram, cross = st.centred()
    w0, b0 = weight_matrix(layer), layer.bias.detach()

    def error(w: torch.Tensor, b: torch.Tensor) -> float:
        out = torch.nn.functional.conv3d(x_q, w.reshape(layer.weight.shape), b, padding=1)
        return float(torch.sum((out - y) ** 2) / torch.sum(y**2))

    scale, zero = compute_qparams(w0, spec)
    rtn = error(fake_quantize(w0, scale, zero, spec), b0)
    for eta in (0.0, 0.1):
        res = admm(w0, gram, cross, st.centred_y_sq(), spec, ADMMOptions(iters=60, rho_every=15, eta=eta))
        got = error(res.weight, st.y_mean - res.weight @ st.x_mean)
        assert got < rtn, (eta, got, rtn)
        if eta == 0:  # the objective is the layer error itself
            assert res.objective <= res.rtn_objective
            assert got * st.y_sq == pytest.approx(res.objective * st.centred_y_sq(), rel=1e-3)  # relative to ‖Y‖² vs ‖Y − ȳ‖²


def test_attention_weights_and_pooling():
    pred = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    pred[0, :2] = 1  # 128 voxels
    pred[0, 2, :2, :2] = 2  # 4 voxels; class 0 has 380
    a = attention_map(pred, num_classes=4)  # class 3 is absent
    assert a.sum().item() == pytest.approx(pred.numel(), rel=1e-5)
    ratio = lambda c, d: float(a[pred == c][0] / a[pred == d][0])  # noqa: E731
    assert ratio(2, 0) == pytest.approx((380 / 4) ** 0.5, rel=1e-5)
    assert ratio(1, 0) == pytest.approx((380 / 128) ** 0.5, rel=1e-5)
    for shape in [(4, 4, 4), (2, 2, 2), (8, 8, 8), (3, 5, 4)]:
        pooled = pool_attention(a, shape)
        assert pooled.shape == (1, *shape)
    assert pool_attention(a, (4, 4, 4)).mean().item() == pytest.approx(1.0, rel=1e-5)  # even pooling keeps the mean


def _recipe(method: str, bits: int, act: ActSpec | None = None, **opts) -> Recipe:
    return Recipe(QuantSpec(bits, -1, scale_dtype="float32"), [make_step(method, opts)], act)


def test_quantize_network_weights_on_grid_ends_8_bit_and_admm_beats_rtn():
    x = volume(1)
    errors = {}
    for method in ("rtn", "gptq", "admm"):
        net = tiny_unet()
        opts = {"iters": 40, "rho_every": 10} if method == "admm" else {}
        res = quantize(net, _recipe(method, 2, **opts), x)
        by_name, order = res.layers, list(res.layers)
        assert {n for n, r in by_name.items() if r.bits == 8} == {order[0], order[1], order[-1]}
        for name, r in by_name.items():  # every weight is s·(q − z) with integer q in range
            scale, zero = r.scale, r.zero
            w = weight_matrix(net.get_submodule(name))
            q = w / scale + zero
            bits = by_name[name].bits
            assert torch.allclose(q, torch.round(q), atol=2e-3), name
            assert q.min() > -0.5 and q.max() < 2**bits - 0.5
        errors[method] = sum(r.error for r in res.layers.values() if r.bits == 2)
    assert errors["admm"] < errors["rtn"]


def test_static_activation_quantization_is_attached_and_recorded():
    net = tiny_unet()
    res = quantize(net, _recipe("rtn", 4, ActSpec(8, "tensor", sym=False)), volume(1))
    ranges = res.record()["activations"]["static_ranges"]
    assert set(ranges) == set(res.layers)
    assert all(hasattr(net.get_submodule(n), "input_quantizer") for n in ranges)


# ---------------------------------------------------------------- the command line


def _save_net(tmp_path, net=None) -> str:
    d = tmp_path / "net"
    d.mkdir()
    (d / "unet_config.json").write_text(json.dumps({"monai_unet": ARGS, "intensity": "clip(HU/2, 0, 1)"}))
    save_file({k: v.contiguous() for k, v in (net or tiny_unet()).state_dict().items()}, str(d / "model.safetensors"))
    return str(d)


def _save_volume(tmp_path, img: np.ndarray, lab: np.ndarray | None = None, name: str = "vol.npz") -> str:
    path = tmp_path / name
    arrays = {"img": img} if lab is None else {"img": img, "lab": lab}
    np.savez(path, **arrays)
    return str(path)


def _img_lab(shape=(16, 16, 16)):
    rng = np.random.default_rng(0)
    img = (rng.random(shape) * 2).astype(np.float32)
    lab = np.zeros(shape, dtype=np.uint8)
    lab[4:12, 4:12, 4:12] = 1
    lab[6:9, 6:9, 6:9] = 2
    return img, lab


def test_cli_quantize_and_eval_round_trip(tmp_path, capsys):
    net_dir = _save_net(tmp_path)
    vol = _save_volume(tmp_path, *_img_lab((24, 16, 16)))
    out = tmp_path / "q"
    argv = ["quantize", net_dir, "--recipe", "admm", "--wbits", "3", "--calib", vol, "--crop", "0:16", "--output", str(out), "--quiet"]
    assert main(argv) == 0
    assert {p.name for p in out.iterdir()} == {"unet_config.json", "model.safetensors", "quantization.safetensors", "blockquant.json"}
    record = json.loads((out / "blockquant.json").read_text())
    assert record["method"] == "admm" and record["bits"] == 3 and record["ends_bits"] == 8
    assert record["calibration"]["shape"] == [1, 1, 16, 16, 16]
    capsys.readouterr()
    eval_argv = ["eval", str(out), "--data", vol, "--region", "8:", "--classes", "whole=1,2;core=2", "--json", "--reference", net_dir]
    assert main(eval_argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["dice"]) == {"whole", "core"} and result["shape"] == [16, 16, 16]
    # sliding windows take a region the network could not take whole
    assert main(["eval", net_dir, "--data", vol, "--region", "2:22", "--roi", "8,8,8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shape"] == [20, 16, 16]


def _bad(argv, capsys, match: str, out=None) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("blockquant: error:") and match in err and "\n" not in err, err
    if out is not None:
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_cli_bad_inputs(tmp_path, capsys):
    net_dir = _save_net(tmp_path)
    img, lab = _img_lab()
    out = tmp_path / "q"
    q = ["quantize", net_dir, "--recipe", "admm", "--wbits", "2", "--output", str(out), "--quiet", "--calib"]
    two_channels = _save_volume(tmp_path, np.stack([img, img]), name="two.npz")
    _bad(q + [two_channels], capsys, "2 channels but the network takes 1", out)
    _bad(q + [_save_volume(tmp_path, np.zeros_like(img), name="zeros.npz")], capsys, "constant", out)
    nan = img.copy()
    nan[3, 3, 3] = np.nan
    _bad(q + [_save_volume(tmp_path, nan, name="nan.npz")], capsys, "NaN", out)
    _bad(q + [_save_volume(tmp_path, img), "--crop", "0:10"], capsys, "multiple of 4", out)
    _bad(q + [_save_volume(tmp_path, img), "--crop", "0:4,0:4,0:4"], capsys, "(1, 1, 1) on the calibration crop): admm: 1 output", out)
    _bad(q + [_save_volume(tmp_path, img), "--group-size", "128"], capsys, "--group-size -1", out)
    _bad(q + [_save_volume(tmp_path, img), "--abits", "8", "--act-granularity", "token"], capsys, "--act-granularity tensor", out)
    _bad(q + [_save_volume(tmp_path, img), "--format", "gptq"], capsys, "transformer-model option", out)
    _bad(["eval", net_dir, "--data", _save_volume(tmp_path, img, name="nolab.npz")], capsys, "--label-key", None)
    bad_labels = lab.copy()
    bad_labels[0, 0, 0] = 5
    vol = _save_volume(tmp_path, img, bad_labels, name="badlab.npz")
    _bad(["eval", net_dir, "--data", vol], capsys, "holds class 5 but the network outputs 3 classes", None)
    _bad(["eval", net_dir, "--data", _save_volume(tmp_path, img, lab), "--roi", "6,8,8"], capsys, "multiple of 4", None)


def test_size_problem_knows_instance_norm_needs_two_voxels_at_the_bottom():
    """MONAI's instance norm refuses one voxel per channel: a crop of exactly the size multiple would
    fail deep inside torch, so it is refused up front (batch norm in eval mode takes it)."""
    basic = {"monai_basicunet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3}}  # default norm: instance
    assert "multiple of 16" in size_problem(basic, (8, 16, 16))
    assert "at least 32" in size_problem(basic, (16, 16, 16))
    assert size_problem(basic, (32, 16, 16)) is None
    instance_unet = {"monai_unet": ARGS | {"norm": ["instance", {"affine": True}]}}
    assert "at least 8" in size_problem(instance_unet, (4, 4, 4))
    assert size_problem({"monai_unet": ARGS}, (4, 4, 4)) is None  # batch norm
    model = UNet(**ARGS).eval()
    assert model(torch.rand(1, 1, 4, 4, 4)).shape == (1, 3, 4, 4, 4)  # the batch-norm net does pass it
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        UNet(**(ARGS | {"norm": "instance"})).eval()(torch.rand(1, 1, 4, 4, 4))  # what the check spares the user


def test_cli_bad_volumes_expressions_and_options(tmp_path, capsys):
    """Each mistake is one error line: unreadable files, labels that do not match the image, an
    intensity expression that cannot be evaluated (or would never finish), options a network ignores."""
    net_dir = _save_net(tmp_path)
    img, lab = _img_lab((24, 16, 16))
    vol = _save_volume(tmp_path, img, lab)
    ev = ["eval", net_dir, "--data"]
    truncated = tmp_path / "trunc.npz"
    truncated.write_bytes(Path(vol).read_bytes()[:200])
    _bad([*ev, str(truncated)], capsys, "cannot read image file")
    not_nifti = tmp_path / "v.nii"
    not_nifti.write_text("not a volume")
    _bad([*ev, str(not_nifti)], capsys, "cannot read image file")
    _bad([*ev, vol, "--image-key", "zzz"], capsys, "has no array 'zzz' (--image-key); it has img, lab")
    _bad([*ev, _save_volume(tmp_path, img, lab[0], name="lab2d.npz"), "--region", "0:16"], capsys, "label map has shape (16, 16)")
    _bad([*ev, _save_volume(tmp_path, img, lab[:20], name="short.npz"), "--region", "0:16"], capsys, "label map has shape (20, 16, 16)")
    for expr, message in [
        ("exp()+HU", "cannot be evaluated"),
        ("5", "does not use HU"),
        ("__import__('os').getcwd()", "only HU, numbers"),
    ]:
        _bad([*ev, vol, "--intensity", expr], capsys, message)
    # float32 numbers: a tower of powers is inf at once (as Python integers it would never finish)
    _bad([*ev, vol, "--region", "0:16", "--intensity", "HU*9**9**9**9"], capsys, "NaN/Inf")
    _bad([*ev, vol, "--max-windows", "2"], capsys, "--max-windows: options of text evaluation")
    _bad([*ev, vol, "--reference", str(tmp_path / "missing")], capsys, "has no unet_config.json")
    out = tmp_path / "q"
    q = ["quantize", net_dir, "--recipe", "rtn", "--calib", vol, "--crop", "0:16", "--output", str(out), "--quiet"]
    for flag in (["--nsamples", "4"], ["--calib-paragraphs"], ["--smooth-fold", "quantizer"]):
        _bad(q + flag, capsys, f"{flag[0]}: transformer-model option", out)
    config = json.loads((Path(net_dir) / "unet_config.json").read_text())
    (Path(net_dir) / "unet_config.json").write_text(json.dumps({**config, "intensity": 5}))
    _bad(q, capsys, "must be a string", out)


def test_admm_refuses_transformer_blocks_and_blockft_refuses_networks():
    import transformers

    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    )
    with pytest.raises(ValueError, match="admm quantizes convolution networks layer by layer"):
        quantize(llama, _recipe("admm", 4), torch.zeros(2, 8, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="blockft works on transformer blocks only"):
        quantize(tiny_unet(), Recipe(QuantSpec(4, -1), [make_step("rtn"), make_step("blockft")]), volume(), progress=False)
    with pytest.raises(TypeError, match="calibration must be images"):
        quantize(tiny_unet(), _recipe("rtn", 4), torch.zeros(2, 8, dtype=torch.long), progress=False)


def test_the_one_driver_quantizes_a_monai_unet_from_python():
    from blockquant import parse_recipe

    net, images = tiny_unet(), torch.cat([volume(1), volume(2)])  # (N, C, *spatial)
    result = quantize(net, parse_recipe("admm", QuantSpec(bits=4, group_size=-1)), images, progress=False)
    assert result.recipe.spec.scale_dtype == "float32" and len(result.layers) == len(layers_in_order(net, images))
    record = result.record()
    assert record["method"] == "admm" and record["granularity"] == "channel" and record["batchnorm_folded"]
    assert {r["bits"] for r in record["layers"].values()} == {4, 8}  # the first and last layers stay at 8 bits
    listed = quantize(tiny_unet(), parse_recipe("admm", QuantSpec(bits=4, group_size=-1)), [volume(1), volume(2)], progress=False)
    assert all(torch.equal(listed.layers[n].scale, r.scale) for n, r in result.layers.items())  # a list of images is one batch
