"""TorchSSL's FixMatch training speed through our entry: steps/s after a warm-up, from its metrics.jsonl.

    python bench/torchssl_cpu_steps.py [--device cpu] [--batch-size 16] [--uratio 7] [--warmup 2] [--steps 5]
                                       [--num-workers 0] [--precision fp32] [--data ARCHIVE]

Runs one short run in a temporary folder (train statistics logged every step, one evaluation of 100 test images at
the end) and prints the mean time per step over the steps after the warm-up. A step is timed from the request for
its labelled batch to its end (data loading and augmentation included; evaluation and checkpoints excluded).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from contract.results import read_metrics  # noqa: E402
from contract.spec import RunFiles, RunSpec, write_spec  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--uratio", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the mean")
    p.add_argument("--steps", type=int, default=5, help="steps measured after the warm-up")
    p.add_argument("--num-workers", type=int, default=0, help="TorchSSL's num_workers (the unlabelled loader: 4x)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--data", default=os.environ.get("FIXMATCH_BENCH_DATA",
                                                    str(REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")))
    p.add_argument("--torchssl-source", default=None)
    a = p.parse_args()

    from harness.data import load_cifar10
    from harness.splits import ensure_split
    from third_party.torchssl.checkout import ensure_checkout

    checkout = ensure_checkout(a.torchssl_source)
    data = load_cifar10(a.data)
    total = a.warmup + a.steps
    with tempfile.TemporaryDirectory(prefix="torchssl-bench-") as tmp:
        split_file, split_sha = ensure_split(Path(tmp), "cifar10", data.train_y, 40, 0, data.identity.data_sha256)
        spec = RunSpec(impl="torchssl", n_labels=40, seed=0, data_kind=data.identity.kind,
                       data_sha256=data.identity.data_sha256, split_sha256=split_sha, steps=total,
                       eval_every=total, checkpoint_every=total, log_every=1, batch_size=a.batch_size,
                       uratio=a.uratio, eval_subset=100, eval_batch_size=100, precision=a.precision)
        run_dir = Path(tmp) / "run"
        write_spec(run_dir, spec, RunFiles(data_dir=str(data.data_dir), split_file=str(split_file), device=a.device,
                                           extra={"torchssl_checkout": str(checkout), "num_workers": a.num_workers}))
        proc = subprocess.run([sys.executable, "-m", "third_party.torchssl.entry", "--spec",
                               str(run_dir / "spec.json"), "--run-dir", str(run_dir)], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        train = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    images = a.batch_size * (1 + 2 * a.uratio)
    step_s = [images / r["images_per_s"] for r in train]
    measured = step_s[a.warmup:]
    mean = statistics.mean(measured)
    print(f"TorchSSL FixMatch on {a.device}, B={a.batch_size} mu={a.uratio} {a.precision}, num_workers "
          f"{a.num_workers}, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}:")
    print("  seconds per step: " + " ".join(f"{s:.2f}" for s in step_s) + f"  (first {a.warmup} = warm-up)")
    median = statistics.median(measured)
    print(f"  {1 / mean:.3f} steps/s = {mean:.2f} s/step (mean) over {len(measured)} steps; median "
          f"{median:.2f} s/step = {1 / median:.3f} steps/s (min {min(measured):.2f}, max {max(measured):.2f}); "
          f"{images / mean:.0f} images/s through the network; "
          f"data share {statistics.mean(r['data_frac'] for r in train[a.warmup:]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
