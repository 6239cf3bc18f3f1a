"""Steps per second of own_impl's whole training step (sampling, augmentation, forward, backward, SGD, EMA).

    python bench/own_cpu_steps.py [--device cpu] [--warmup 2] [--repeats 3] [--batch 16 64] [--uratio 7]

For each batch size, fp32 and bf16 autocast, with and without channels_last: `warmup` untimed steps, then
`repeats` timed steps; prints the median wall time (and this process's CPU time, all threads, which other load
on a shared machine disturbs less) as a table and one JSON line. Images are random uint8 (the step's cost
does not depend on pixel values), so no data set is needed.
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contract.spec import RunSpec  # noqa: E402
from own_impl.optim import cosine_lr  # noqa: E402
from own_impl.train import DeviceData, EpochSampler, build, make_batch, resolve_device, train_step  # noqa: E402

N_TRAIN = 50_000


def bench_one(device: torch.device, batch: int, uratio: int, precision: str, channels_last: bool, warmup: int,
              repeats: int) -> dict:
    spec = RunSpec(impl="own", n_labels=250, seed=0, data_kind="synthetic", data_sha256="-", split_sha256="-",
                   batch_size=batch, uratio=uratio, precision=precision, channels_last=channels_last,
                   steps=warmup + repeats)
    g = torch.Generator().manual_seed(0)
    train_x = torch.randint(0, 256, (N_TRAIN, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
    train_y = torch.randint(0, 10, (N_TRAIN,), generator=g).to(device)
    labelled = np.arange(spec.n_labels)
    data = DeviceData(train_x, train_y, labelled, train_x[:0], train_y[:0], "-")
    torch.manual_seed(0)
    model, ema, optimizer = build(spec, device)
    lab, unl = EpochSampler(labelled, 1), EpochSampler(np.arange(N_TRAIN), 2)
    aug_gen = torch.Generator(device=device).manual_seed(3)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step_s, data_s, cpu_s = [], [], []
    for k in range(warmup + repeats):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        x, y_x, y_u = make_batch(data, lab, unl, spec, aug_gen)
        sync()
        t1 = time.perf_counter()
        stats = train_step(model, ema, optimizer, x, y_x, y_u, spec, cosine_lr(spec.lr, k, spec.steps))
        float(stats["loss"])  # sync, and a NaN here would mean a broken step
        t2 = time.perf_counter()
        if k >= warmup:
            step_s.append(t2 - t0)
            data_s.append(t1 - t0)
            cpu_s.append(time.process_time() - c0)
    med = statistics.median(step_s)
    return {"batch": batch, "uratio": uratio, "precision": precision, "channels_last": channels_last,
            "steps_per_s": 1.0 / med, "images_per_s": batch * (1 + 2 * uratio) / med,
            "step_s_median": med, "step_s_all": step_s, "data_frac": statistics.median(data_s) / med,
            # CPU seconds of this process per step, all threads: less sensitive to other load on a shared machine
            "cpu_s_median": statistics.median(cpu_s)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per configuration (median reported)")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64], help="B, labelled images per step")
    p.add_argument("--uratio", type=int, default=7, help="mu")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args()
    device = resolve_device(args.device)
    rows = []
    for batch, precision, cl in itertools.product(args.batch, ("fp32", "bf16"), (False, True)):
        rows.append(bench_one(device, batch, args.uratio, precision, cl, args.warmup, args.repeats))
        r = rows[-1]
        print(f"B={batch:<3} mu={args.uratio} {precision:4} channels_last={str(cl):5}  "
              f"{r['steps_per_s']:8.3f} steps/s  {r['images_per_s']:8.1f} img/s  data_frac {r['data_frac']:.2f}  "
              f"cpu {r['cpu_s_median']:.2f} s/step",
              flush=True)
    env = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
           else platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "warmup": args.warmup, "repeats": args.repeats}
    out = {"env": env, "rows": rows}
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
