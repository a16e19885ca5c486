"""Models larger than memory: blocks read from the shards one at a time, written one at a time,
an interrupted run resumed, and the faults of a large run named in one line."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, build_tokenizer

from blockquant import QuantSpec, parse_recipe, quantize
from blockquant.api import BlockStream
from blockquant.cli import main
from blockquant.export.shards import read_tensors
from blockquant.lazy import LazyCheckpoint, open_model
from blockquant.recipe import Recipe, make_step

ARGS = ["--wbits", "4", "--group-size", "4", "--nsamples", "8", "--seqlen", "16", "--quiet"]  # g4 divides every width: packed


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved in several safetensors shards (as large checkpoints are)."""
    path = tmp_path_factory.mktemp("models") / "sharded-llama"
    build_tiny("llama").save_pretrained(path, max_shard_size="100KB")
    build_tokenizer().save_pretrained(path)
    assert len(list(path.glob("model-*.safetensors"))) > 2
    return path


def _calib() -> torch.Tensor:
    return torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))


def test_blocks_read_from_the_shards_give_the_codes_of_the_loaded_model(sharded_dir):
    recipe = parse_recipe("gptq", QuantSpec(bits=3, group_size=32))
    eager = build_tiny("llama")
    torch.manual_seed(0)
    want = quantize(eager, recipe, _calib(), batch_size=4, progress=False)
    lazy, checkpoint, _ = open_model(sharded_dir)
    written, grids = {}, {}

    def write(j, block, layers):
        written.update({f"model.layers.{j}.{n}": p.detach().clone() for n, p in block.state_dict().items()})
        grids.update({n: (r.scale.clone(), r.zero.clone()) for n, r in layers.items()})

    torch.manual_seed(0)
    got = quantize(lazy, recipe, _calib(), batch_size=4, progress=False, stream=BlockStream(checkpoint, write))
    assert set(got.layers) == set(want.layers) == set(grids)
    for name, r in want.layers.items():
        assert torch.equal(grids[name][0], r.scale) and torch.equal(grids[name][1], r.zero), name
        # once written, the grids live in the shard only: the result keeps the error it reports
        assert got.layers[name].scale.numel() == got.layers[name].zero.numel() == 0 and got.layers[name].error == r.error, name
    for name, t in eager.model.layers.state_dict().items():
        assert torch.equal(written[f"model.layers.{name}"], t), name
    assert all(p.is_meta for p in lazy.model.layers.parameters())  # every block released after it was written


def test_at_most_one_block_is_in_memory_at_a_time(sharded_dir, monkeypatch):
    model, checkpoint, _ = open_model(sharded_dir)
    blocks, seen = model.model.layers, []
    real_load = LazyCheckpoint.load

    def load(self, module, prefix, device="cpu"):
        real_load(self, module, prefix, device)
        seen.append(sum(any(not p.is_meta for p in b.parameters()) for b in blocks))

    monkeypatch.setattr(LazyCheckpoint, "load", load)
    quantize(model, parse_recipe("rtn", QuantSpec(bits=4, group_size=32)), _calib(), progress=False, stream=BlockStream(checkpoint))
    assert seen == [1, 1]  # each block loaded alone (the embeddings, final norm and head at open)
    outside = [n for n, p in model.named_parameters() if not n.startswith("model.layers.")]
    assert outside and all(model.get_parameter(n).is_meta for n in outside)  # released once block 0's inputs were captured


def _run(model_dir, calib, out, *extra) -> int:
    return main(["quantize", str(model_dir), "--calib", str(calib), "--output", str(out), *ARGS, *extra])


def _digest(directory: Path) -> dict[str, str]:
    """Every file but the record (it holds times) and the manifest that hashes it."""
    skip = ("blockquant.json", "blockquant.sha256.json")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.name not in skip}


def test_a_block_by_block_run_writes_what_a_whole_run_writes(sharded_dir, calib_file, tmp_path):
    assert _run(sharded_dir, calib_file, tmp_path / "blocks", "--load", "blocks", "--recipe", "gptq,blockft", "--steps", "4") == 0
    assert _run(sharded_dir, calib_file, tmp_path / "whole", "--load", "whole", "--recipe", "gptq,blockft", "--steps", "4") == 0
    a, b = read_tensors(tmp_path / "blocks"), read_tensors(tmp_path / "whole")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "blocks" / "model.safetensors.index.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial directory left


