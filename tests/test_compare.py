"""The method advisor end to end on a tiny saved Llama, and the fine-tuning flags of the CLI."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest
from conftest import make_text, save_tiny

from blockquant.cli import main
from blockquant.compare import child_result


@pytest.fixture
def eval_file(tmp_path):
    p = tmp_path / "eval.txt"
    p.write_text(make_text(400, seed=7))
    return p


def test_compare_writes_table_plot_and_verdict(llama_dir, calib_file, eval_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "cmp"
    code = main(
        [
            "compare",
            str(llama_dir),
            "--wbits",
            "2",
            "--group-size",
            "32",
            "--calib",
            str(calib_file),
            "--eval",
            str(eval_file),
            "--nsamples",
            "8",
            "--seqlen",
            "32",
            "--variants",
            "rtn,blockft,joint K=3",
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--output",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "skipped joint K=3: the model has only 2 blocks" in printed
    assert "W2 g32: best is" in printed
    rows = json.loads((out / "compare.json").read_text())
    assert [r["variant"] for r in rows] == ["rtn", "blockft"]
    assert all(r["metric"] == "ppl" and r["value"] > 1 for r in rows)
    assert rows[1]["curves"] and len(rows[1]["curves"][0][1]) >= 1  # one loss curve per window
    assert (out / "compare.png").stat().st_size > 1000
    report = (out / "compare.md").read_text()
    assert "| blockft | 2 | 32 | ppl |" in report
    assert f"Calibration: 8 windows of 32 tokens from {calib_file}, drawn with seed 0." in report  # the data every row shares
    assert "fine-tuning starts from GPTQ with steps=4" in report


def test_compare_measures_an_encoders_output_objective(calib_file, eval_file, tmp_path, capsys, monkeypatch):
    """An encoder's ``logits`` variant trains against its pooled embedding, and is scored by cosine like the rest;
    ``next:1`` is skipped on this post-norm model, where it is single-block FT. Calibrated on whole
    paragraphs, as a sentence encoder is called."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    bert = save_tiny("bert", tmp_path / "bert")
    out = tmp_path / "cmp"
    calib = tmp_path / "paragraphs.txt"
    calib.write_text("\n\n".join(make_text(n, seed=n).replace("\n", " ") for n in range(4, 30)))
    argv = ["compare", str(bert), "--wbits", "4", "--group-size", "32", "--calib", str(calib), "--eval", str(eval_file)]
    argv += ["--nsamples", "4", "--seqlen", "32", "--calib-paragraphs", "--variants", "rtn,next:1,logits", "--output", str(out), "--quiet"]
    assert main(argv) == 0
    assert "skipped next:1: on a post-norm model" in capsys.readouterr().out  # it would repeat single-block FT
    rows = json.loads((out / "compare.json").read_text())
    assert [(r["variant"], r["metric"]) for r in rows] == [("rtn", "cosine"), ("logits", "cosine")]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--variants", "rtn,bogus"], "unknown variant(s) bogus"),
        (["--wbits", "5"], "bits must be one of"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--calib-generate", "512"], "--calib-generate N keeps N real tokens per --seqlen 512 window"),
        (["--calib-continuations", "4"], "it needs --calib-generate N"),
        (["--seqlen", "16", "--nsamples", "0"], "--nsamples must be >= 1"),
        (["--seqlen", "16", "--batch-size", "0"], "--batch-size must be >= 1"),
        ([], "--seqlen 512 exceeds the model's 128 positions"),
        (["--seqlen", "16", "--variants", "joint K=3"], "every variant asked for was skipped on this model"),
        (["--seqlen", "16", "--variants", "rtn,rtn"], "rtn given more than once"),
        (["--seqlen", "16", "--wbits", "3", "3"], "W3 given more than once"),
    ],
)
def test_compare_bad_input(llama_dir, calib_file, eval_file, tmp_path, capsys, monkeypatch, argv, message):
    """Refused before the first measurement, with one line naming the option."""
    monkeypatch.setattr("blockquant.compare.measure_in_child", lambda *a: pytest.fail("measured before checking the input"))
    code = main(["compare", str(llama_dir), "--calib", str(calib_file), "--eval", str(eval_file), "--output", str(tmp_path / "c"), *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_compare_refuses_an_output_it_cannot_fill_before_measuring(llama_dir, calib_file, eval_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("blockquant.compare.measure_in_child", lambda *a: pytest.fail("measured before checking the output"))
    argv = ["compare", str(llama_dir), "--calib", str(calib_file), "--eval", str(eval_file), "--seqlen", "16", "--output"]
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert main([*argv, str(a_file)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    (tmp_path / "out" / "compare.png").mkdir(parents=True)
    assert main([*argv, str(tmp_path / "out")]) == 2
    assert "holds compare.png, which is not a file" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["compare.png"]
    (tmp_path / "out" / "compare.png").rmdir()
    (tmp_path / "out" / "compare.md").write_text("an earlier run")
    assert main([*argv, str(tmp_path / "out")]) == 2
    assert "already holds compare.md of an earlier comparison; add --overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "compare.md").read_text() == "an earlier run"


def test_an_interrupted_compare_keeps_its_finished_rows_and_resumes(llama_dir, calib_file, eval_file, tmp_path, capsys, monkeypatch):
    measured = []

    def fake(job, steps):  # ppl 10 for FP, 11 for the rest; Ctrl-C while measuring blockft the first time
        name = "fp" if steps is None else ",".join(m for m, _ in steps)
        if name.endswith("blockft") and "interrupt" in measured:
            raise KeyboardInterrupt
        measured.append(name)
        return {"metric": "ppl", "value": 10.0 if steps is None else 11.0, "seconds": 1.0, "peak_rss_mb": 1.0, "curves": []}

    monkeypatch.setattr("blockquant.compare.measure_in_child", fake)
    out = tmp_path / "c"
    argv = ["compare", str(llama_dir), "--calib", str(calib_file), "--eval", str(eval_file), "--seqlen", "16"]
    argv += ["--variants", "rtn,gptq,blockft", "--output", str(out), "--quiet"]
    measured.append("interrupt")
    assert main(argv) == 130
    assert "the 2 finished rows are in" in capsys.readouterr().err
    assert [r["variant"] for r in json.loads((out / "compare.json").read_text())] == ["rtn", "gptq"]
    assert main(argv) == 2  # the saved rows are not replaced by accident
    assert "add --overwrite" in capsys.readouterr().err
    assert main([*argv, "--resume", "--seed", "1"]) == 2  # other data: refused
    assert "other data or settings" in capsys.readouterr().err
    measured.clear()
    assert main([*argv, "--resume"]) == 0
    assert measured == ["gptq,blockft"]  # only what was missing (FP and the finished rows came from the file)
    assert [r["variant"] for r in json.loads((out / "compare.json").read_text())] == ["rtn", "gptq", "blockft"]


def test_a_worker_that_dies_is_reported_not_waited_for():
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=os._exit, args=(3,))  # as a process killed for memory: no result, no message
    proc.start()
    with pytest.raises(ValueError, match="the worker measuring gptq,blockft died with exit code 3"):
        child_result(proc, queue, "gptq,blockft")


def test_measure_calibrates_on_generated_windows_when_asked(llama_dir, calib_file, eval_file, monkeypatch):
    """``compare --calib-generate N``: every variant's calibration is the file's windows continued by the FP model."""
    import blockquant.files
    from blockquant.compare import CompareJob, measure

    seen = []
    real = blockquant.files.generate_calibration

    def spy(model, samples, prompt_tokens, seed, device, continuations):
        seen.append((samples.clone(), prompt_tokens, seed, continuations))
        return real(model, samples, prompt_tokens, seed, device, continuations=continuations)

    monkeypatch.setattr(blockquant.files, "generate_calibration", spy)
    job = CompareJob(
        str(llama_dir), str(calib_file), str(eval_file), 4, 32, nsamples=4, seqlen=16, max_windows=2, seed=5, generate=3, continuations=2
    )
    assert measure(job, [("rtn", {})])["value"] > 1
    assert len(seen) == 1 and seen[0][0].shape == (4, 16) and seen[0][1:] == (3, 5, 2)


def test_finetuning_can_start_from_awq_then_gptq(llama_dir, calib_file, eval_file, tmp_path, capsys, monkeypatch):
    from blockquant.compare import CompareJob, describe, variant_steps

    job = CompareJob("m", "c.txt", "e.txt", 4, 32, init="awq,gptq", ft_options={"steps": 2})
    assert variant_steps("joint K=2", job) == [("awq", {}), ("gptq", {}), ("blockft", {"steps": 2, "window": 2, "stride": 2})]
    assert variant_steps("awq+gptq", job) == [("awq", {}), ("gptq", {})]
    assert "starts from AWQ,GPTQ with steps=2" in describe(job)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "cmp"
    argv = ["compare", str(llama_dir), "--wbits", "4", "--group-size", "32", "--calib", str(calib_file), "--eval", str(eval_file)]
    argv += ["--nsamples", "4", "--seqlen", "32", "--variants", "awq+gptq,blockft", "--init", "awq,gptq", "--steps", "2"]
    assert main(argv + ["--output", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "awq+gptq vs single-block FT" not in printed  # a start, not a fine-tuning variant to judge
    assert [r["variant"] for r in json.loads((out / "compare.json").read_text())] == ["awq+gptq", "blockft"]


def test_describe_names_generated_calibration_and_a_partial_evaluation():
    from blockquant.compare import CompareJob, describe

    job = CompareJob("m", "c.txt", "e.txt", 2, 64, max_windows=10, seed=3, generate=16, init="rtn")
    text = describe(job)
    assert "128 windows of 512 tokens from c.txt, drawn with seed 3; each keeps its first 16 tokens" in text
    assert "Evaluation: the first 10 windows (or paragraphs) of e.txt." in text
    assert "starts from RTN with defaults" in text
    many = describe(CompareJob("m", "c.txt", "e.txt", 2, 64, generate=16, continuations=8))
    assert "(temperature 1), 8 times per window (1024 windows in all)." in many


def test_finetune_flags_need_blockft(llama_dir, calib_file, tmp_path, capsys):
    code = main(
        [
            "quantize",
            str(llama_dir),
            "--recipe",
            "gptq",
            "--window",
            "2",
            "--calib",
            str(calib_file),
            "--seqlen",
            "32",
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "the recipe's last step gptq takes no such option; blockft takes it (e.g. --recipe gptq,blockft)" in capsys.readouterr().err


def test_finetune_flags_reach_the_method(llama_dir, calib_file, tmp_path):
    out = tmp_path / "o"
    code = main(
        [
            "quantize",
            str(llama_dir),
            "--recipe",
            "rtn,blockft",
            "--wbits",
            "3",
            "--group-size",
            "32",
            "--window",
            "2",
            "--objective",
            "next:1",
            "--steps",
            "3",
            "--train-float",
            "--calib",
            str(calib_file),
            "--nsamples",
            "8",
            "--seqlen",
            "32",
            "--batch-size",
            "2",
            "--output",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    record = json.loads((out / "blockquant.json").read_text())
    ft = record["recipe"]["steps"][-1]
    assert (ft["method"], ft["window"], ft["objective"], ft["train"]["steps"], ft["train_float"]) == ("blockft", 2, "next:1", 3, True)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--window", "3"], "window 3 is larger"),
        (["--objective", "next:9"], "points past the last block"),
        (["--lr-scale", "-1"], "learning rates must be > 0"),
    ],
)
def test_finetune_bad_flags(llama_dir, calib_file, tmp_path, capsys, argv, message):
    code = main(
        [
            "quantize",
            str(llama_dir),
            "--recipe",
            "blockft",
            "--calib",
            str(calib_file),
            "--nsamples",
            "8",
            "--seqlen",
            "32",
            "--output",
            str(tmp_path / "o"),
            "--quiet",
            *argv,
        ]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_verdict_states_each_variants_difference_to_single_block_ft_in_the_right_direction():
    from blockquant.compare import CompareRow, verdict

    def row(variant: str, value: float, metric: str = "ppl") -> CompareRow:
        return CompareRow(variant, 2, 64, metric, value, 9.0 if metric == "ppl" else 1.0, 10.0, 100.0, [])

    lines = verdict([row("gptq", 11.0), row("blockft", 10.0), row("joint K=2", 9.9), row("next:1", 10.2), row("logits", 10.0)])
    assert lines[0].startswith("W2 g64: best is joint K=2 (ppl 9.9000")
    assert "joint K=2 vs single-block FT: helped (ppl 0.1000 better" in lines[1]
    assert "next:1 vs single-block FT: did not help (ppl 0.2000 worse" in lines[2]
    assert "logits vs single-block FT: did not help (the same ppl" in lines[3]
    cosine = verdict([row("blockft", 0.95, "cosine"), row("joint K=2", 0.96, "cosine")])
    assert "helped (cosine 0.0100 better" in cosine[1]
