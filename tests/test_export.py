"""Export (compressed-tensors pack-quantized, GPTQ v2), packed reload and checkpoint integrity.

Layouts are checked three ways: against a bit-stream decoder written here from the formats'
descriptions, against compressed-tensors' own code when it is installed (its packer, its
writer, and transformers loading our output in a process that never imports blockquant),
and by the round trip export -> ``blockquant.load`` -> ``torch.equal`` to the fake-quant weights.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import build_tiny, build_tokenizer, make_text, packable_llama, subprocess_env
from safetensors.torch import load_file, save_file

import blockquant
from blockquant import QuantSpec, Recipe, make_step, parse_recipe, quantize
from blockquant.cli import main
from blockquant.export import QuantLinear, compressed_tensors, gptq, load, pack_linear, save_packed
from blockquant.export.packing import pack_int32, unpack_int32
from blockquant.export.qlinear import set_cpu_kernels
from blockquant.export.shards import MANIFEST_FILE, write_manifest
from blockquant.methods.gptq import GPTQOptions, gptq_quantize
from blockquant.primitives import compute_qparams, fake_quantize

FORMATS = {"compressed-tensors": compressed_tensors, "gptq": gptq}
BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128, -1)


def quantized_llama(spec: QuantSpec, recipe: str = "rtn", tie: bool = False):
    model = packable_llama(tie)
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    return model, quantize(model, parse_recipe(recipe, spec), calib, progress=False)


def fake_quantized(out: int, cols: int, spec: QuantSpec, seed: int = 0):
    w = torch.randn(out, cols, generator=torch.Generator().manual_seed(seed))
    scale, zero = compute_qparams(w, spec)
    return fake_quantize(w, scale, zero, spec), scale, zero


# ---------------------------------------------------------------------------------------------
# Packing: against a bit stream built here, and against compressed-tensors' packer


def stream_decode(words: list[int], bits: int, n: int) -> list[int]:
    """Code k = bits [k·bits, (k+1)·bits) of the words read as one little-endian integer."""
    stream = sum((w & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(words))
    return [(stream >> (k * bits)) & ((1 << bits) - 1) for k in range(n)]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 10, 11, 31, 32, 33, 100, 688])
def test_packing_is_a_dense_lsb_first_bit_stream(bits, n):
    codes = torch.randint(0, 1 << bits, (3, n), generator=torch.Generator().manual_seed(n))
    packed = pack_int32(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, math.ceil(n * bits / 32))
    for row in range(3):
        assert stream_decode(packed[row].tolist(), bits, n) == codes[row].tolist()
    assert torch.equal(unpack_int32(packed, bits, n).long(), codes)


@pytest.mark.parametrize("bits", BITS)
def test_packing_matches_compressed_tensors(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    codes = torch.randint(0, 1 << bits, (5, 172), generator=torch.Generator().manual_seed(bits))
    signed = (codes - (1 << (bits - 1))).to(torch.int8)
    assert torch.equal(pack_int32(codes, bits), helpers.pack_to_int32(signed, bits))
    assert torch.equal(pack_int32(codes.t(), bits).t(), helpers.pack_to_int32(signed, bits, packed_dim=0))


def test_packing_rejects_codes_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int32(torch.tensor([[16]]), 4)


# ---------------------------------------------------------------------------------------------
# Layer round trips, decoded independently


def decode_compressed_tensors(t: dict, bits: int, sym: bool) -> torch.Tensor:
    """The dequantized weight, from the format description: signed codes, (q − z)·s."""
    out, cols = t["weight_shape"].tolist()
    half = 1 << (bits - 1)
    q = torch.tensor([stream_decode(r, bits, cols) for r in t["weight_packed"].tolist()]) - half
    scale = t["weight_scale"].float()
    z = torch.zeros_like(scale)
    if not sym:
        z = torch.tensor([stream_decode(c, bits, out) for c in t["weight_zero_point"].t().tolist()]).t() - half
    g = math.ceil(cols / scale.shape[1])
    cols_group = torch.arange(cols) // g
    return (q - z[:, cols_group]) * scale[:, cols_group]


def decode_gptq(t: dict, bits: int) -> torch.Tensor:
    """GPTQ: columns of qweight are packed input codes, rows of qzeros packed output zeros."""
    q = torch.tensor([stream_decode(c, bits, t["qweight"].shape[0] * 32 // bits) for c in t["qweight"].t().tolist()])
    z = torch.tensor([stream_decode(r, bits, t["scales"].shape[1]) for r in t["qzeros"].tolist()])  # (G, out)
    g_idx = t["g_idx"].long()
    return (t["scales"].float()[g_idx].t()) * (q - z[g_idx].t())


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_layer_round_trip_is_bit_exact(fmt, sym, bits, group):
    spec = QuantSpec(bits, group, sym)
    w_hat, scale, zero = fake_quantized(96, 256, spec, seed=bits * 100 + group)
    q, rounding = pack_linear("L", w_hat, scale, zero, None, spec)
    assert rounding.weights_changed == 0 and torch.equal(q.dequantize(), w_hat)
    writer = FORMATS[fmt]
    tensors = writer.layer_tensors(q)
    independent = decode_compressed_tensors(tensors, bits, sym) if fmt == "compressed-tensors" else decode_gptq(tensors, bits)
    assert torch.equal(independent, w_hat)
    qcfg = writer.quantization_config(bits, group, sym, [], False, "rtn")
    store = {f"L.{k}": v for k, v in tensors.items()}
    back = writer.read_layer(store, "L", writer.parse_config(qcfg), 96, 256)
    assert store == {} and isinstance(back, QuantLinear)
    assert torch.equal(back.dequantize(), w_hat)


@pytest.mark.parametrize("cols", [100, 688])
@pytest.mark.parametrize("bits", BITS)
def test_ragged_last_group_packs_exactly_and_both_formats_refuse_it(cols, bits):
    spec = QuantSpec(bits, 128, sym=False)
    w_hat, scale, zero = fake_quantized(64, cols, spec, seed=cols + bits)
    q, _ = pack_linear("L", w_hat, scale, zero, None, spec)
    assert q.n_groups == math.ceil(cols / 128) and torch.equal(q.dequantize(), w_hat)
    assert "group size 128 does not divide" in compressed_tensors.problem("L", 64, cols, 128, False, False)
    assert "multiples of 32" in gptq.problem("L", 64, cols, 128, False, False)


def test_act_order_groups_round_trip_in_gptq_and_are_refused_by_compressed_tensors():
    spec = QuantSpec(4, 32, sym=False)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(4)) * torch.linspace(0.1, 3, 128)
    w_hat, scale, zero, g_idx = gptq_quantize(w, x.t() @ x, spec, GPTQOptions(act_order=True, static_groups=False))
    assert g_idx is not None and not torch.equal(g_idx, torch.arange(128) // 32)
    q, _ = pack_linear("L", w_hat, scale, zero, g_idx, spec)
    tensors = gptq.layer_tensors(q)
    assert torch.equal(tensors["g_idx"], g_idx.to(torch.int32)) and torch.equal(decode_gptq(tensors, 4), w_hat)
    back = gptq.read_layer(
        {f"L.{k}": v for k, v in tensors.items()}, "L", gptq.parse_config(gptq.quantization_config(4, 32, False, [], True, "gptq")), 64, 128
    )
    assert torch.equal(back.dequantize(), w_hat)
    assert "g_idx" in compressed_tensors.problem("L", 64, 128, 32, False, True)


@pytest.mark.parametrize("layout", ["groups", "ragged", "g_idx"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_dequantize_in_the_scales_dtype_equals_fp32_rounded_once(dtype, bits, layout):
    """With scales stored in bf16/fp16, dequantizing to that dtype works in it directly: bit for bit
    the exact fp32 result rounded once (every q − z exact there, every product rounded once)."""
    gen = torch.Generator().manual_seed(bits)
    out, cols, group = 48, 100 if layout == "ragged" else 128, 32
    n_groups = math.ceil(cols / group)
    codes = torch.randint(0, 2**bits, (out, cols), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 2**bits, (out, n_groups), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(out, n_groups, generator=gen) * 10.0 ** torch.randint(-6, 2, (out, n_groups), generator=gen)).to(dtype)
    g_idx = torch.randperm(cols, generator=gen) % n_groups if layout == "g_idx" else None
    q = QuantLinear(cols, out, bits, group, False, pack_int32(codes, bits), scales, zeros, g_idx)
    cols_group = g_idx.long() if g_idx is not None else torch.arange(cols) // group
    exact = (codes.double() - zeros[:, cols_group].double()) * scales[:, cols_group].double()
    assert torch.equal(q.dequantize(torch.float32), exact.float())
    half = q.dequantize(dtype)
    assert half.dtype == dtype and half.is_contiguous() and torch.equal(half, exact.float().to(dtype))


def test_gptq_v1_zero_points_are_read_with_their_offset():
    spec = QuantSpec(2, 32, sym=False)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    w[:8] = w[:8].abs()  # non-negative rows: zero point 0, the case v1 cannot store but v2 can
    scale, zero = compute_qparams(w, spec)
    w_hat = fake_quantize(w, scale, zero, spec)
    assert (zero == 0).any()
    tensors = gptq.layer_tensors(pack_linear("L", w_hat, scale, zero, None, spec)[0])
    zeros = unpack_int32(tensors["qzeros"], 2, 32)
    tensors["qzeros"] = pack_int32((zeros.long() - 1) % 4, 2)  # what a v1 writer stores
    v1 = gptq.parse_config({"quant_method": "gptq", "bits": 2, "group_size": 32, "sym": False})
    back = gptq.read_layer({f"L.{k}": v for k, v in tensors.items()}, "L", v1, 32, 64)
    assert torch.equal(back.dequantize(), w_hat)


def test_weights_off_their_grid_are_refused():
    spec = QuantSpec(4, 32)
    w_hat, scale, zero = fake_quantized(32, 64, spec)
    w_hat[3, 7] += 1e-3
    with pytest.raises(ValueError, match=r"layer L: 1 of 2048 weights are not on its quantization grid"):
        pack_linear("L", w_hat, scale, zero, None, spec)


def test_bf16_scales_round_and_say_so():
    spec = QuantSpec(4, 32)
    w_hat, scale, zero = fake_quantized(32, 64, spec)
    q, rounding = pack_linear("L", w_hat, scale, zero, None, spec, scale_dtype=torch.bfloat16)
    assert q.scales.dtype == torch.bfloat16 and rounding.weights_changed > 0
    assert 0 < rounding.max_relative_change < 2**-8
    assert torch.equal(
        q.dequantize(), (q.scales.float().repeat_interleave(32, 1) * (q.codes().float() - q.zeros.float().repeat_interleave(32, 1)))
    )


# ---------------------------------------------------------------------------------------------
# Whole models: save_packed -> blockquant.load


MODEL_CASES = {
    "W4-g32-sym": QuantSpec(4, 32, sym=True),
    "W3-g64-asym": QuantSpec(3, 64, sym=False),
    "W2-g32-asym": QuantSpec(2, 32, sym=False),
    "W8-channel-asym": QuantSpec(8, -1, sym=False),
}


@pytest.mark.parametrize("case", MODEL_CASES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_model_round_trip(fmt, case, tmp_path):
    model, result = quantized_llama(MODEL_CASES[case])
    out = save_packed(model, result, tmp_path / "out", fmt)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == fmt
    loaded = blockquant.load(out)
    for name in result.layers:
        layer = loaded.get_submodule(name)
        assert isinstance(layer, QuantLinear) and not any(p.is_floating_point() for p in (layer.qweight, layer.zeros))
        assert torch.equal(layer.dequantize(), model.get_submodule(name).weight), name
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
    record = json.loads((out / "blockquant.json").read_text())
    assert record["export"]["format"] == fmt and record["export"]["scale_rounding"]["weights_changed"] == 0


OTHER_FAMILIES = {  # widths that are multiples of 32: (config class, model class, kwargs)
    "gpt2": (
        transformers.GPT2Config,
        transformers.GPT2LMHeadModel,
        dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, vocab_size=256, n_positions=64),
    ),
    "bert": (
        transformers.BertConfig,
        transformers.BertModel,
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256, max_position_embeddings=64),
    ),
    "opt": (
        transformers.OPTConfig,
        transformers.OPTForCausalLM,
        dict(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=256,
            max_position_embeddings=64,
            word_embed_proj_dim=64,
        ),
    ),
}


@pytest.mark.parametrize("family", OTHER_FAMILIES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_other_families_round_trip_or_refuse(family, fmt, tmp_path):
    """GPT-2's Conv1D (weights stored transposed) packs into GPTQ; compressed-tensors refuses it."""
    config_cls, model_cls, kwargs = OTHER_FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**kwargs)).eval()
    result = quantize(model, parse_recipe("rtn", QuantSpec(4, 32)), torch.randint(0, 256, (2, 16)), progress=False)
    if family == "gpt2" and fmt == "compressed-tensors":
        with pytest.raises(ValueError, match=r"Conv1D.*\(formats that hold this model: gptq, dequantized\)"):
            save_packed(model, result, tmp_path / "out", fmt)  # the hint names only formats that work
        return
    loaded = load(save_packed(model, result, tmp_path / "out", fmt))
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, got = model(input_ids=ids), loaded(input_ids=ids)
    key = "last_hidden_state" if family == "bert" else "logits"
    torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-5)


