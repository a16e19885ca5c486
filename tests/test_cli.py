"""The command line, in-process through ``blockquant.cli.main`` (and a few child processes)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_on_grid, build_tokenizer, make_text, save_tiny, subprocess_env

import blockquant.api
from blockquant import QuantSpec, parse_recipe
from blockquant.cli import main
from blockquant.files import atomic_dir, generate_calibration, load_calibration, warn_calibration_length
from blockquant.layers import weight_matrix
from blockquant.methods import METHODS
from blockquant.recipe import act_spec

QUANT_ARGS = ["--wbits", "4", "--group-size", "32", "--nsamples", "4", "--seqlen", "16", "--quiet"]


def quantize_args(model_dir, calib, out, *extra) -> list[str]:
    return ["quantize", str(model_dir), "--calib", str(calib), "--output", str(out), *QUANT_ARGS, *extra]


def leftovers(directory: Path) -> list[str]:
    """Temporary siblings an interrupted or failed write could leave behind."""
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def assert_usage_error(capsys, rc: int, *fragments: str) -> str:
    """Exit code 2 and exactly one ``blockquant: error: …`` line on stderr, nothing on stdout."""
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("blockquant: error: ")
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert captured.out == ""
    return lines[0]


@pytest.fixture
def spy_quantize(monkeypatch):
    """Record the model and result of the CLI's in-memory quantization."""
    seen = {}
    real = blockquant.api.quantize

    def spy(model, recipe, calibration, **kwargs):
        seen["model"], seen["calibration"] = model, calibration
        seen["result"] = real(model, recipe, calibration, **kwargs)
        return seen["result"]

    monkeypatch.setattr(blockquant.api, "quantize", spy)
    return seen


# ---------------------------------------------------------------------------------------------
# Success


