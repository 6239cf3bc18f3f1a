"""What run_all.py does: resolve data and splits, plan the runs, run them, and write the report."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from harness.data import CIFAR10_CLASSES, CIFAR10_COUNTS, load_cifar10
from harness.plan import OVERRIDABLE, plan_runs, preset_values
from contract.spec import RunSpec
from harness.splits import check_budget, ensure_split


class UsageError(ValueError):
    """A flag value that cannot be used; reported as one line."""


def resolve_devices(device: str, gpus: list[int] | None) -> list[str]:
    """The devices runs are spread over: one run per device at a time."""
    import torch

    if gpus:
        if not torch.cuda.is_available():
            raise UsageError(f"--gpus {' '.join(map(str, gpus))} needs CUDA, but torch sees no GPU; use --device cpu")
        bad = [g for g in gpus if not 0 <= g < torch.cuda.device_count()]
        if bad:
            raise UsageError(f"--gpus {bad[0]} is not a GPU index; accepted: 0..{torch.cuda.device_count() - 1}")
        return [f"cuda:{g}" for g in gpus]
    if device == "auto":
        return ["cuda:0" if torch.cuda.is_available() else "cpu"]
    if device == "cpu":
        return ["cpu"]
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: torch sees no GPU here; accepted: auto, cpu")
        index = device.partition(":")[2] or "0"
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise UsageError(f"--device {device} is not a GPU here; accepted: cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return [f"cuda:{index}"]
    raise UsageError(f"--device {device!r} is not accepted; accepted: auto, cpu, cuda, cuda:N")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(args) -> int:
    import signal

    from third_party.torchssl.checkout import CheckoutError  # gitpython only: no TorchSSL, no torch

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # a kill checkpoints the running runs, like Ctrl-C
    try:
        return _main(args)
    except (ValueError, OSError, CheckoutError) as e:  # UsageError, DataError and SplitError are ValueErrors
        if isinstance(e, OSError) and e.filename is not None:  # e.g. --out naming a file: "[Errno 20] ..." made plain
            also = f" -> {e.filename2}" if e.filename2 is not None else ""
            print(f"error: {e.strerror}: {e.filename}{also}", file=sys.stderr)
        else:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished runs are kept, interrupted ones resume from their checkpoint on the next call",
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(args) -> int:
    out = Path(args.out).resolve()  # runs execute in the repository root, wherever this was started
    if args.report_only:
        from harness.report import write_report

        path = write_report(out)
        print(f"report: {path}")
        return 0

    overrides = {k: getattr(args, k) for k in OVERRIDABLE if getattr(args, k, None) is not None}
    for flag, values in (("--budgets", args.budgets), ("--seeds", args.seeds), ("--impls", args.impls)):
        if len(set(values)) != len(values):
            raise UsageError(f"{flag} {' '.join(map(str, values))} repeats a value; give each once")
    bad_seeds = [s for s in args.seeds if s < 0]
    if bad_seeds:
        raise UsageError(f"--seeds {bad_seeds[0]} is not accepted; seeds are integers >= 0")
    for n in args.budgets:  # CIFAR-10's counts: catch a bad budget before decoding any data
        check_budget(n, CIFAR10_COUNTS["train"])
    test_images = CIFAR10_COUNTS["test"] * len(CIFAR10_CLASSES)
    if (overrides.get("eval_subset") or 0) > test_images:
        raise UsageError(f"--eval-subset {overrides['eval_subset']} is more than the {test_images} test images; "
                         f"accepted: 0 (all) or a multiple of 10 up to {test_images}")
    if "torchssl" in args.impls and overrides.get("channels_last"):
        raise UsageError("--channels-last is not accepted with TorchSSL (its model runs as it ships); "
                         "leave it out or use --impls own")
    # Every spec value is checked here, before any data is decoded or any split file written.
    RunSpec(impl=args.impls[0], n_labels=args.budgets[0], seed=args.seeds[0], data_kind="-", data_sha256="-",
            split_sha256="-", **preset_values(args.preset, overrides))
    devices = resolve_devices(args.device, args.gpus)
    source = args.data or os.environ.get("FIXMATCH_BENCH_DATA")
    cache_dir = Path(args.cache_dir).resolve() if args.cache_dir else None
    data = load_cifar10(source, cache_dir=cache_dir)

    print(f"data: {data.identity.describe()}")
    print(f"      cached arrays {data.data_dir}")
    print(f"      train per class {np.bincount(data.train_y, minlength=10).tolist()}, "
          f"test per class {np.bincount(data.test_y, minlength=10).tolist()}")
    splits = {}
    for n in args.budgets:
        for seed in args.seeds:
            path, sha = ensure_split(out, "cifar10", data.train_y, n, seed, data.identity.data_sha256)
            splits[(n, seed)] = (path, sha)
            print(f"split: {path}  sha256 {sha}")
    runs = plan_runs(budgets=args.budgets, seeds=args.seeds, impls=args.impls, preset=args.preset,
                     overrides=overrides, out_dir=out, data_kind=data.identity.kind,
                     data_sha256=data.identity.data_sha256, splits=splits)
    print(f"plan: {len(runs)} runs, preset {args.preset}, devices {', '.join(devices)}")
    for r in runs:
        s = r.spec
        print(f"  {s.impl:8s} n_labels={s.n_labels:<5d} seed={s.seed:<3d} steps={s.steps:<8d} "
              f"B={s.batch_size} mu={s.uratio} hash={s.hash()}  {r.run_dir}")
    if args.dry_run:
        return 0

    from harness.runner import execute

    failed = execute(runs, data=data, devices=devices, torchssl_source=args.torchssl_source,
                     cache_dir=cache_dir, warmup=not args.no_warmup, compile_own=args.compile)
    from harness.report import write_report

    path = write_report(out)
    print(f"report: {path}")
    if failed:
        print(f"{len(failed)} of {len(runs)} runs failed: {', '.join(r.spec.name for r in failed)}", file=sys.stderr)
        return 1
    return 0
