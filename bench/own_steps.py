"""Steps per second of own_impl's whole training step (sampling, augmentation, forward, backward, SGD, EMA).

    python bench/own_steps.py [--device cpu] [--batch-size 16] [--uratio 7] [--warmup 3] [--repeats 5]
                              [--configs fp32 fp32-cl bf16-cl fp32-cl-compile] [--compile-mode MODE]
    python bench/own_steps.py --device cuda --batch-size 64 --configs bf16-cl bf16-cl-compile --window 20

A configuration is precision (fp32 | tf32 | bf16 autocast, as contract/precision.py) plus optional `-cl`
(channels_last) and `-compile` (torch.compile of the augmentation and of forward + loss + backward, as
own_impl.compile does it). All configurations are built first (compilation timed apart, as `compile_s`), then each
gets `warmup` untimed steps, then `repeats` rounds run `window` timed steps of every configuration in turn, so that
load from other processes on a shared machine falls on all of them alike. The device is synchronized only at the
ends of a window (a GPU runs ahead of the host as in training). Prints per configuration the median wall time per step (steps/s), the fastest window, the
process's CPU seconds per step (all threads), the host seconds per step spent issuing the data preparation and the
step (on a GPU: launch overhead, unless the queue is full), and one JSON line. Images are random uint8 (the step's
cost does not depend on pixel values), so no data set is needed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import common
import numpy as np
import torch

from contract.precision import apply_precision
from contract.runtime import resolve_device
from contract.spec import PRECISIONS, RunSpec
from harness.env import machine_info
from own_impl.compile import make_augment_fn, make_loss_fn, warm_up_augment, warm_up_loss
from own_impl import fixmatch
from own_impl.data import DeviceData, EpochSampler, Samplers
from own_impl.optim import cosine_lr
from own_impl.train import build, train_step

N_TRAIN = 50_000


def parse_config(name: str) -> dict:
    parts = name.split("-")
    if parts[0] not in PRECISIONS or not set(parts[1:]) <= {"cl", "compile"}:
        raise ValueError(f"bad configuration {name!r}: {'|'.join(PRECISIONS)}, then optional -cl and -compile")
    return {"precision": parts[0], "channels_last": "cl" in parts, "compile": "compile" in parts}


class Runner:
    """One configuration's model, optimizer, EMA, samplers and generator, stepping on shared data."""

    def __init__(self, name: str, data: DeviceData, device: torch.device, batch: int, uratio: int, steps: int,
                 compile_mode: str | None, network: dict | None = None):
        cfg = parse_config(name)
        self.name, self.data, self.device = name, data, device
        self.spec = RunSpec(impl="own", n_labels=len(data.labelled), seed=0, data_kind="synthetic",
                            data_sha256="-", split_sha256="-", batch_size=batch, uratio=uratio,
                            precision=cfg["precision"], channels_last=cfg["channels_last"], steps=steps,
                            **(network or {}))
        torch.manual_seed(0)
        apply_precision(self.spec.precision)  # before compiling: inductor may read the TF32 switches
        self.model, self.ema, self.optimizer = build(self.spec, device)
        self.loss_fn = make_loss_fn(fixmatch.forward_loss, self.model, self.spec, cfg["compile"], compile_mode)
        self.augment_fn = make_augment_fn(fixmatch, self.spec.recipe, cfg["compile"], compile_mode)
        t = time.perf_counter()
        if cfg["compile"]:
            warm_up_augment(fixmatch, self.augment_fn, self.spec, data.train_x.shape[1:], device)
            warm_up_loss(fixmatch, self.model, self.loss_fn, self.spec, data.train_x.shape[1:])
            self.sync()
        self.compile_s = time.perf_counter() - t if cfg["compile"] else 0.0
        self.samplers = Samplers(EpochSampler(data.labelled, 1), EpochSampler(np.arange(len(data.train_y)), 2),
                                 torch.Generator(device=device).manual_seed(3))
        self.k = 0
        self.step_s, self.data_host_s, self.step_host_s, self.cpu_s = [], [], [], []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def window(self, steps: int, timed: bool) -> None:
        """`steps` training steps between two synchronizations."""
        apply_precision(self.spec.precision)  # process-wide: each configuration's own, while it steps
        self.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        data_s = step_s = 0.0
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(steps):
            t1 = time.perf_counter()
            x, y_x, y_u = fixmatch.make_batch(self.data, self.samplers, self.spec, augment_fn=self.augment_fn)
            t2 = time.perf_counter()
            stats = train_step(self.model, self.ema, self.optimizer, self.loss_fn, (x, y_x, y_u),
                               cosine_lr(self.spec.lr, self.k, self.spec.steps))
            loss_sum += stats["loss"]
            data_s, step_s = data_s + t2 - t1, step_s + time.perf_counter() - t2
            self.k += 1
        loss = float(loss_sum)  # the sync; a NaN here would mean a broken step
        t3 = time.perf_counter()
        if not np.isfinite(loss):
            raise ValueError(f"{self.name}: non-finite loss before step {self.k}")
        if timed:
            self.step_s.append((t3 - t0) / steps)
            self.data_host_s.append(data_s / steps)
            self.step_host_s.append(step_s / steps)
            self.cpu_s.append((time.process_time() - c0) / steps)

    def row(self) -> dict:
        med = statistics.median(self.step_s)
        b, mu = self.spec.batch_size, self.spec.uratio
        return {"config": self.name, "batch": b, "uratio": mu, "precision": self.spec.precision,
                "channels_last": self.spec.channels_last, "compile_s": self.compile_s,
                "steps_per_s": 1.0 / med, "images_per_s": b * (1 + 2 * mu) / med, "step_s_median": med,
                "step_s_min": min(self.step_s), "step_s_all": self.step_s,
                # host time issuing data preparation / the step (on the CPU, doing it; on a GPU, mostly launching)
                "data_host_s": statistics.median(self.data_host_s),
                "step_host_s": statistics.median(self.step_host_s),
                # CPU seconds of this process per step, all threads: less sensitive to other load on a shared machine
                "cpu_s_median": statistics.median(self.cpu_s)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--configs", nargs="+", default=["fp32", "fp32-cl", "bf16-cl", "fp32-cl-compile"])
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--window", type=int, default=None, help="steps per timed sample (default: 1 on the CPU, "
                   "20 on a GPU)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[16], help="B, labelled images per step")
    p.add_argument("--uratio", type=int, default=7, help="mu")
    p.add_argument("--depth", type=int, default=28, help="WideResNet depth (28: the paper's)")
    p.add_argument("--widen-factor", type=int, default=2, help="WideResNet width (2: the paper's)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as own_impl.train
    g = torch.Generator().manual_seed(0)
    train_x = torch.randint(0, 256, (N_TRAIN, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
    train_y = torch.randint(0, 10, (N_TRAIN,), generator=g).to(device)
    data = DeviceData(train_x, train_y, np.arange(250), train_x[:0], train_y[:0], "-")
    window = args.window or (20 if device.type == "cuda" else 1)
    rows = []
    for batch in args.batch_size:
        runners = []
        for name in args.configs:
            runners.append(Runner(name, data, device, batch, args.uratio, args.warmup + args.repeats * window,
                                  args.compile_mode, {"depth": args.depth, "widen_factor": args.widen_factor}))
            runners[-1].window(args.warmup, timed=False)
        for _ in range(args.repeats):
            for r in runners:
                r.window(window, timed=True)
        for r in runners:
            rows.append(r.row())
            w = rows[-1]
            print(f"B={batch:<3} mu={args.uratio} {r.name:18s} {w['steps_per_s']:8.3f} steps/s (fastest "
                  f"{1 / w['step_s_min']:.3f})  {w['images_per_s']:8.1f} img/s  cpu {w['cpu_s_median']:.3f} s/step  "
                  f"host: data {1e3 * w['data_host_s']:.1f} ms, step {1e3 * w['step_host_s']:.1f} ms"
                  + (f"  compile {w['compile_s']:.1f} s" if w["compile_s"] else ""), flush=True)
    env = {"device": str(device), "device_name": machine_info(str(device)), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "warmup": args.warmup, "repeats": args.repeats, "window": window,
           "compile_mode": args.compile_mode}
    out = {"env": env, "rows": rows}
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    common.run_main("own_steps.py", main)
