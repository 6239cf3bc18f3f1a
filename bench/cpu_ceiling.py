"""How fast can any implementation of this FixMatch step be on this CPU? The convolutions' share, measured.

    python bench/cpu_ceiling.py [--batch 16] [--uratio 7] [--repeats 3]

Prints, measured now on this machine:
- the matmul rate (GFLOP/s) in fp32, bf16 and fp16 (2048 x 2048, median of `repeats`): whether a lower precision can
  pay here at all (without AMX, oneDNN's bf16 runs at about half the fp32 rate);
- for the step's forward and backward pass of WRN-28-2 over B(1 + 2mu) images, in fp32 channels_last (the fastest
  layout for oneDNN) and in bf16 autocast: the time spent inside convolutions (torch profiler, self time of
  the forward and backward convolution ops, median of `repeats` passes);
- the ceiling that follows: 1 / (convolution seconds per step), in steps/s. Every FixMatch implementation of the same
  step must run these convolutions (BatchNorm couples all B(1 + 2mu) images, so the weak branch needs its backward
  pass too), so no implementation exceeds it; compare it with TorchSSL's steps/s from bench/throughput.py.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from own_impl.model import WideResNet  # noqa: E402

CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_slow_conv2d_forward",
            "aten::_slow_conv2d_backward")


def matmul_gflops(dtype: torch.dtype, repeats: int, n: int = 2048) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def conv_seconds(images: int, bf16: bool, repeats: int) -> tuple[float, float]:
    """(median convolution seconds, median wall seconds) of one forward + backward pass over `images` images."""
    model = WideResNet(num_classes=10).to(memory_format=torch.channels_last).train()
    x = torch.randn(images, 3, 32, 32).contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        out.float().logsumexp(1).mean().backward()

    step()  # oneDNN picks and caches its kernels
    conv, wall = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        wall.append(time.perf_counter() - t)
        conv.append(sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in CONV_OPS) / 1e6)
    return statistics.median(conv), statistics.median(wall)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--batch", type=int, default=16, help="B, labelled images per step")
    p.add_argument("--uratio", type=int, default=7, help="mu")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    images = args.batch * (1 + 2 * args.uratio)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        print(f"matmul {str(dtype).removeprefix('torch.'):9s} {matmul_gflops(dtype, args.repeats):7.0f} GFLOP/s")
    with FlopCounterMode(display=False) as counter:
        model = WideResNet(num_classes=10)
        model(torch.randn(8, 3, 32, 32)).sum().backward()
    gflop = counter.get_total_flops() / 8 * images / 1e9
    print(f"one step: {images} images forward + backward = {gflop:.1f} GFLOP")
    for name, bf16 in (("fp32 channels_last", False), ("bf16 autocast channels_last", True)):
        conv, wall = conv_seconds(images, bf16, args.repeats)
        print(f"{name:28s} convolutions {conv:.3f} s of a {wall:.3f} s pass ({gflop / conv:.0f} GFLOP/s in them): "
              f"ceiling {1 / conv:.2f} steps/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