def test_a_packed_model_and_bad_dtypes_are_refused(tmp_path):
    model, result = quantized_llama(QuantSpec(4, 32))
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        save_packed(model, result, tmp_path / "int8", dtype=torch.int8)  # would write int8 scales that cannot load
    assert not (tmp_path / "int8").exists()
    out = save_packed(model, result, tmp_path / "out")
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        load(out, dtype="bfloat16")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(load(out), parse_recipe("rtn", QuantSpec(4, 32)), torch.randint(0, 64, (2, 16)), progress=False)


def test_packed_layers_really_hold_less_memory(tmp_path):
    model, result = quantized_llama(QuantSpec(4, 32, sym=False))
    loaded = load(save_packed(model, result, tmp_path / "out"))
    packed = sum(t.numel() * t.element_size() for n in result.layers for t in loaded.get_submodule(n).buffers())
    dense = sum(model.get_submodule(n).weight.numel() * 4 for n in result.layers)
    assert packed < 0.2 * dense  # 4 + 32/32 + 8/32 bits of 32


def test_tied_embeddings_shards_and_bf16(tmp_path):
    model, result = quantized_llama(QuantSpec(4, 64, sym=True), tie=True)
    out = save_packed(model, result, tmp_path / "out", dtype=torch.bfloat16, max_shard_bytes=20_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    stored = {k for s in shards for k in load_file(out / s)}
    assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored
    loaded = load(out)
    assert loaded.config.dtype == torch.bfloat16 and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    record = json.loads((out / "blockquant.json").read_text())["export"]
    assert record["dtype"] == "bfloat16" and record["scale_rounding"]["weights_changed"] > 0
    for name in result.layers:  # bf16 scales: exactly the rounded grid, within bf16 of the original
        layer = loaded.get_submodule(name)
        assert layer.scales.dtype == torch.bfloat16
        torch.testing.assert_close(layer.dequantize(), model.get_submodule(name).weight, rtol=2**-8, atol=0)


BF16_RECIPES = {
    "rtn": [("rtn", {})],
    "gptq": [("gptq", {})],
    "gptq+blockft": [("gptq", {}), ("blockft", {"steps": 4, "eval_every": 2, "lr_scale": 1e-2})],
}


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("recipe", BF16_RECIPES)
def test_bf16_model_exports_exactly_what_was_evaluated(recipe, sym, tmp_path):
    """A bf16 model's grids are bf16 from the start (scales rounded before any code is computed,
    learned step sizes too): its bf16 export reloads weights and logits bit for bit."""
    model = packable_llama(dtype=torch.bfloat16)
    spec = QuantSpec(4, 32, sym=sym)
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    result = quantize(model, Recipe(spec, [make_step(m, o) for m, o in BF16_RECIPES[recipe]]), calib, progress=False)
    assert spec.scale_dtype is None and result.recipe.spec.scale_dtype == "bfloat16"
    for r in result.layers.values():
        assert torch.equal(r.scale.to(torch.bfloat16).float(), r.scale)
    out = save_packed(model, result, tmp_path / "out")  # the model's dtype: bf16
    assert json.loads((out / "blockquant.json").read_text())["export"]["scale_rounding"]["weights_changed"] == 0
    loaded = blockquant.load(out)
    for name in result.layers:
        layer = loaded.get_submodule(name)
        assert layer.scales.dtype == torch.bfloat16
        assert torch.equal(layer.dequantize(torch.bfloat16), model.get_submodule(name).weight), name
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    set_cpu_kernels(loaded, False)  # the evaluated weights, rounded to bf16; the CPU kernel multiplies the unrounded grid
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_explicit_scale_dtype_makes_an_fp32_model_exact_in_bf16(tmp_path):
    """fp32 compute, bf16 checkpoint (the CLI's default for a bf16 subject): scale_dtype says so."""
    model = packable_llama()
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    result = quantize(model, parse_recipe("gptq", QuantSpec(3, 32, scale_dtype="bfloat16")), calib, progress=False)
    loaded = load(save_packed(model, result, tmp_path / "out", dtype=torch.bfloat16), torch.float32)
    for name in result.layers:
        assert torch.equal(loaded.get_submodule(name).dequantize(), model.get_submodule(name).weight), name


def test_gptq_act_order_model_round_trip(tmp_path):
    model = packable_llama()
    recipe = Recipe(QuantSpec(4, 32), [make_step("gptq", {"act_order": True, "static_groups": False})])
    result = quantize(model, recipe, torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1)), progress=False)
    assert any(r.g_idx is not None for r in result.layers.values())
    with pytest.raises(ValueError, match="g_idx"):
        save_packed(model, result, tmp_path / "ct", "compressed-tensors")
    assert not (tmp_path / "ct").exists()
    loaded = load(save_packed(model, result, tmp_path / "gptq", "gptq"))
    assert json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())["desc_act"] is True
    for name in result.layers:
        assert torch.equal(loaded.get_submodule(name).dequantize(), model.get_submodule(name).weight)