LOAD_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out, dest = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(out)
assert not any(m == "blockquant" or m.startswith("blockquant.") for m in sys.modules), "blockquant was imported"
torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, dest)
print(type(model).__name__, len(tok))
"""


def test_quantize_writes_a_plain_hf_checkpoint(llama_dir, calib_file, tmp_path, capsys, spy_quantize):
    out = tmp_path / "out"
    rc = main(quantize_args(llama_dir, calib_file, out))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "blockquant: error" not in captured.err
    assert str(out) in captured.out and "gptq W4 g32 sym" in captured.out  # symmetric by default
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert leftovers(tmp_path) == []

    record = json.loads((out / "blockquant.json").read_text())
    assert (record["method"], record["bits"], record["group_size"], record["sym"]) == ("gptq", 4, 32, True)
    result, model = spy_quantize["result"], spy_quantize["model"]
    assert set(record["layers"]) == set(result.layers) and len(record["layers"]) == 14
    assert record["calibration"]["nsamples"] == 4 and record["calibration"]["seqlen"] == 16
    assert tuple(spy_quantize["calibration"].shape) == (4, 16)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    # loads with plain transformers in a fresh process that never imports blockquant
    dest = tmp_path / "loaded.pt"
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(out), str(dest)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "LlamaForCausalLM"
    loaded = torch.load(dest)
    expected = model.state_dict()
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    # and the saved weights are the quantized ones: on the recorded grids, unlike the source
    spec = QuantSpec(4, 32, sym=True)
    for name, layer in result.layers.items():
        w = loaded[name + ".weight"]
        assert_on_grid(w, layer.scale, layer.zero, spec, layer.g_idx)
        assert torch.equal(w, weight_matrix(model.get_submodule(name)))
    from safetensors.torch import load_file

    source = load_file(llama_dir / "model.safetensors")
    assert not torch.equal(source["model.layers.0.mlp.down_proj.weight"], loaded["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(source["model.embed_tokens.weight"], loaded["model.embed_tokens.weight"])


def test_recipe_file_and_flags_must_agree(tmp_path):
    """A value given both in the file and by a flag the user set is refused when they differ (no quiet winner)."""
    path = tmp_path / "r.yaml"
    path.write_text("wbits: 3\ngroup_size: 32\nabits: 8\nsteps: [smoothquant]\n")
    act = act_spec(8, "token")
    assert parse_recipe(str(path), QuantSpec(4, 128), act).spec.bits == 3  # flags left at their defaults: the file's values
    assert parse_recipe(str(path), QuantSpec(3, 32), act, frozenset({"wbits", "group_size"})).spec.bits == 3  # agreeing
    with pytest.raises(ValueError, match="--wbits 4 against the file's wbits: 3; --group-size 64 against the file's group_size: 32"):
        parse_recipe(str(path), QuantSpec(4, 64), act, frozenset({"wbits", "group_size"}))
    with pytest.raises(ValueError, match="--abits 16 against the file's abits: 8"):
        parse_recipe(str(path), QuantSpec(3, 32), None, frozenset({"abits"}))


def test_cli_refuses_a_flag_the_recipe_file_contradicts(llama_dir, calib_file, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("wbits: 3\nsteps: [rtn]\n")
    out = tmp_path / "o"
    rc = main(quantize_args(llama_dir, calib_file, out, "--recipe", str(recipe), "--wbits", "2"))
    assert_usage_error(capsys, rc, "--wbits 2 against the file's wbits: 3")
    assert not out.exists()


def test_network_options_are_refused_for_transformer_models(llama_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(quantize_args(llama_dir, calib_file, out, "--crop", "0:8", "--quantize-ends"))
    assert_usage_error(capsys, rc, "--crop, --quantize-ends: option(s) of MONAI segmentation networks")
    assert not out.exists()
    rc = main(["eval", str(llama_dir), "--data", str(calib_file), "--region", "96:", "--roi", "4,4,4"])
    assert_usage_error(capsys, rc, "--region, --roi: option(s) of MONAI segmentation networks")


def test_a_blockft_flag_on_a_qft_recipe_names_only_itself(llama_dir, calib_file, tmp_path, capsys):
    rc = main(quantize_args(llama_dir, calib_file, tmp_path / "o", "--recipe", "gptq,qft", "--steps", "2", "--objective", "logits"))
    err = assert_usage_error(capsys, rc, "the recipe's last step qft takes no such option; blockft takes it")
    assert err.startswith("blockquant: error: --objective: ")  # --steps, valid for qft, is not blamed


def test_rtn_sym_and_yaml_recipe(llama_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "rtn"
    assert main(quantize_args(llama_dir, calib_file, out, "--recipe", "rtn", "--sym", "--wbits", "3")) == 0
    record = json.loads((out / "blockquant.json").read_text())
    assert (record["method"], record["bits"], record["sym"]) == ("rtn", 3, True)

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"wbits": 8, "group_size": -1, "steps": [{"method": "gptq", "act_order": False}]}))
    out2 = tmp_path / "yaml"
    argv = ["quantize", str(llama_dir), "--calib", str(calib_file), "--output", str(out2), "--nsamples", "4", "--seqlen", "16"]
    assert main([*argv, "--quiet", "--recipe", str(recipe)]) == 0
    record = json.loads((out2 / "blockquant.json").read_text())
    assert (record["method"], record["bits"], record["group_size"]) == ("gptq", 8, -1)
    assert record["recipe"]["steps"][0]["act_order"] is False
    capsys.readouterr()


def test_short_calibration_warns_and_proceeds(llama_dir, tmp_path, capsys, caplog):
    calib = tmp_path / "short.txt"
    calib.write_text(make_text(40))  # 40 tokens: 2 windows of 16, fewer than the 8 asked for
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        rc = main(quantize_args(llama_dir, calib, out, "--nsamples", "8"))
    assert rc == 0, capsys.readouterr().err
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("only 2 samples" in m and "8 requested" in m for m in warnings), warnings
    assert json.loads((out / "blockquant.json").read_text())["calibration"]["nsamples"] == 2


def test_record_holds_absolute_paths(llama_dir, calib_file, tmp_path, monkeypatch, capsys):
    """blockquant.json names the source and calibration absolutely: a relative path means nothing once the cwd changes."""
    monkeypatch.chdir(tmp_path)
    rel_model, rel_calib = os.path.relpath(llama_dir, tmp_path), os.path.relpath(calib_file, tmp_path)
    assert main(quantize_args(rel_model, rel_calib, "out")) == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "out" / "blockquant.json").read_text())
    assert record["source"] == str(Path(llama_dir).resolve())
    assert record["calibration"]["file"] == str(Path(calib_file).resolve())


def test_encoder_calibration_samples_are_framed(calib_file):
    """An encoder sees each sample as one input, [CLS] … [SEP], cut from the stream without special tokens."""
    tok = build_tokenizer()
    tok.add_special_tokens({"cls_token": "[CLS]", "sep_token": "[SEP]"})
    stream = tok(calib_file.read_text(), add_special_tokens=False)["input_ids"]
    framed = load_calibration(calib_file, tok, 5, 12, seed=3, encoder=True)
    assert framed.shape == (5, 12)
    assert (framed[:, 0] == tok.cls_token_id).all() and (framed[:, -1] == tok.sep_token_id).all()
    for row in framed[:, 1:-1].tolist():  # 10 consecutive tokens of the stream, starting on a window boundary
        start = stream.index(row[0], 0)
        while stream[start : start + 10] != row:
            start = stream.index(row[0], start + 1)
        assert start % 10 == 0
    plain = load_calibration(calib_file, tok, 5, 12, seed=3)  # decoders: plain windows of the stream
    assert plain.shape == (5, 12) and not (plain == tok.cls_token_id).any()
    tok_plain = build_tokenizer()  # an encoder tokenizer without CLS/SEP gets plain windows too
    assert torch.equal(
        load_calibration(calib_file, tok_plain, 5, 12, seed=3, encoder=True), load_calibration(calib_file, tok_plain, 5, 12, seed=3)
    )


def framing_tokenizer():
    """The test tokenizer with BERT's framing: every call gives ``[CLS] … [SEP]``."""
    from tokenizers.processors import TemplateProcessing

    tok = build_tokenizer()
    tok.add_special_tokens({"cls_token": "[CLS]", "sep_token": "[SEP]"})
    ids = [("[CLS]", tok.cls_token_id), ("[SEP]", tok.sep_token_id)]
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=ids)
    return tok


