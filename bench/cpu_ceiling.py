"""How fast can any implementation of this FixMatch step be on this CPU? The convolutions' share, measured.

    python bench/cpu_ceiling.py [--batch-size 16] [--uratio 7] [--repeats 3]

A hardware bound, apart from the implementations: bench/throughput.py measures both implementations' steps/s and
bench/own_steps.py our step in several configurations; this script says how far from the machine's limit they are.

Prints, measured now on this machine:
- the matmul rate (GFLOP/s) in fp32, bf16 and fp16 (2048 x 2048, bench/throughput.py's matmul_tflops, median of
  `repeats`): whether a lower precision can pay here at all (without AMX, oneDNN's bf16 runs at about half the fp32
  rate);
- for the step's forward and backward pass of WRN-28-2 over B(1 + 2mu) images, eager, in fp32 channels_last (the
  fastest layout for oneDNN), fp32 NCHW (as TorchSSL runs; oneDNN's layout reorders count as convolution time) and
  bf16 autocast: the time spent inside convolutions (torch profiler, self time of the forward and backward
  convolution ops, median of `repeats` passes) and in the rest of the pass (BatchNorm, activations, adds);
- the ceiling that follows: 1 / (convolution seconds per step), in steps/s, and the largest speed-up over an
  eager fp32 NCHW pass (TorchSSL's step is at least that pass) that any implementation could reach. Every FixMatch
  implementation of the same step must run these convolutions (BatchNorm couples all B(1 + 2mu) images, so the weak
  branch needs its backward pass too), so no implementation exceeds it; compare it with TorchSSL's steps/s from
  bench/throughput.py.
"""
from __future__ import annotations

import argparse
import statistics
import time

import common
import torch
from throughput import matmul_tflops, step_flops
from torch.profiler import ProfilerActivity, profile

from own_impl.model import WideResNet

CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_slow_conv2d_forward",
            "aten::_slow_conv2d_backward")


def conv_seconds(images: int, bf16: bool, channels_last: bool, repeats: int) -> tuple[float, float]:
    """(median convolution seconds, median wall seconds) of one forward + backward pass over `images` images: the
    convolutions' share from profiled passes, the wall time from unprofiled ones (the profiler slows small ops)."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = WideResNet(num_classes=10).to(memory_format=layout).train()
    x = torch.randn(images, 3, 32, 32).contiguous(memory_format=layout)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        out.float().logsumexp(1).mean().backward()

    step()  # oneDNN picks and caches its kernels
    conv, wall = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        wall.append(time.perf_counter() - t)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        conv.append(sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in CONV_OPS) / 1e6)
    return statistics.median(conv), statistics.median(wall)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--batch-size", type=int, default=16, help="B, labelled images per step")
    p.add_argument("--uratio", type=int, default=7, help="mu")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    images = args.batch_size * (1 + 2 * args.uratio)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        gflops = statistics.median(1e3 * matmul_tflops("cpu", dtype, 2048) for _ in range(args.repeats))
        print(f"matmul {str(dtype).removeprefix('torch.'):9s} {gflops:7.0f} GFLOP/s")
    gflop = step_flops(args.batch_size, args.uratio) / 1e9
    print(f"one step: {images} images forward + backward = {gflop:.1f} GFLOP")
    measured = {}
    for name, bf16, channels_last in (("fp32 channels_last", False, True), ("fp32 NCHW", False, False),
                                      ("bf16 autocast channels_last", True, True)):
        conv, wall = measured[name] = conv_seconds(images, bf16, channels_last, args.repeats)
        print(f"{name:28s} eager pass {wall:.3f} s, of it convolutions {conv:.3f} s ({gflop / conv:.0f} GFLOP/s "
              f"in them): ceiling {1 / conv:.2f} steps/s")
    # TorchSSL's step is at least its eager NCHW pass (plus optimizer, EMA and any wait for data); no step can be
    # shorter than the fastest convolutions.
    best_conv = min(conv for conv, _ in measured.values())
    print(f"at most {measured['fp32 NCHW'][1] / best_conv:.2f}x an eager fp32 NCHW pass (as TorchSSL runs) for any "
          f"implementation of this step")
    return 0


if __name__ == "__main__":
    common.run_main("cpu_ceiling.py", main)