def test_an_interrupted_run_resumes_to_the_same_files(sharded_dir, calib_file, tmp_path, monkeypatch, capsys):
    from blockquant.export import streaming

    extra = ("--load", "blocks", "--recipe", "gptq,blockft", "--steps", "4")
    assert _run(sharded_dir, calib_file, tmp_path / "straight", *extra) == 0
    real_write, calls = streaming.StreamingWriter.write, []

    def write_then_stop(self, j, block, layers):
        real_write(self, j, block, layers)
        calls.append(j)
        if j == 0:
            raise KeyboardInterrupt  # killed after the first block was written

    monkeypatch.setattr(streaming.StreamingWriter, "write", write_then_stop)
    out = tmp_path / "resumed"
    assert _run(sharded_dir, calib_file, out, *extra) == 130
    assert "add --resume to go on" in capsys.readouterr().err
    assert not out.exists() and (tmp_path / ".resumed.partial").is_dir()
    calls.clear()
    assert _run(sharded_dir, calib_file, out, *extra, "--resume") == 0
    assert calls == [1]  # block 0 was restored from its shard, only block 1 was written again
    assert _digest(out) == _digest(tmp_path / "straight") and "model.safetensors.index.json" in _digest(out)
    assert "pack-quantized" in (out / "config.json").read_text()


def test_resume_refuses_other_settings_or_no_partial_run(sharded_dir, calib_file, tmp_path, capsys):
    assert _run(sharded_dir, calib_file, tmp_path / "o", "--load", "blocks", "--resume") == 2
    assert "no interrupted run" in capsys.readouterr().err
    assert _run(sharded_dir, calib_file, tmp_path / "w", "--load", "whole", "--resume") == 2
    assert "drop --load whole" in capsys.readouterr().err
    assert _run(sharded_dir, calib_file, tmp_path / "q", "--load", "blocks", "--recipe", "gptq,qft") == 2
    assert "qft needs the whole model" in capsys.readouterr().err


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_a_missing_or_truncated_shard_is_named_before_any_work(sharded_dir, calib_file, tmp_path, capsys):
    broken = _copy(sharded_dir, tmp_path / "missing")
    victim = sorted(broken.glob("model-*.safetensors"))[1]
    victim.unlink()
    assert _run(broken, calib_file, tmp_path / "o1", "--load", "blocks") == 2
    assert f"checkpoint shard {victim} is missing" in capsys.readouterr().err
    cut = _copy(sharded_dir, tmp_path / "cut")
    victim = sorted(cut.glob("model-*.safetensors"))[-1]
    victim.write_bytes(victim.read_bytes()[:-100])
    assert _run(cut, calib_file, tmp_path / "o2", "--load", "blocks") == 2
    err = capsys.readouterr().err
    assert f"checkpoint shard {victim} is truncated" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_full_disk_gives_one_line_and_no_partial_directory(sharded_dir, calib_file, tmp_path, monkeypatch, capsys):
    from blockquant.export import streaming

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(streaming, "save_file", full)
    assert _run(sharded_dir, calib_file, tmp_path / "out", "--load", "blocks") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is full" in err[0] and "nothing was written" in err[0]
    assert list(tmp_path.iterdir()) == [calib_file] or not any(p.name.startswith(".out") or p.name == "out" for p in tmp_path.iterdir())


@pytest.mark.parametrize("where", ["cpu", "disk"])
def test_offloaded_activations_give_the_same_model(where, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    recipe = Recipe(QuantSpec(bits=3, group_size=32), [make_step("gptq"), make_step("blockft", {"steps": 4, "eval_every": 2})])
    runs = {}
    for mode in ("none", where):
        model = build_tiny("llama")
        torch.manual_seed(0)
        quantize(model, recipe, _calib(), batch_size=4, progress=False, offload_activations=mode)
        runs[mode] = model.state_dict()
    assert all(torch.equal(runs["none"][k], runs[where][k]) for k in runs["none"])
    assert not any(tmp_path.glob("blockquant-act-*"))  # the activation files went with their lists


def test_rtn_without_calibration_reads_writes_and_releases_one_block_at_a_time(sharded_dir, tmp_path, monkeypatch):
    model, checkpoint, _ = open_model(sharded_dir, embeddings=False)
    assert all(p.is_meta for p in model.parameters())  # nothing is read before the blocks
    blocks, seen, written = model.model.layers, [], []
    real_load = LazyCheckpoint.load

    def load(self, module, prefix, device="cpu"):
        real_load(self, module, prefix, device)
        seen.append(sum(any(not p.is_meta for p in b.parameters()) for b in blocks))

    monkeypatch.setattr(LazyCheckpoint, "load", load)
    stream = BlockStream(checkpoint, write=lambda j, block, layers: written.append((j, sorted(layers))))
    quantize(model, parse_recipe("rtn", QuantSpec(bits=4, group_size=32)), None, progress=False, stream=stream)
    assert seen == [1, 1] and [j for j, _ in written] == [0, 1] and all(layers for _, layers in written)
    assert all(p.is_meta for p in model.parameters())  # every block released once written; nothing outside was read
    assert _run_rtn(sharded_dir, tmp_path / "blocks", "--load", "blocks") == _run_rtn(sharded_dir, tmp_path / "whole", "--load", "whole") == 0
    a, b = read_tensors(tmp_path / "blocks"), read_tensors(tmp_path / "whole")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _run_rtn(model_dir, out, *extra) -> int:
    return main(["quantize", str(model_dir), "--recipe", "rtn", "--output", str(out), "--wbits", "4", "--group-size", "4", "--quiet", *extra])