def test_paragraph_calibration_takes_whole_framed_paragraphs_up_to_the_budget(tmp_path, caplog):
    """``--calib-paragraphs``: each sample is one paragraph as the model is called on it, cut at
    --seqlen; paragraphs are drawn at random until the budget is reached, and no further."""
    paragraphs = [make_text(n, seed=n).replace("\n", " ").strip() for n in range(3, 33)]  # 3 … 32 words
    calib = tmp_path / "paragraphs.txt"
    calib.write_text("\n\n".join(paragraphs) + "\n")
    tok = framing_tokenizer()
    samples = load_calibration(calib, tok, 4, 25, seed=0, encoder=True, paragraphs=True)  # 100 tokens, at most 25 each
    total = sum(s.numel() for s in samples)
    assert 100 <= total < 100 + samples[-1].numel()
    words = {tuple(tok(p, add_special_tokens=False)["input_ids"]): p for p in paragraphs}
    for s in samples:
        ids = s.tolist()
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and len(ids) <= 25
        if len(ids) < 25:  # whole: [CLS] paragraph [SEP]
            assert tuple(ids[1:-1]) in words
        else:  # truncated at --seqlen as the tokenizer truncates: the paragraph's beginning, then [SEP]
            assert any(w[:23] == tuple(ids[1:-1]) for w in words)  # (a whole paragraph of 23 tokens fits too)
    assert any(s.numel() == 25 and tuple(s[1:-1].tolist()) not in words for s in samples)  # some paragraph was truncated
    assert len({s.numel() for s in samples}) > 1  # lengths vary, as the paragraphs do
    again = load_calibration(calib, tok, 4, 25, seed=0, paragraphs=True)
    other = load_calibration(calib, tok, 4, 25, seed=1, paragraphs=True)
    assert [s.tolist() for s in again] == [s.tolist() for s in samples] != [s.tolist() for s in other]
    with caplog.at_level(logging.WARNING):
        everything = load_calibration(calib, tok, 100, 40, paragraphs=True)  # 4000 tokens asked, the file has 525 + 2 × 30
    assert len(everything) == len(paragraphs) and any("only 585 tokens in 30 paragraphs" in r.getMessage() for r in caplog.records)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n\n  \n")
    with pytest.raises(ValueError, match="no paragraphs|empty"):
        load_calibration(blank, tok, 4, 25, paragraphs=True)


def test_quantize_calibrates_on_paragraphs_and_records_it(llama_dir, tmp_path, capsys, spy_quantize):
    calib = tmp_path / "paragraphs.txt"
    calib.write_text("\n\n".join(make_text(n, seed=n).replace("\n", " ") for n in (5, 9, 5, 14, 9, 5, 20, 7)))
    out = tmp_path / "out"
    rc = main(quantize_args(llama_dir, calib, out, "--calib-paragraphs", "--recipe", "gptq,blockft", "--steps", "4"))
    assert rc == 0, capsys.readouterr().err
    record = json.loads((out / "blockquant.json").read_text())["calibration"]
    assert record["unit"] == "paragraph" and record["tokens"] >= 64 and record["nsamples"] == len(spy_quantize["calibration"])
    assert {s.numel() for s in spy_quantize["calibration"]} <= {5, 9, 14, 16, 7}  # whole paragraphs, or cut at --seqlen 16


def test_generated_calibration_continues_each_window_by_sampling_the_model(make_tiny):
    """Each window keeps its first N tokens; every later token is a draw from the model's own next-token
    distribution given what precedes it (replayed here without a KV cache, from the same seeded generator)."""
    model = make_tiny("llama")
    samples = torch.randint(0, model.config.vocab_size, (5, 20), generator=torch.Generator().manual_seed(0))
    out = generate_calibration(model, samples, 6, seed=3, batch_size=2)
    assert out.shape == samples.shape and out.dtype == torch.long
    assert torch.equal(out[:, :6], samples[:, :6]) and not torch.equal(out, samples)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for rows in out.split(2):
            for t in range(6, 20):
                probs = torch.softmax(model(rows[:, :t]).logits[:, -1].float(), dim=-1)
                assert torch.equal(torch.multinomial(probs, 1, generator=gen)[:, 0], rows[:, t])
    assert torch.equal(generate_calibration(model, samples, 6, seed=3, batch_size=2), out)  # deterministic
    assert not torch.equal(generate_calibration(model, samples, 6, seed=4), out)
    with pytest.raises(ValueError, match=r"\[1, 19\]"):
        generate_calibration(model, samples, 20)