# ---------------------------------------------------------------------------------------------
# compressed-tensors itself: its writer read by blockquant, our writer read by transformers


CT_WRITER = """
import json, sys, torch, transformers
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme, apply_quantization_config
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from safetensors.torch import save_file
for sym in (True, False):
    out = f"{sys.argv[1]}/{'sym' if sym else 'asym'}"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=256, architectures=["LlamaForCausalLM"])
    model = transformers.LlamaForCausalLM(config).eval()
    args = QuantizationArgs(num_bits=4, symmetric=sym, group_size=32, strategy="group")
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    apply_quantization_config(model, QuantizationConfig(config_groups={"g": scheme}, ignore=["lm_head"]))
    expected = {}
    for name, m in model.named_modules():
        if hasattr(m, "weight_scale"):
            g = m.weight.data.reshape(m.weight.shape[0], -1, 32)
            lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
            m.weight_scale.data = (hi - lo) / 15
            if not sym:
                m.weight_zero_point.data = (torch.round(-lo / m.weight_scale) - 8).to(torch.int8)
            expected[name] = fake_quantize(m.weight.data, m.weight_scale, getattr(m, "weight_zero_point", None), args)
    compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    compressor.compress_model(model)
    model.config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out + "/model.safetensors", metadata={"format": "pt"})
    compressor.update_config(out)
    save_file(expected, sys.argv[1] + f"/expected-{'sym' if sym else 'asym'}.safetensors")
"""


