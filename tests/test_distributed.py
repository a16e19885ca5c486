"""Several processes (torch.distributed, gloo on CPU): 2 processes give the one-process result up to
floating-point reduction order; a run with more processes than samples is refused; a process that
stops makes the others stop with a clear error instead of waiting for it.

Each test starts its processes with ``torch.multiprocessing.spawn`` on a free localhost port; the
processes write what they found into files that the test reads.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import os
import socket
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
import torch.distributed as td
import torch.multiprocessing as mp
from conftest import build_tiny, make_text

from blockquant import QuantSpec, dist, make_step, parse_recipe, quantize
from blockquant.primitives import expand, group_width
from blockquant.spec import act_spec

CALIB = torch.randint(0, 256, (13, 32), generator=torch.Generator().manual_seed(3))  # batches of 4: 4, 4, 4, 1
SPEC = QuantSpec(bits=3, group_size=32)
# a short schedule with a held-out batch (the last: 1 sample, held by one process only), so that
# the held-out loss, best state and early stop are all taken from reduced losses
SHORT = {"steps": 24, "eval_every": 4, "holdout": 0.25, "patience": 2, "settle": 0.0}
# QFT without its equalization factors: at the start their gradient is what is left of two contributions that cancel
# (the fold is exact), rounding noise whose sign changes with the order of any sum, so Adam's first steps on them
# differ between two runs of one process with other thread counts as much as between 1 and 2 processes
OPTIONS = {"blockft": SHORT, "qft": {**SHORT, "equalize": False}, "smoothquant": {"alpha": "auto"}}
# the other statistics: AWQ's sample and searches, SmoothQuant's sweep and static percentile ranges, QFT's training
OTHER_CHAINS = ("awq,gptq", "smoothquant", "gptq,qft")
EXACT = "gptq, float64 Hessians"  # hessian_dtype float64: the same codes whatever the split
EXACT_FT = "gptq, float64 Hessians, reproducible blockft"  # and blockft one sample at a time, fp64 sums


def _recipe(chain: str):
    if chain == EXACT:
        return dataclasses.replace(parse_recipe("gptq", SPEC), steps=[make_step("gptq", {"hessian_dtype": "float64"})])
    if chain == EXACT_FT:
        gptq, blockft = make_step("gptq", {"hessian_dtype": "float64"}), make_step("blockft", {"train": {**SHORT, "reproducible": True}})
        return dataclasses.replace(parse_recipe("gptq", SPEC), steps=[gptq, blockft])
    act = act_spec(8, "tensor", range="percentile") if chain == "smoothquant" else None
    recipe = parse_recipe(chain, QuantSpec(bits=8, group_size=-1) if chain == "smoothquant" else SPEC, act)
    steps = [make_step(s.method, {**dataclasses.asdict(s.options), **OPTIONS.get(s.method, {})}) for s in recipe.steps]
    return dataclasses.replace(recipe, steps=steps)


def _run(chain: str) -> dict:
    """Quantize the tiny Llama with ``chain``: its weights, grids and training logs."""
    model = build_tiny("llama")
    torch.manual_seed(0)
    result = quantize(model, _recipe(chain), CALIB, batch_size=4, progress=False)
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grids": {n: (r.scale, r.zero) for n, r in result.layers.items()},
        "evals": [log.evals for _, log in result.train_logs],
        "errors": [b.output_error for b in result.blocks],
    }


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _join(rank: int, world: int, port: int, timeout_s: float) -> None:
    td.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
    )


def _command_line(rank: int, world: int, port: int, argv: list[str]) -> dict:
    """``blockquant`` as torchrun starts it: the rendezvous in the environment (env://)."""
    from blockquant import cli

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr):
            code = cli.main(argv)
    finally:
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
            del os.environ[key]
    return {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(), "joined_after": dist.world_size()}


def _stop_on_rank_1(rank: int) -> dict:
    """Rank 1 stops with its own error while quantizing its first layer; rank 0 goes on."""
    if rank == 1:
        from blockquant.methods import gptq

        def fail(*_a, **_k):
            raise ValueError("this process stops here")

        gptq.gptq_quantize_group = fail
    start = time.perf_counter()
    try:
        _run("gptq")
    except ValueError as e:
        return {"error": str(e), "seconds": time.perf_counter() - start}
    return {}


def _worker(rank: int, world: int, ports: list[int], out: str, cli_argv: list[list[str]]) -> None:
    """Every job of this module, one after another, in one pair of processes (they take seconds to start)."""
    torch.set_num_threads(1)
    found: dict = {}
    _join(rank, world, ports[0], 60.0)
    found["chains"] = {chain: _run(chain) for chain in ("gptq", "gptq,blockft", *OTHER_CHAINS, EXACT, EXACT_FT)}
    try:
        quantize(build_tiny("llama"), _recipe("gptq"), CALIB[:1], progress=False)
    except ValueError as e:
        found["refused"] = str(e)
    td.destroy_process_group()
    found["cli"] = [_command_line(rank, world, port, argv) for port, argv in zip(ports[1:3], cli_argv)]
    _join(rank, world, ports[3], 20.0)  # short: a peer that is waited for past it fails the test
    try:
        found["stop"] = _stop_on_rank_1(rank)
    finally:
        torch.save(found, Path(out) / f"rank{rank}.pt")
        if td.is_initialized():
            td.destroy_process_group()