def test_generated_calibration_continues_each_prompt_r_times_adjacently(make_tiny):
    """``continuations`` R: the R windows of a prompt are adjacent, each continued by its own draws,
    exactly as if the caller had repeated each window R times (so R = 1 keeps the earlier draws)."""
    model = make_tiny("llama")
    samples = torch.randint(0, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    out = generate_calibration(model, samples, 6, seed=3, batch_size=4, continuations=2)
    assert out.shape == (6, 20)
    assert torch.equal(out[:, :6], samples[:, :6].repeat_interleave(2, dim=0))
    assert all(not torch.equal(out[2 * i, 6:], out[2 * i + 1, 6:]) for i in range(3))  # two continuations, not one copied
    assert torch.equal(out, generate_calibration(model, samples.repeat_interleave(2, dim=0), 6, seed=3, batch_size=4))
    with pytest.raises(ValueError, match="--calib-continuations must be >= 1"):
        generate_calibration(model, samples, 6, continuations=0)


def test_quantize_calibrates_on_generated_windows_and_records_it(llama_dir, calib_file, tmp_path, capsys, spy_quantize):
    out = tmp_path / "out"
    assert main(quantize_args(llama_dir, calib_file, out, "--calib-generate", "4", "--recipe", "rtn")) == 0, capsys.readouterr().err
    record = json.loads((out / "blockquant.json").read_text())["calibration"]
    assert record["generated"] == {"prompt_tokens": 4, "temperature": 1.0, "continuations": 1} and record["tokens"] == 4 * 16
    from transformers import AutoTokenizer

    real = load_calibration(calib_file, AutoTokenizer.from_pretrained(llama_dir), 4, 16)
    used = spy_quantize["calibration"]
    assert used.shape == real.shape and torch.equal(used[:, :4], real[:, :4]) and not torch.equal(used, real)


def test_quantize_continues_each_prompt_r_times_and_records_it(llama_dir, calib_file, tmp_path, capsys, spy_quantize):
    out = tmp_path / "out"
    args = quantize_args(llama_dir, calib_file, out, "--calib-generate", "4", "--calib-continuations", "3", "--recipe", "rtn")
    assert main(args) == 0, capsys.readouterr().err
    record = json.loads((out / "blockquant.json").read_text())["calibration"]
    assert record["generated"] == {"prompt_tokens": 4, "temperature": 1.0, "continuations": 3}
    assert record["nsamples"] == 12 and record["tokens"] == 12 * 16
    assert spy_quantize["calibration"].shape == (12, 16)


def test_calibration_longer_than_a_sentence_model_runs_warns(tmp_path, caplog):
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256}))
    with caplog.at_level(logging.WARNING):
        warn_calibration_length(tmp_path, 256)
        assert not caplog.records
        warn_calibration_length(tmp_path, 512)
    assert any("--seqlen 512" in r.getMessage() and "256" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        warn_calibration_length(tmp_path / "missing", 4096)  # no sentence-transformers config: nothing to say
    assert not caplog.records


def test_overwrite_replaces_existing_output(llama_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old run")
    rc = main(quantize_args(llama_dir, calib_file, out, "--recipe", "rtn"))
    assert_usage_error(capsys, rc, str(out), "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["stale.txt"]

    rc = main(quantize_args(llama_dir, calib_file, out, "--recipe", "rtn", "--overwrite"))
    assert rc == 0, capsys.readouterr().err
    assert not (out / "stale.txt").exists()
    assert (out / "blockquant.json").is_file() and (out / "config.json").is_file()
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Usage errors: exit 2, one line, nothing written


def _bad_config_dir(tmp_path: Path, content: str) -> Path:
    d = tmp_path / "bad-model"
    d.mkdir()
    (d / "config.json").write_text(content)
    return d


ERROR_CASES = {
    "missing-model-dir": (lambda tp: dict(model=tp / "nope"), ["does not exist"]),
    "no-config": (lambda tp: dict(model=_mkdir(tp / "empty")), ["no config.json"]),
    "unsupported-arch": (
        lambda tp: dict(model=_bad_config_dir(tp, json.dumps({"architectures": ["T5ForConditionalGeneration"], "model_type": "t5"}))),
        ["unsupported architecture T5ForConditionalGeneration", "LlamaForCausalLM", "BertModel"],
    ),
    "config-not-json": (lambda tp: dict(model=_bad_config_dir(tp, "{not json")), ["not valid JSON"]),
    "config-not-object": (lambda tp: dict(model=_bad_config_dir(tp, "[1, 2]")), ["names no 'architectures'"]),
    "config-no-architectures": (lambda tp: dict(model=_bad_config_dir(tp, '{"model_type": "llama"}')), ["names no 'architectures'"]),
    "config-architectures-not-list": (
        lambda tp: dict(model=_bad_config_dir(tp, '{"architectures": "LlamaForCausalLM"}')),
        ["names no 'architectures'"],
    ),
    "wbits-5": (lambda tp: dict(extra=["--wbits", "5"]), ["bits must be one of"]),
    "group-size-0": (lambda tp: dict(extra=["--group-size", "0"]), ["group size must be >= 1", "got 0"]),
    "group-size-minus-2": (lambda tp: dict(extra=["--group-size", "-2"]), ["got -2"]),
    "unknown-method": (lambda tp: dict(extra=["--recipe", "awq2"]), ["unknown method 'awq2'", ", ".join(sorted(METHODS))]),
    "calibration-missing": (lambda tp: dict(calib=tp / "nope.txt"), ["calibration file", "does not exist"]),
    "calibration-empty": (lambda tp: dict(calib=_write(tp / "empty.txt", "  \n\n")), ["is empty"]),
    "calibration-too-short": (lambda tp: dict(calib=_write(tp / "short.txt", make_text(10))), ["10 tokens", "fewer than one sample of 16"]),
    "calibration-not-utf8": (lambda tp: dict(calib=_write_bytes(tp / "bin.txt", b"\xff\xfe\x00abc")), ["not UTF-8"]),
    "seqlen-too-long": (lambda tp: dict(extra=["--seqlen", "4096"]), ["exceeds the model's 128 positions"]),
    "nsamples-0": (lambda tp: dict(extra=["--nsamples", "0"]), ["--nsamples must be >= 1"]),
    "batch-size-0": (lambda tp: dict(extra=["--batch-size", "0"]), ["--batch-size"]),
    "no-cuda": (lambda tp: dict(extra=["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"]), ["--device"]),
    "output-parent-missing": (lambda tp: dict(out=tp / "a" / "b" / "out"), ["parent directory"]),
    "output-is-a-file": (lambda tp: dict(out=_write(tp / "afile", "x")), ["is a file, not a directory"]),
    "nan-learning-rate": (
        lambda tp: dict(extra=["--recipe", "gptq,blockft", "--lr-weight", "nan"]),
        ["option 'lr_weight' of method 'blockft' must be a finite number, got nan"],
    ),
    "calib-generate-0": (lambda tp: dict(extra=["--calib-generate", "0"]), ["--calib-generate", "[1, 15]", "got 0"]),
    "calib-generate-whole-window": (lambda tp: dict(extra=["--calib-generate", "16"]), ["[1, 15]", "got 16"]),
    "calib-generate-paragraphs": (lambda tp: dict(extra=["--calib-generate", "4", "--calib-paragraphs"]), ["--calib-paragraphs"]),
    "calib-continuations-alone": (lambda tp: dict(extra=["--calib-continuations", "2"]), ["--calib-continuations", "--calib-generate"]),
    "calib-continuations-0": (
        lambda tp: dict(extra=["--calib-generate", "4", "--calib-continuations", "0"]),
        ["--calib-continuations must be >= 1", "got 0"],
    ),
    "calib-generate-encoder": (
        lambda tp: dict(model=save_tiny("bert", tp / "bert"), extra=["--calib-generate", "4"]),
        ["--calib-generate needs a causal language model", "BertModel"],
    ),
}


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_usage_errors_exit_2_and_write_nothing(case, llama_dir, calib_file, tmp_path, capsys):
    make, fragments = ERROR_CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    setup = make(work)
    capsys.readouterr()  # what building the case printed (a tiny model's save bar) is not the command's output
    out = setup.get("out", work / "out")
    args = quantize_args(setup.get("model", llama_dir), setup.get("calib", calib_file), out, *setup.get("extra", []))
    before = sorted(p.name for p in work.iterdir())
    rc = main(args)
    assert_usage_error(capsys, rc, *fragments)
    assert not out.exists() or case == "output-is-a-file"
    assert sorted(p.name for p in work.iterdir()) == before, "something was written"
    assert leftovers(work) == []


@pytest.mark.parametrize("where", ["model", "parent", "calib"])
def test_overwrite_never_replaces_an_input(where, calib_file, tmp_path, capsys):
    """--overwrite replaces an earlier output, never the model, the folder holding it, or the calibration file's folder."""
    model = save_tiny("llama", tmp_path / "parent" / "model")
    calib = tmp_path / "data" / "calib.txt"
    calib.parent.mkdir()
    calib.write_text(calib_file.read_text())
    capsys.readouterr()
    out = {"model": model, "parent": tmp_path / "parent", "calib": calib.parent}[where]
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert_usage_error(capsys, main(quantize_args(model, calib, out, "--recipe", "rtn", "--overwrite")), "an input of this run")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_unwritable_output_is_refused_before_the_work(llama_dir, calib_file, tmp_path, capsys, monkeypatch, spy_quantize):
    locked = tmp_path / "locked"
    locked.mkdir()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkdtemp", refuse)  # as a read-only folder does (tests may run as root, who can write anywhere)
    rc = main(quantize_args(llama_dir, calib_file, locked / "out"))
    assert_usage_error(capsys, rc, "cannot write --output", "Permission denied")
    assert spy_quantize == {}, "the work ran before the output was checked"


def test_nan_weight_is_a_usage_error(tmp_path, calib_file, capsys):
    def poison(model):
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")

    model_dir = save_tiny("llama", tmp_path / "nan-llama", mutate=poison)
    capsys.readouterr()  # the fixture's own save output
    out = tmp_path / "out"
    rc = main(quantize_args(model_dir, calib_file, out))
    assert_usage_error(capsys, rc, "model.layers.1.self_attn.v_proj.weight", "NaN")
    assert not out.exists() and leftovers(tmp_path) == []


def test_options_that_would_be_ignored_are_refused(llama_dir, calib_file, tmp_path, capsys):
    # the demo runs a fixed study: an option it does not take is an error, not silently dropped
    assert_usage_error(capsys, main(["quantize", "--wbits", "2", "--recipe", "awq"]), "--recipe, --wbits", "name a MODEL_DIR")
    rc = main(quantize_args(llama_dir, calib_file, tmp_path / "o", "--act-granularity", "tensor"))
    assert_usage_error(capsys, rc, "--act-granularity", "--abits 8")
    assert not (tmp_path / "o").exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("blockquant ")


def test_missing_required_options(llama_dir, calib_file, tmp_path, capsys):
    assert_usage_error(capsys, main(["quantize", str(llama_dir), "--output", str(tmp_path / "o"), "--quiet"]), "--calib")
    assert_usage_error(capsys, main(["quantize", str(llama_dir), "--calib", str(calib_file), "--quiet"]), "--output")
    # no MODEL_DIR is the demo, which takes neither
    assert_usage_error(capsys, main(["quantize", "--output", str(tmp_path / "o")]), "MODEL_DIR")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("interrupt", [OSError("No space left on device"), KeyboardInterrupt()], ids=["oserror", "interrupt"])
def test_failure_while_writing_leaves_nothing(llama_dir, calib_file, tmp_path, capsys, monkeypatch, interrupt):
    import transformers

    def broken_save(self, *args, **kwargs):
        raise interrupt

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", broken_save)
    out = tmp_path / "out"
    rc = main(quantize_args(llama_dir, calib_file, out, "--recipe", "rtn"))
    err = capsys.readouterr().err
    if isinstance(interrupt, KeyboardInterrupt):
        assert rc == 130 and "nothing was written" in err
    else:
        assert rc == 2 and "blockquant: error: No space left on device" in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]

    # with --overwrite, a failed write keeps the previous output intact
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    rc = main(quantize_args(llama_dir, calib_file, out, "--recipe", "rtn", "--overwrite"))
    assert rc != 0
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert leftovers(tmp_path) == []


def test_atomic_dir_removes_its_temporary_on_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out, overwrite=False) as tmp:
            assert tmp.parent == tmp_path and ".tmp-" in tmp.name
            (tmp / "partial.bin").write_bytes(b"x" * 10)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(out, overwrite=False) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "done.txt").read_text() == "ok"


