"""The Triton W4A16 kernel at batch 1 on CUDA: achieved bandwidth and speed-up over bf16.

    python bench/w4a16.py        (bench/export.py runs it too and puts the table in its results)

For a 4096×11008 and an 8192×28672 layer (in × out; Llama-2-7B's and Llama-2-70B's MLP up
projection), W4 g128 sym with bf16 scales and activations: time ``QuantLinear.forward`` on one
token (the Triton kernel) and ``F.linear`` with the bf16 weight; *bandwidth* = bytes the kernel
must read (int32 words + scales + the activation) and write, per second, as a fraction of a
measured device-to-device copy (bytes read + written per second of a 1 GiB ``copy_``). Weight
copies are rotated so that the working set exceeds the L2 cache (no L2-resident re-reads).
Without a CUDA device it prints ``skipped: no CUDA device``.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import markdown_table  # noqa: E402

LAYERS = {"4096×11008": (4096, 11008), "8192×28672": (8192, 28672)}  # (in, out)
GROUP = 128
TARGET = 0.70  # of the copy bandwidth: what a bandwidth-bound batch-1 kernel should reach
WORKING_SET = 512 * 2**20  # bytes of rotated weight copies: well above any L2


def _cuda_seconds(calls: list[Callable[[], object]], reps: int = 200) -> float:
    """Median over 5 runs of the mean time per call, cycling through ``calls``."""
    import torch

    for c in calls[: min(len(calls), 20)]:
        c()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(reps):
            calls[i % len(calls)]()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000 / reps)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    import torch

    src = torch.empty(2**30 // 4, dtype=torch.int32, device="cuda")
    dst = torch.empty_like(src)
    seconds = _cuda_seconds([lambda: dst.copy_(src)], reps=20)
    return 2 * src.numel() * 4 / seconds


def layer_speed(cols: int, out: int, copy_bw: float) -> dict:
    """Kernel vs bf16 ``F.linear`` at one token for one layer shape."""
    import torch
    import torch.nn.functional as F

    from blockquant.export.qlinear import QuantLinear

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    groups = math.ceil(cols / GROUP)
    packed_bytes = out * cols // 2 + out * groups * 2
    layers = []
    for _ in range(max(2, math.ceil(WORKING_SET / packed_bytes))):
        qweight = torch.randint(-(2**31), 2**31 - 1, (out, cols // 8), dtype=torch.int32, device=dev, generator=gen)
        scales = (torch.rand(out, groups, device=dev, generator=gen) * 0.01 + 1e-3).to(torch.bfloat16)
        zeros = torch.full((out, groups), 8, dtype=torch.uint8, device=dev)
        layers.append(QuantLinear(cols, out, 4, GROUP, True, qweight, scales, zeros))
    x = torch.randn(1, cols, dtype=torch.bfloat16, device=dev, generator=gen)
    if not layers[0].uses_kernel(x):
        raise RuntimeError("QuantLinear does not take the Triton path for this call (is triton installed?)")
    ref = F.linear(x.float(), layers[0].dequantize(torch.bfloat16).float())
    torch.testing.assert_close(layers[0](x).float(), ref, rtol=2**-7, atol=2**-7 * float(ref.abs().max()))
    dense = [layers[i].dequantize(torch.bfloat16) for i in range(max(2, math.ceil(WORKING_SET / (out * cols * 2))))]
    del ref
    with torch.no_grad():
        t_kernel = _cuda_seconds([lambda m=m: m(x) for m in layers])
        t_dense = _cuda_seconds([lambda w=w: F.linear(x, w) for w in dense])
    moved = packed_bytes + cols * 2 + out * 2  # words + scales read, activation read, output written
    return {
        "kernel_us": t_kernel * 1e6,
        "bf16_us": t_dense * 1e6,
        "bandwidth_gbs": moved / t_kernel / 1e9,
        "fraction": moved / t_kernel / copy_bw,
        "speedup": t_dense / t_kernel,
    }


def measure() -> dict:
    """Every layer's numbers, or why they were skipped."""
    import torch

    from blockquant.export.qlinear import triton_available

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    if not triton_available():
        return {"skipped": "triton is not installed (pip install -c constraints.txt -e '.[gpu]')"}
    copy_bw = copy_bandwidth()
    return {
        "device": torch.cuda.get_device_name(),
        "copy_gbs": copy_bw / 1e9,
        "layers": {name: layer_speed(cols, out, copy_bw) for name, (cols, out) in LAYERS.items()},
    }


def report(result: dict) -> str:
    """Markdown for the results file (a skip is one plain line)."""
    if "skipped" in result:
        return (
            f"Triton W4A16 kernel on GPU: skipped: {result['skipped']}. The kernel was verified only in the Triton interpreter "
            "on CPU (tests/test_triton_w4a16.py: against dequantize + matmul); its GPU speed (bandwidth vs the "
            f"≥ {TARGET:.0%} aim, speed-up over the bf16 matmul) is measured only where a CUDA device is present."
        )
    rows = [
        [
            name,
            f"{r['kernel_us']:.1f}",
            f"{r['bandwidth_gbs']:.0f}",
            f"{r['fraction']:.0%} ({'at least' if r['fraction'] >= TARGET else 'below'} {TARGET:.0%})",
            f"{r['bf16_us']:.1f}",
            f"{r['speedup']:.2f}×",
        ]
        for name, r in result["layers"].items()
    ]
    return "\n\n".join(
        [
            f"Triton W4A16 kernel on {result['device']}, batch 1, W4 g{GROUP} sym, bf16 scales and activations; "
            f"device-to-device copy: {result['copy_gbs']:.0f} GB/s (read + write).",
            markdown_table(["layer (in×out)", "kernel (µs)", "GB/s", "of copy bandwidth", "bf16 F.linear (µs)", "speed-up"], rows),
        ]
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--json":
        print(json.dumps(measure()))
    else:
        print(report(measure()))