def _codes(state: dict, grids: dict) -> dict[str, torch.Tensor]:
    """The integer code of every quantized weight, from the weight and its grid."""
    out = {}
    for name, (scale, zero) in grids.items():
        w = state[f"{name}.weight"].float()
        width = group_width(SPEC, w.shape[1])
        out[name] = torch.round(w / expand(scale.float(), w.shape[1], width)) + expand(zero.float(), w.shape[1], width)
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, llama_dir) -> list[dict]:
    """What each of 2 processes found (rank order)."""
    tmp = tmp_path_factory.mktemp("two")
    calib = tmp / "calib.txt"
    calib.write_text(make_text(600, seed=1))
    common = ["quantize", str(llama_dir), "--calib", str(calib), "--seqlen", "16", "--quiet"]
    cli_argv = [
        [*common, "--recipe", "gptq", "--wbits", "3", "--nsamples", "6", "--batch-size", "4", "--output", str(tmp / "w3")],
        [*common, "--nsamples", "1", "--output", str(tmp / "refused")],
    ]
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_worker, args=(2, _free_ports(4), str(tmp), cli_argv), nprocs=2, join=True)
    found = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for f in found:
        f["dir"] = tmp
    return found


@pytest.mark.parametrize("chain", ["gptq", "gptq,blockft"])
def test_two_processes_give_the_one_process_result(two_processes, chain):
    one = _run(chain)
    ranks = [found["chains"][chain] for found in two_processes]
    for k, v in ranks[0]["state"].items():  # every process ends with the same model
        assert torch.equal(v, ranks[1]["state"][k]), k
    two = ranks[0]
    for k, v in one["state"].items():
        assert torch.allclose(v, two["state"][k], rtol=1e-4, atol=1e-5), k
    a, b = _codes(one["state"], one["grids"]), _codes(two["state"], two["grids"])
    same = sum(int((a[n] == b[n]).sum()) for n in a) / sum(a[n].numel() for n in a)
    assert same >= 0.999, f"{same:.5f} of the codes equal"
    assert two["errors"] == pytest.approx(one["errors"], rel=1e-3)
    if chain == "gptq,blockft":  # the same held-out curve, so the same best state and stop
        assert [[s for s, _ in e] for e in two["evals"]] == [[s for s, _ in e] for e in one["evals"]]
        assert [v for e in two["evals"] for _, v in e] == pytest.approx([v for e in one["evals"] for _, v in e], rel=1e-3)


@pytest.mark.parametrize("chain", [EXACT, EXACT_FT])
def test_float64_sums_give_the_one_process_codes_exactly(two_processes, chain):
    """GPTQ turns last-bit differences of its Hessian into other codes, and training's thousands of
    steps turn those of its gradients into other weights; summed in fp64 (Hessians; gradients one
    sample at a time), neither depends on the split, and neither do the codes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the processes run
    try:
        one = _run(chain)
    finally:
        torch.set_num_threads(threads)
    two = two_processes[0]["chains"][chain]
    if chain == EXACT_FT:
        assert two["evals"] == one["evals"]
        for k, v in one["state"].items():
            assert torch.equal(v, two["state"][k]), k
    a, b = _codes(one["state"], one["grids"]), _codes(two["state"], two["grids"])
    for name in a:
        assert torch.equal(a[name], b[name]), name
        assert torch.equal(one["grids"][name][0], two["grids"][name][0]), name


@pytest.mark.parametrize("chain", OTHER_CHAINS)
def test_two_processes_give_the_one_process_weights_for_the_other_methods(two_processes, chain):
    one, two = _run(chain)["state"], [found["chains"][chain]["state"] for found in two_processes]
    for k, v in one.items():
        assert torch.equal(two[0][k], two[1][k]), k
        assert torch.allclose(v, two[0][k], rtol=1e-4, atol=1e-5), k


def test_more_processes_than_samples_is_refused(two_processes):
    for found in two_processes:
        assert "2 processes share 1 calibration samples" in found["refused"]


def test_a_process_that_stops_stops_the_others_with_a_clear_error(two_processes):
    other, stopped = (found["stop"] for found in two_processes)
    assert stopped["error"] == "this process stops here"
    assert other["error"].startswith("rank 0: another rank stopped (") and other["error"].endswith("); no output was written")
    assert "\n" not in other["error"]
    assert other["seconds"] < 15  # noticed when the peer left, not at the timeout


def test_the_command_line_under_torchrun_writes_once_from_rank_0(two_processes):
    runs = [found["cli"][0] for found in two_processes]
    out = two_processes[0]["dir"] / "w3"
    assert [r["code"] for r in runs] == [0, 0]
    assert f"-> {out}" in runs[0]["stdout"] and runs[1]["stdout"] == ""
    assert [r["joined_after"] for r in runs] == [1, 1]  # each left the process group it joined
    record = json.loads((out / "blockquant.json").read_text())
    assert record["processes"] == 2 and len(record["layers"]) == 14


def test_the_command_line_under_torchrun_reports_an_error_once_per_rank(two_processes):
    runs = [found["cli"][1] for found in two_processes]
    assert [r["code"] for r in runs] == [2, 2]
    for rank, run in enumerate(runs):
        lines = run["stderr"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"blockquant: error: rank {rank}: 2 processes share 1 calibration samples"), lines
    assert not (two_processes[0]["dir"] / "refused").exists()