def test_reads_checkpoints_written_by_compressed_tensors(tmp_path, caplog):
    """compressed-tensors' own writer (``ModelCompressor``), sym and asym W4 g32."""
    pytest.importorskip("compressed_tensors")
    proc = subprocess.run(
        [sys.executable, "-c", CT_WRITER, str(tmp_path)], capture_output=True, text=True, env=subprocess_env(), timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for case in ("sym", "asym"):
        expected = load_file(tmp_path / f"expected-{case}.safetensors")
        model = load(tmp_path / case)
        assert "no blockquant.sha256.json manifest" in caplog.text
        for name, w in expected.items():
            assert torch.equal(model.get_submodule(name).dequantize(), w), (case, name)


CLIENT = """
import json, sys, torch, transformers
from safetensors.torch import save_file
ids = torch.tensor(json.loads(sys.argv[1]))
results = {}
for i, (out, dequantize) in enumerate(json.loads(sys.argv[2])):
    kwargs = {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kwargs)
    with torch.no_grad():
        results[f"{i}/logits"] = model(ids).logits
    results.update({f"{i}/{k}": v for k, v in model.state_dict().items() if k.endswith("proj.weight")})
assert not any(m == "blockquant" or m.startswith("blockquant.") for m in sys.modules), "blockquant was imported"
save_file({k: v.contiguous() for k, v in results.items()}, sys.argv[3])
"""


def test_transformers_with_compressed_tensors_loads_the_export_without_blockquant(tmp_path):
    """The independent client: same weights bit for bit, same logits.

    Asymmetric checkpoints load with ``dequantize=True``: in compressed mode, transformers
    5.23 + compressed-tensors 0.20 expect an unpacked zero point and refuse every asymmetric
    pack-quantized checkpoint, compressed-tensors' own included.
    """
    pytest.importorskip("compressed_tensors")
    cases = [(QuantSpec(4, 32, sym=True), False), (QuantSpec(3, 32, sym=False), True), (QuantSpec(8, -1, sym=False), True)]
    models, dirs = [], []
    for i, (spec, dequantize) in enumerate(cases):
        model, result = quantized_llama(spec)
        models.append((model, result))
        dirs.append([str(save_packed(model, result, tmp_path / f"out{i}")), dequantize])
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(7))
    dest = tmp_path / "client.safetensors"
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, json.dumps(ids.tolist()), json.dumps(dirs), str(dest)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = load_file(dest)
    for i, (model, result) in enumerate(models):
        for name in result.layers:
            assert torch.equal(client[f"{i}/{name}.weight"], model.get_submodule(name).weight), name
        with torch.no_grad():
            torch.testing.assert_close(client[f"{i}/logits"], model(ids).logits, rtol=0, atol=1e-5)
            torch.testing.assert_close(client[f"{i}/logits"], load(dirs[i][0])(ids).logits, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear ValueError, nothing half-written


@pytest.fixture
def packed_dir(tmp_path) -> Path:
    model, result = quantized_llama(QuantSpec(4, 32, sym=False))
    return save_packed(model, result, tmp_path / "packed", max_shard_bytes=20_000)


def _tensor_bytes(path: Path, name: str) -> tuple[int, int]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8 : 8 + n])[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def _shard_of(directory: Path, name: str) -> Path:
    return directory / json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"][name]


def test_flipped_byte_names_the_tensor(packed_dir):
    name = "model.layers.1.mlp.down_proj.weight_packed"
    shard = _shard_of(packed_dir, name)
    begin, _ = _tensor_bytes(shard, name)
    raw = bytearray(shard.read_bytes())
    raw[begin + 5] ^= 0x10
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"checksum mismatch in .*{shard.name}: tensor {name} differs"):
        load(packed_dir)


