"""The default output loads in plain transformers, in a process that never imports blockquant.

``blockquant quantize`` writes compressed-tensors ``pack-quantized`` by default. With the default
(symmetric) grid, ``AutoModelForCausalLM.from_pretrained(OUT)`` loads it as it is and computes
the logits ``blockquant.load(OUT)`` computes. An asymmetric checkpoint keeps the layout
llm-compressor writes (zero points packed along the output dimension, what vLLM reads), which
transformers 5.23 + compressed-tensors 0.20 refuse in compressed mode and load with
``CompressedTensorsConfig(dequantize=True)``; docs/formats.md says so, and the test below notices
when an upgrade changes it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import build_tokenizer, make_text, subprocess_env
from safetensors.torch import load_file

import blockquant
from blockquant import QuantSpec, parse_recipe, quantize
from blockquant.cli import main

pytest.importorskip("compressed_tensors")

# every width a multiple of the default group size (128), so the default format holds the model
LLAMA = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=64,
)
PROMPT = [[5, 17, 42, 9, 77, 3, 120, 64]]
NEW_TOKENS = 4

CLIENT = """
import json, sys, torch, transformers
from safetensors.torch import save_file
ids = torch.tensor(json.loads(sys.argv[1]))
out = {}
sym, asym, dest = sys.argv[2:5]
model = transformers.AutoModelForCausalLM.from_pretrained(sym)  # plain: no quantization_config argument
with torch.no_grad():
    out["sym/logits"] = model(ids).logits
out["sym/generated"] = model.generate(ids, max_new_tokens=int(sys.argv[5]), do_sample=False)
try:
    transformers.AutoModelForCausalLM.from_pretrained(asym)
    asym_plain = "loaded"
except Exception as e:
    asym_plain = f"{type(e).__name__}: {e}"
model = transformers.AutoModelForCausalLM.from_pretrained(
    asym, quantization_config=transformers.CompressedTensorsConfig(dequantize=True)
)
with torch.no_grad():
    out["asym/logits"] = model(ids).logits
assert "blockquant" not in sys.modules, "blockquant was imported"
save_file({k: v.contiguous() for k, v in out.items()}, dest, metadata={"asym_plain": asym_plain})
"""


def _subject(path: Path) -> Path:
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval().save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor], str]:
    """A default-grid CLI export, an asymmetric export, and what plain transformers made of them."""
    tmp = tmp_path_factory.mktemp("loading")
    subject = _subject(tmp / "tiny-llama")
    calib = tmp / "calib.txt"
    calib.write_text(make_text(600, seed=1))
    sym = tmp / "sym"
    # the default grid (symmetric), spelled out so that the test means the same before and after the default changed
    argv = ["quantize", str(subject), "--recipe", "gptq", "--calib", str(calib), "--nsamples", "8", "--seqlen", "32"]
    assert main([*argv, "--sym", "--output", str(sym), "--quiet"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(subject)
    calib_ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    result = quantize(model, parse_recipe("gptq", QuantSpec(bits=4, group_size=128, sym=False)), calib_ids, progress=False)
    asym = blockquant.save_packed(model, result, tmp / "asym")
    dest = tmp / "client.safetensors"
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, json.dumps(PROMPT), str(sym), str(asym), str(dest), str(NEW_TOKENS)],
        cwd=tmp,
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(str(dest), "pt") as f:
        asym_plain = f.metadata()["asym_plain"]
    return sym, asym, load_file(dest), asym_plain


def test_default_grid_loads_in_plain_transformers(client):
    """``from_pretrained(OUT)`` without blockquant: the logits and greedy tokens of ``blockquant.load``."""
    sym, _, out, _ = client
    qcfg = json.loads((sym / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "pack-quantized" and qcfg["config_groups"]["group_0"]["weights"]["symmetric"] is True
    model = blockquant.load(sym)
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(out["sym/logits"], logits, rtol=0, atol=1e-5)
    generated = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out["sym/generated"].shape == (1, len(PROMPT[0]) + NEW_TOKENS)
    assert torch.equal(out["sym/generated"], generated)


def test_asymmetric_grid_loads_with_dequantize(client):
    """The asymmetric layout (llm-compressor's, vLLM's) loads with ``dequantize=True``; plain
    compressed mode still refuses its packed zero points. If this starts to load, an upgrade
    fixed it upstream: update docs/formats.md and reconsider the symmetric default."""
    _, asym, out, asym_plain = client
    assert asym_plain != "loaded", "transformers now loads packed asymmetric zero points in compressed mode"
    assert "mismatch" in asym_plain.lower() or "size" in asym_plain.lower(), asym_plain
    with torch.no_grad():
        logits = blockquant.load(asym, torch.float32)(torch.tensor(PROMPT)).logits
    torch.testing.assert_close(out["asym/logits"], logits, rtol=0, atol=1e-5)
