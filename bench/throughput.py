"""Steps/s of the implementations on one device and batch setting, side by side in one run; prints the ratios.

Each implementation runs as the harness runs it (its own subprocess, from a run spec), for warm-up + repeats x
window steps. Every implementation logs a training record every `window` steps with `train_seconds` (training time
so far, evaluation and checkpoints excluded), so each window gives one steps/s sample; the median over the windows
after warm-up is reported. TorchSSL runs as shipped (its config's num_workers 1: one labelled and four unlabelled
loader processes) and with its loader processes as many as the cores (num_workers = cores // 5, at least 1), each
once: its PIL augmentation may make it CPU-bound where cores are many. USB (`--impls own torchssl usb`) runs its
own recipe with its config's loader settings, ours then with the paper's. Last line: `speedup own/torchssl: X.XX`,
against TorchSSL as shipped; `speedup own/usb` before it.

    python bench/throughput.py --device cpu --batch-size 16 --uratio 7
    python bench/throughput.py --device cuda --batch-size 64 --uratio 7 --precision bf16 --json out.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import common
from contract.results import read_metrics, read_result
from contract.spec import PRECISIONS, RunSpec
from harness.env import machine_info
from harness.plan import PlannedRun
from harness.launch import child_env, command, prepare

# Dense peak of the device in TFLOP/s, where known (bf16 and TF32 tensor cores; fp32 without TF32 is far lower).
PEAK_TFLOPS = {"H200": {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0},
               "H100": {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0},
               "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}}
TORCHSSL_SHIPPED_WORKERS = 1  # TorchSSL's config: num_workers 1 (its unlabelled loader gets 4 times as many)
TORCHSSL_LOADERS_PER_WORKER = 5  # loader processes per unit of num_workers while training: 1 labelled + 4 unlabelled


def torchssl_worker_counts(asked: list[int] | None, cores: int) -> list[int]:
    """TorchSSL's num_workers to measure, each once, in order: as asked, else as shipped and as many loader
    processes as cores."""
    counts = asked or [TORCHSSL_SHIPPED_WORKERS, max(1, cores // TORCHSSL_LOADERS_PER_WORKER)]
    return list(dict.fromkeys(counts))


def step_flops(batch_size: int, uratio: int, depth: int = 28, widen_factor: int = 2) -> float:
    """FLOPs of one training step of our WRN (forward + backward over B(1 + 2mu) images), by torch's counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from own_impl.model import WideResNet

    model = WideResNet(10, depth, widen_factor)
    n = batch_size * (1 + 2 * uratio)
    x = torch.randn(min(n, 8), 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / x.shape[0] * n


def measured_peak_tflops(device: str, precision: str) -> float:
    """A large square matmul's TFLOP/s on this device: the practical ceiling that the step is compared with."""
    import torch

    from contract.precision import apply_precision

    apply_precision(precision)  # fp32: full fp32; tf32: TF32, as the runs
    if precision == "bf16":  # autocast leaves some work in fp32: the ceiling is the faster of the two
        return max(matmul_tflops(device, torch.float32), matmul_tflops(device, torch.bfloat16))
    return matmul_tflops(device, torch.float32)


def matmul_tflops(device: str, dtype, n: int | None = None) -> float:
    """TFLOP/s of an n x n matmul in `dtype` on `device` (n: 4096 on a GPU, 1024 on the CPU by default)."""
    import torch

    n = n or (4096 if device.startswith("cuda") else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 50 if device.startswith("cuda") else 5
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def run_impl(impl: str, args, ctx, data, split_file: Path, split_sha: str, workdir: Path,
             torchssl_workers: int | None = None) -> dict:
    """One implementation's run for warm-up + repeats x window steps, as the harness runs it; its steps/s samples."""
    steps = args.warmup + args.repeats * args.window
    recipe = impl if impl in ("torchssl", "usb") else args.own_recipe
    spec = RunSpec(impl=impl, recipe=recipe, n_labels=args.n_labels,
                   seed=0, data_kind=data.identity.kind,
                   data_sha256=data.identity.data_sha256, split_sha256=split_sha, steps=steps, eval_every=steps,
                   batch_size=args.batch_size, uratio=args.uratio, precision=args.precision, depth=args.depth,
                   widen_factor=args.widen_factor,
                   channels_last=args.channels_last and impl == "own", eval_subset=100, eval_batch_size=100,
                   checkpoint_every=steps, log_every=args.window)
    label = impl if torchssl_workers is None else f"{impl}-w{torchssl_workers}"
    run = PlannedRun(spec, workdir / label, split_file)
    prepare(run, dataclasses.replace(ctx, num_workers=torchssl_workers), args.device)
    t0 = time.perf_counter()
    proc = subprocess.run(command(run), cwd=run.run_dir, capture_output=True, text=True, env=child_env())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{impl} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = [r for r in read_metrics(run.run_dir) if r.get("kind") == "train"]
    marks = [(0, 0.0)] + [(r["step"], r["train_seconds"]) for r in records]
    samples = [(s1 - s0) / (t1 - t0) for (s0, t0), (s1, t1) in zip(marks, marks[1:]) if s0 >= args.warmup]
    data_frac = [r["data_frac"] for r in records if r["step"] > args.warmup and r.get("data_frac") is not None]
    return {"impl": impl, "label": label, "steps_per_second": statistics.median(samples), "samples": samples,
            "data_frac": statistics.median(data_frac) if data_frac else None, "process_wall_seconds": wall,
            "spec_hash": spec.hash(), "num_workers": torchssl_workers,
            "compile_seconds": (read_result(run.run_dir) or {}).get("compile_seconds"),  # ours: before step 1
            "loader_processes": None if torchssl_workers is None else TORCHSSL_LOADERS_PER_WORKER * torchssl_workers}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--uratio", type=int, default=7)
    p.add_argument("--depth", type=int, default=28, help="WideResNet depth of both (28: the paper's)")
    p.add_argument("--widen-factor", type=int, default=2, help="WideResNet width of both (2: the paper's)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="our model and batches in channels_last (TorchSSL has no such setting: it runs as it is)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile our augmentation and step, binding (default: own_impl.compile's policy for a "
                        "paper-length run, with its fallback to eager)")
    p.add_argument("--torchssl-workers", type=int, nargs="+", default=None,
                   help="TorchSSL's num_workers, one run each (default: its config's 1, and cores // 5 so that its "
                        "loader processes number the cores)")
    p.add_argument("--impls", nargs="+", choices=["own", "torchssl", "usb"], default=["own", "torchssl"])
    p.add_argument("--own-recipe", choices=["paper", "torchssl"], default="paper",
                   help="the recipe ours runs (TorchSSL runs its own): paper (2 RandAugment ops) or torchssl (3)")
    p.add_argument("--warmup", type=int, default=4, help="steps before timing starts")
    p.add_argument("--window", type=int, default=4, help="steps per timed sample")
    p.add_argument("--repeats", type=int, default=5, help="timed samples; the median is reported")
    p.add_argument("--n-labels", type=int, default=4000)
    p.add_argument("--data", default=os.environ.get("FIXMATCH_BENCH_DATA"), help="CIFAR-10 source (see README)")
    p.add_argument("--torchssl-source", default=os.environ.get("TORCHSSL_SOURCE"))
    p.add_argument("--usb-source", default=os.environ.get("USB_SOURCE"))
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args()

    import torch

    from contract.runtime import resolve_device
    from harness.data import load_cifar10
    from harness.splits import ensure_split

    resolve_device(args.device)  # a bad device is one line here, before any work
    data = load_cifar10(args.data)
    # Unasked, ours compiles as a paper-length run would (policy: own_impl/compile.py), with its fallback to
    # eager per part; only an explicit --compile / --no-compile binds.
    ctx = common.run_context(data, args.impls, args.torchssl_source, args.compile, usb_source=args.usb_source)
    workers = torchssl_worker_counts(args.torchssl_workers, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        split_file, split_sha = ensure_split(Path(tmp), "cifar10", data.train_y, args.n_labels, 0,
                                             data.identity.data_sha256)
        runs = [run_impl(impl, args, ctx, data, split_file, split_sha, Path(tmp), n)
                for impl in args.impls for n in (workers if impl == "torchssl" else [None])]
    results = {r["label"]: r for r in runs}
    flops = step_flops(args.batch_size, args.uratio, args.depth, args.widen_factor)
    peak = measured_peak_tflops(args.device, args.precision)
    name = machine_info(args.device)
    listed = next((v[args.precision] for k, v in PEAK_TFLOPS.items() if k in name), None)
    report = {"device": args.device, "machine": name, "torch": torch.__version__, "python": platform.python_version(),
              "cores": os.cpu_count(), "depth": args.depth, "widen_factor": args.widen_factor,
              "batch_size": args.batch_size, "uratio": args.uratio,
              "precision": args.precision, "own_channels_last": args.channels_last, "own_compile": args.compile,
              "gflop_per_step": flops / 1e9, "matmul_peak_tflops": peak, "listed_peak_tflops": listed,
              "impls": results}
    print(f"device {args.device} ({name}), torch {torch.__version__}, WRN-{args.depth}-{args.widen_factor}, "
          f"B={args.batch_size}, mu={args.uratio}, "
          f"{args.precision}{', channels_last (own)' if args.channels_last else ''}, "
          f"own compile={args.compile}")
    print(f"one step = {flops / 1e9:.1f} GFLOP (forward + backward, {args.batch_size * (1 + 2 * args.uratio)} "
          f"images); measured matmul peak {peak:.2f} TFLOP/s" + (f", listed peak {listed:.0f}" if listed else ""))
    print(f"{'impl':12s} {'steps/s':>9s} {'samples':>30s} {'data wait':>10s} {'TFLOP/s':>8s} {'of matmul peak':>15s}"
          f"  loader processes")
    for label, r in results.items():
        tflops = r["steps_per_second"] * flops / 1e12
        r["achieved_tflops"] = tflops
        frac = f"{100 * r['data_frac']:.0f}%" if r["data_frac"] is not None else "n/a"
        samples = ",".join(f"{s:.2f}" for s in r["samples"])
        loaders = "" if r["num_workers"] is None else \
            f"  {r['loader_processes']} (num_workers {r['num_workers']}" + \
            (", as shipped)" if r["num_workers"] == TORCHSSL_SHIPPED_WORKERS else ")")
        if r["compile_seconds"]:
            loaders += f"  compiled in {r['compile_seconds']:.1f} s"
        print(f"{label:12s} {r['steps_per_second']:9.3f} {samples:>30s} {frac:>10s} {tflops:8.3f} "
              f"{100 * tflops / peak:14.1f}%{loaders}")
    references = [r for r in runs if r["impl"] == "usb"] + [r for r in runs if r["impl"] == "torchssl"]
    if "own" in results and references:
        report["speedups_own_over"] = {r["label"]: results["own"]["steps_per_second"] / r["steps_per_second"]
                                       for r in references}
    torchssl = [r for r in runs if r["impl"] == "torchssl"]
    if "own" in results and torchssl:
        report["speedup_own_over_torchssl"] = report["speedups_own_over"][torchssl[0]["label"]]
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    shipped = torchssl[0]["label"] if torchssl else None
    for label, ratio in report.get("speedups_own_over", {}).items():
        if label != shipped:
            print(f"speedup own/{label}: {ratio:.2f}")
    if shipped:
        print(f"speedup own/torchssl: {report['speedup_own_over_torchssl']:.2f}")
    return 0


if __name__ == "__main__":
    common.run_main("throughput.py", main)