def test_flipped_header_byte_and_edited_config_are_caught(packed_dir):
    shard = _shard_of(packed_dir, "model.layers.0.self_attn.v_proj.weight_packed")
    raw = bytearray(shard.read_bytes())
    raw[raw.index(b"weight_packed")] ^= 0x20  # 'w' -> 'W': still valid JSON, a different header
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"checksum mismatch in .*{shard.name}: its safetensors header is corrupt"):
        load(packed_dir)
    raw[raw.index(b"Weight_packed")] ^= 0x20
    shard.write_bytes(bytes(raw))
    load(packed_dir)
    config = packed_dir / "config.json"
    config.write_text(config.read_text().replace('"num_bits": 4', '"num_bits": 3'))
    with pytest.raises(ValueError, match="checksum mismatch in .*config.json"):
        load(packed_dir)


def test_missing_shard(packed_dir):
    shard = _shard_of(packed_dir, "model.layers.0.self_attn.q_proj.weight_packed")
    shard.unlink()
    with pytest.raises(ValueError, match=rf"{shard.name} is missing"):
        load(packed_dir)
    with pytest.raises(ValueError, match=rf"shard {shard.name} listed in model.safetensors.index.json is missing"):
        load(packed_dir, verify=False)


def test_truncated_file(packed_dir):
    shard = _shard_of(packed_dir, "model.layers.0.mlp.up_proj.weight_packed")
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{shard.name} in .* is truncated: \d+ bytes, \d+ expected"):
        load(packed_dir)
    with pytest.raises(ValueError, match=rf"cannot read .*{shard.name} \(truncated or corrupt\?\)"):
        load(packed_dir, verify=False)