def test_module_entry_point_reports_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "blockquant",
            "quantize",
            str(tmp_path / "missing"),
            "--calib",
            str(tmp_path / "c.txt"),
            "--output",
            str(tmp_path / "out"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockquant: error: ") and "does not exist" in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# eval


@pytest.fixture
def eval_file(tmp_path) -> Path:
    return _write(tmp_path / "heldout.txt", make_text(100, seed=9))  # 6 windows of 16


def test_eval_prints_perplexity(llama_dir, eval_file, capsys):
    assert main(["eval", str(llama_dir), "--data", str(eval_file), "--seqlen", "16", "--quiet"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("perplexity ") and "(6 windows of 16 tokens)" in line
    ppl = float(line.split()[1])
    assert 1.0 < ppl < 10 * 256  # a random model over a 256-token vocabulary


def test_eval_json_with_reference(llama_dir, calib_file, eval_file, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(quantize_args(llama_dir, calib_file, out, "--recipe", "rtn", "--wbits", "8")) == 0
    capsys.readouterr()
    rc = main(
        [
            "eval",
            str(out),
            "--data",
            str(eval_file),
            "--seqlen",
            "16",
            "--max-windows",
            "4",
            "--reference",
            str(llama_dir),
            "--json",
            "--quiet",
        ]
    )
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["windows"] == 4
    assert result["perplexity"] > 1 and result["reference_perplexity"] > 1
    # W8 RTN barely moves a model's perplexity
    assert abs(result["delta_percent"]) < 1.0
    assert result["delta_percent"] == pytest.approx(100 * (result["perplexity"] / result["reference_perplexity"] - 1))


def test_eval_encoder_cosine_to_reference(tmp_path, capsys):
    bert = save_tiny("bert", tmp_path / "bert")
    paragraphs = [make_text(n, seed=n) for n in (20, 60, 200)]  # the last is longer than 128 positions
    data = _write(tmp_path / "paragraphs.txt", "\n\n".join(paragraphs))
    capsys.readouterr()
    assert main(["eval", str(bert), "--data", str(data), "--reference", str(bert), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["paragraphs"] == 3
    assert result["cosine"] == pytest.approx(1.0, abs=1e-5)


def test_eval_seqlen_beyond_positions_is_a_usage_error(tmp_path, eval_file, capsys):
    gpt2 = save_tiny("gpt2", tmp_path / "gpt2")  # learned positions: 128
    capsys.readouterr()
    rc = main(["eval", str(gpt2), "--data", str(_write(tmp_path / "long.txt", make_text(600))), "--seqlen", "256", "--quiet"])
    assert_usage_error(capsys, rc, "--seqlen 256 exceeds the model's 128 positions")


def test_eval_errors(llama_dir, eval_file, tmp_path, capsys):
    short = _write(tmp_path / "tiny.txt", make_text(5))
    assert_usage_error(capsys, main(["eval", str(llama_dir), "--data", str(short), "--seqlen", "16", "--quiet"]), "fewer than one window")
    assert_usage_error(capsys, main(["eval", str(llama_dir), "--data", str(tmp_path / "none.txt"), "--quiet"]), "does not exist")
    assert_usage_error(capsys, main(["eval", str(llama_dir), "--data", str(eval_file), "--max-windows", "0", "--quiet"]), "--max-windows")
    bert = save_tiny("bert", tmp_path / "bert")
    capsys.readouterr()
    assert_usage_error(capsys, main(["eval", str(bert), "--data", str(eval_file), "--quiet"]), "--reference")
    for bad, fragment in ((["--seqlen", "1"], "--seqlen must be >= 2"), (["--batch-size", "0"], "--batch-size must be >= 1")):
        assert_usage_error(capsys, main(["eval", str(llama_dir), "--data", str(eval_file), *bad, "--quiet"]), fragment)
    # a reference of another kind, or with another tokenizer, gives no meaningful comparison
    ref = ["eval", str(llama_dir), "--data", str(eval_file), "--seqlen", "16", "--quiet", "--reference"]
    assert_usage_error(capsys, main([*ref, str(bert)]), "is an encoder", "a causal-lm", "do not compare")
    other = save_tiny("llama", tmp_path / "other-tokenizer")
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["an-extra-token"])
    tokenizer.save_pretrained(other)
    capsys.readouterr()
    assert_usage_error(capsys, main([*ref, str(other)]), "has another tokenizer")


# ---------------------------------------------------------------------------------------------
# parse_recipe


def test_parse_recipe_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "wbits: 3\ngroup_size: 64\nsym: true\nsteps:\n  - awq\n  - method: gptq\n    act_order: false\n    damp: 0.05\n    block_size: 32\n"
    )
    recipe = parse_recipe(str(path), QuantSpec(4, 128))
    assert recipe.spec == QuantSpec(bits=3, group_size=64, sym=True)
    assert [s.method for s in recipe.steps] == ["awq", "gptq"] and recipe.name == "awq,gptq"
    gptq = recipe.steps[1].options
    assert (gptq.act_order, gptq.damp, gptq.block_size) == (False, 0.05, 32)
    assert recipe.to_dict()["steps"][1]["damp"] == 0.05

    # the file only overrides what it names
    path.write_text("steps:\n  - method: rtn\n    clip_search: true\n")
    recipe = parse_recipe(str(path), QuantSpec(8, -1, sym=True))
    assert recipe.spec == QuantSpec(8, -1, sym=True) and recipe.steps[0].options.clip_search is True


def test_parse_recipe_comma_chain():
    spec = QuantSpec(4, 32, sym=True)
    recipe = parse_recipe("awq, gptq", spec)
    assert [s.method for s in recipe.steps] == ["awq", "gptq"] and recipe.spec is spec
    assert recipe.steps[1].options.damp == 0.01
    assert [s.method for s in parse_recipe("gptq", spec).steps] == ["gptq"]


@pytest.mark.parametrize(
    "text,fragments",
    [
        ("peqa", ["unknown method 'peqa'", "known methods: " + ", ".join(sorted(METHODS))]),
        ("rtn,nope", ["unknown method 'nope'", "known methods: " + ", ".join(sorted(METHODS))]),
        ("", ["at least one method"]),
        (" , ", ["at least one method"]),
        ("missing.yaml", ["does not exist"]),
        # orders that would waste or undo a step: a second rounding re-rounds grid weights, a late transform rescales them
        ("rtn,gptq", ["rtn and gptq both round the weights", "keep one"]),
        ("gptq,gptq", ["gptq appears more than once"]),
        ("gptq,awq", ["put it before gptq (e.g. awq,gptq)"]),
        ("blockft,gptq", ["per-block methods come first"]),
        ("qft,gptq", ["then qft"]),
        ("gptq,blockft,lkd", ["at most one fine-tuning step"]),
    ],
)
def test_parse_recipe_errors(text, fragments, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as info:
        parse_recipe(text, QuantSpec())
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    "content,fragment",
    [
        ("steps: [", "not valid YAML"),
        ("wbits: 4\n", "needs a 'steps:' list"),
        ("- rtn\n", "needs a 'steps:' list"),
        ("steps:\n  - act_order: true\n", "each step needs 'method:'"),
        ("steps:\n  - method: gptq\n    bogus: 1\n", "unknown option(s) bogus"),
        ("steps:\n  - method: rtn\n    damp: 0.1\n", "it takes: clip_search, input_weighted"),
        ("wbits: 5\nsteps: [rtn]\n", "bits must be one of"),
        ("group_size: 0\nsteps: [rtn]\n", "group size must be >= 1"),
        ("steps:\n  - method: gptq\n    damp: 0\n", "damp must be in (0, 1)"),
        # a value of the wrong type is named, never coerced ("false" is not False, 1.5 not 1) nor a traceback
        ("steps:\n  - method: gptq\n    damp: abc\n", "option 'damp' of method 'gptq' must be a finite number, got 'abc'"),
        ("steps:\n  - method: gptq\n    act_order: 'false'\n", "option 'act_order' of method 'gptq' must be true or false"),
        ("steps:\n  - method: blockft\n    steps: ten\n", "option 'steps' of method 'blockft' must be an integer"),
        ("steps:\n  - method: blockft\n    lr_weight: .nan\n", "must be a finite number, got nan"),
        ("sym: 'false'\nsteps: [rtn]\n", "sym must be true or false"),
        ("group_size: 1.5\nsteps: [rtn]\n", "group_size must be an integer, got 1.5"),
        ("wbits:\nsteps: [rtn]\n", "wbits must be an integer, got None"),
        ("abits: 8\nact_granularity: tensor\nact_percentile: high\nsteps: [rtn]\n", "act_percentile must be a finite number"),
        ("group-size: 32\nsteps: [rtn]\n", "unknown key(s) group-size"),
    ],
)
def test_parse_recipe_yaml_errors(content, fragment, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        parse_recipe(str(path), QuantSpec())
    assert fragment in str(info.value)


def test_a_binary_calibration_file_is_refused(llama_dir, tmp_path, capsys):
    calib = tmp_path / "nul.txt"
    calib.write_bytes(b"\x00" * 4000 + b"some words")
    rc = main(quantize_args(llama_dir, calib, tmp_path / "out"))
    assert_usage_error(capsys, rc, "is not text", "NUL")
    assert not (tmp_path / "out").exists()


def test_a_log_file_gets_plain_lines_not_progress_bars(llama_dir, calib_file, tmp_path, capsys, caplog):
    args = [a for a in quantize_args(llama_dir, calib_file, tmp_path / "out", "--recipe", "rtn") if a != "--quiet"]
    assert main(args) == 0  # stderr is captured, not a terminal
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b[" not in err, err[:500]  # no progress bar redraws
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(m.startswith("block 0: error in") for m in lines) and any(m.startswith("block 1: error in") for m in lines)


def test_rtn_without_calib_quantizes_the_weights_alone(llama_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "rtn"
    args = ["quantize", str(llama_dir), "--recipe", "rtn", "--output", str(out), "--wbits", "4", "--group-size", "32", "--quiet"]
    assert main(args) == 0
    assert "no calibration" in capsys.readouterr().out
    record = json.loads((out / "blockquant.json").read_text())
    assert record["calibration"] is None and record["blocks"][0]["output_error"] is None
    assert main(quantize_args(llama_dir, calib_file, tmp_path / "calibrated", "--recipe", "rtn")) == 0
    capsys.readouterr()
    from blockquant.export.shards import read_tensors

    a, b = read_tensors(out), read_tensors(tmp_path / "calibrated")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # the calibration only measured the errors
    gptq = ["quantize", str(llama_dir), "--recipe", "gptq", "--output", str(tmp_path / "g"), "--quiet"]
    assert_usage_error(capsys, main(gptq), "gptq need(s) calibration data (--calib FILE)")
    assert not (tmp_path / "g").exists()