def _rewrite(directory: Path, name: str, value: torch.Tensor) -> None:
    """Replace one tensor and re-sign the directory, so only the content check can object."""
    shard = _shard_of(directory, name)
    tensors = load_file(shard)
    tensors[name] = value
    save_file(tensors, str(shard), metadata={"format": "pt"})
    write_manifest(directory)


def test_mismatched_weight_shape(packed_dir):
    _rewrite(packed_dir, "model.layers.0.mlp.down_proj.weight_shape", torch.tensor([64, 100]))
    with pytest.raises(ValueError, match=r"down_proj.weight_shape says \(64, 100\) but the model's layer is \(64, 128\)"):
        load(packed_dir)


def test_wrongly_shaped_packed_tensor(packed_dir):
    _rewrite(packed_dir, "model.layers.0.mlp.up_proj.weight_scale", torch.ones(128, 3))
    with pytest.raises(ValueError, match=r"up_proj.weight_scale must be float of shape \(128, 2\)"):
        load(packed_dir)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda q: q.update(quant_method="awq"), "unsupported quantization format 'awq'"),
        (
            lambda q: q.update(format="int-quantized") or q["config_groups"]["group_0"].update(format="int-quantized"),
            "compressed-tensors format 'int-quantized'",
        ),
        (lambda q: q["config_groups"]["group_0"].update(input_activations={"num_bits": 8}), "quantizes activations"),
    ],
    ids=["awq", "int-quantized", "activations"],
)
def test_unknown_format(packed_dir, edit, message):
    config = json.loads((packed_dir / "config.json").read_text())
    edit(config["quantization_config"])
    (packed_dir / "config.json").write_text(json.dumps(config))
    write_manifest(packed_dir)
    with pytest.raises(ValueError, match=message):
        load(packed_dir)


def test_plain_checkpoint_is_not_packed(tmp_path):
    packable_llama().save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="declares no quantization_config"):
        load(tmp_path / "plain")


def test_unrepresentable_scheme_writes_nothing(tmp_path):
    model = build_tiny("llama")  # MLP width 172: a ragged last group of 12 at g32
    result = quantize(model, parse_recipe("rtn", QuantSpec(4, 32)), torch.randint(0, 256, (2, 8)), progress=False)
    for fmt, message in [("compressed-tensors", "172 inputs, which group size 32 does not divide"), ("gptq", "multiples of 32")]:
        with pytest.raises(ValueError, match=message + r".*\(formats that hold this model: dequantized\)"):
            save_packed(model, result, tmp_path / fmt, fmt)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The command line


def _cli(llama_dir, calib_file, out, *extra) -> list[str]:
    return [
        "quantize",
        str(llama_dir),
        "--calib",
        str(calib_file),
        "--output",
        str(out),
        "--recipe",
        "rtn",
        "--nsamples",
        "4",
        "--seqlen",
        "16",
        "--quiet",
        *extra,
    ]


def test_cli_formats_and_eval_of_a_packed_directory(llama_dir, calib_file, tmp_path, capsys):
    # the conftest Llama has an MLP width of 172: per channel every format but GPTQ fits it
    packed, plain = tmp_path / "packed", tmp_path / "plain"
    assert main(_cli(llama_dir, calib_file, packed, "--group-size", "-1")) == 0  # default format
    assert "(compressed-tensors)" in capsys.readouterr().out
    assert json.loads((packed / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    assert (packed / MANIFEST_FILE).is_file() and (packed / "tokenizer.json").is_file()
    assert main(_cli(llama_dir, calib_file, plain, "--group-size", "-1", "--format", "dequantized")) == 0
    assert "quantization_config" not in json.loads((plain / "config.json").read_text())
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text(make_text(100, seed=9))
    results = []
    for d in (packed, plain):
        capsys.readouterr()
        assert main(["eval", str(d), "--data", str(eval_file), "--seqlen", "16", "--json", "--quiet"]) == 0
        results.append(json.loads(capsys.readouterr().out)["perplexity"])
    assert results[0] == pytest.approx(results[1], rel=1e-6)


def test_cli_rounds_scales_to_the_subjects_dtype(calib_file, tmp_path):
    """fp32 compute (--dtype default) on a bf16 subject: the grid is bf16 from the start, so the
    bf16 export moves no weight."""
    subject = _bf16_subject(tmp_path / "bf16")
    out = tmp_path / "packed"
    assert main(_cli(subject, calib_file, out, "--group-size", "-1", "--format", "compressed-tensors")) == 0
    record = json.loads((out / "blockquant.json").read_text())
    assert record["recipe"]["spec"]["scale_dtype"] == "bfloat16"
    assert record["export"]["dtype"] == "bfloat16" and record["export"]["scale_rounding"]["weights_changed"] == 0


def test_cli_default_falls_back_to_dequantized_with_a_warning(llama_dir, calib_file, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    assert main(_cli(llama_dir, calib_file, out, "--group-size", "32")) == 0
    assert "(dequantized)" in capsys.readouterr().out
    assert "172 inputs, which group size 32 does not divide" in caplog.text
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def _bf16_subject(path: Path) -> Path:
    build_tiny("llama").to(torch.bfloat16).save_pretrained(path)  # MLP width 172: ragged for g128
    build_tokenizer().save_pretrained(path)
    return path


def _safetensors_dtypes(directory: Path) -> set[str]:
    dtypes = set()
    for f in directory.glob("*.safetensors"):
        raw = f.read_bytes()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return dtypes


def test_cli_fallback_keeps_the_subjects_dtype(calib_file, tmp_path, caplog):
    """The default format cannot hold a ragged last group (64 and 172 inputs, g128): the dequantized
    fallback of a bf16 subject quantized in fp32 compute is a bf16 checkpoint of the subject's size."""
    subject = _bf16_subject(tmp_path / "bf16")
    out = tmp_path / "out"
    assert main(_cli(subject, calib_file, out, "--wbits", "4")) == 0
    assert "which group size 128 does not divide" in caplog.text
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert _safetensors_dtypes(out) == {"BF16"}
    size = (out / "model.safetensors").stat().st_size
    assert size == pytest.approx((subject / "model.safetensors").stat().st_size, rel=0.01)
    export = json.loads((out / "blockquant.json").read_text())["export"]
    assert export["format"] == "dequantized" and export["dtype"] == "bfloat16"
    assert 0 < export["weight_rounding"]["weights_changed"] < export["weight_rounding"]["weights_total"]
    assert export["weight_rounding"]["max_relative_change"] <= 2**-8


def test_dequantized_checkpoint_is_the_evaluated_model_in_the_given_dtype(tmp_path):
    """``save_checkpoint(dequantized, dtype=bf16)`` writes each weight rounded to bf16 once, and
    leaves the in-memory fp32 model (and its config) as it was."""
    from blockquant.export import DEQUANTIZED, resolve_format, save_checkpoint

    model = build_tiny("llama")
    spec = QuantSpec(4, 128, scale_dtype="bfloat16")
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    result = quantize(model, parse_recipe("gptq", spec), calib, progress=False)
    assert resolve_format(None, model, result.recipe.spec, result.layers) == DEQUANTIZED
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config_dtype = model.config.dtype
    out = save_checkpoint(DEQUANTIZED, model, build_tokenizer(), tmp_path / "out", result.record(), result, dtype=torch.bfloat16)
    assert all(v.dtype == before[k].dtype and torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.config.dtype == config_dtype
    saved = load_file(out / "model.safetensors")
    moved = 0
    for name in result.layers:
        weight = model.get_submodule(name).weight
        assert torch.equal(saved[f"{name}.weight"], weight.to(torch.bfloat16)), name
        moved += int((saved[f"{name}.weight"].float() != weight).sum())
    assert json.loads((out / "blockquant.json").read_text())["export"]["weight_rounding"]["weights_changed"] == moved
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.bfloat16


@pytest.mark.parametrize("fmt, fragment", [("compressed-tensors", "group size 32 does not divide"), ("gptq", "multiples of 32")])
def test_cli_explicit_format_that_cannot_hold_the_scheme(fmt, fragment, llama_dir, calib_file, tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("quantized although the format was known not to fit")

    monkeypatch.setattr(blockquant.api, "quantize", never)
    rc = main(_cli(llama_dir, calib_file, tmp_path / "out", "--group-size", "32", "--format", fmt))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"blockquant: error: cannot write --format {fmt}") and fragment in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]


def test_cli_unknown_format_and_corrupt_packed_directory(packed_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["quantize", "x", "--format", "awq"])
    assert exit_.value.code == 2 and "invalid choice: 'awq'" in capsys.readouterr().err
    name = "model.layers.0.self_attn.k_proj.weight_scale"
    shard = _shard_of(packed_dir, name)
    raw = bytearray(shard.read_bytes())
    raw[_tensor_bytes(shard, name)[0]] ^= 1
    shard.write_bytes(bytes(raw))
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text(make_text(100))
    rc = main(["eval", str(packed_dir), "--data", str(eval_file), "--seqlen", "16", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"tensor {name} differs" in err[0]
