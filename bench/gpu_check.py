"""What only a GPU can confirm, checked in one prepared run: the environment, the CUDA-only tests, our step eager
against compiled, both implementations' throughput side by side, and a short side-by-side accuracy run; everything
it learns goes to --out.

    python bench/gpu_check.py --device cuda --out OUT --data PATH/cifar10-jpeg.tar.gz
    python bench/gpu_check.py --device cpu --out /tmp/gpu-check --data PATH/cifar10-jpeg.tar.gz   # the same, tiny

It needs a verified TorchSSL checkout in the cache folder ($FIXMATCH_BENCH_CACHE) or a source to clone it from
(--torchssl-source); without one it measures ours alone. Each stage has its own time limit and process group; a
stage that fails or runs out of time is recorded and the next one still runs. --device cpu shrinks every stage to
a few steps of tiny batches, so that the whole script can be checked on any machine before a GPU is spent on it.
It writes at most 8 files: env.txt, own-configs.json, throughput.json, accuracy.json, RESULTS.md, curves-4000.png,
session.log, summary.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import common
from harness.runner import child_env  # contract and harness only: no torch in this process

REPO = common.REPO


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--out", required=True, help="folder for everything the session learns")
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (dry mode: tiny settings)")
    p.add_argument("--data", default=os.environ.get("FIXMATCH_BENCH_DATA"))
    p.add_argument("--torchssl-source", default=os.environ.get("TORCHSSL_SOURCE"))
    p.add_argument("--accuracy-steps", type=int, default=None, help="steps of the accuracy run (default 1000 on "
                   "a GPU, 8 on the CPU)")
    p.add_argument("--time-limit", type=float, default=510.0, help="seconds for the whole session")
    args = p.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = args.device == "cpu"
    t_start = time.monotonic()
    log = open(out / "session.log", "a")
    summary = [f"# GPU session on {args.device}", ""]

    def left() -> float:
        return args.time_limit - (time.monotonic() - t_start)

    def stage(name: str, cmd: list[str], limit: float) -> bool:
        """Run one stage for at most `limit` seconds (and never past the session's end); log its output.

        A stage runs in its own process group: at its limit the whole group (training subprocesses included) gets
        SIGTERM, so runs checkpoint and stop, then SIGKILL a minute later; nothing holds the GPU afterwards."""
        limit = max(10.0, min(limit, left() - 5))
        log.write(f"\n=== {name}: {' '.join(cmd)} (limit {limit:.0f} s)\n")
        log.flush()
        t = time.monotonic()
        env = child_env(**({"FIXMATCH_BENCH_DATA": str(Path(args.data).resolve())} if args.data else {}))
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=limit)
            ok = proc.returncode == 0
            status = "ok" if ok else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            ok, status = False, f"stopped at its {limit:.0f} s limit"
        summary.append(f"- {name}: {status}, {time.monotonic() - t:.0f} s")
        log.flush()
        print(f"{name}: {status}", flush=True)
        return ok

    env_cmd = ("import torch, platform, sys; print('python', sys.version); print('torch', torch.__version__, "
               "'cuda', torch.version.cuda); print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() "
               "else 'none'); print(platform.platform())")
    with open(out / "env.txt", "w") as f:
        subprocess.run([sys.executable, "-c", env_cmd], stdout=f, stderr=subprocess.STDOUT)
        if shutil.which("nvidia-smi"):
            subprocess.run(["nvidia-smi"], stdout=f, stderr=subprocess.STDOUT)
        subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze"], stdout=f, stderr=subprocess.DEVNULL)

    shared = ["--device", args.device]
    if args.data:
        shared += ["--data", args.data]
    if args.torchssl_source:
        shared += ["--torchssl-source", args.torchssl_source]
    # TorchSSL needs git, gitpython and its checkout: without them, measure ours alone rather than nothing.
    impls = ["own", "torchssl"]
    probe = [sys.executable, "-c", "import sys; from harness.env import default_cache_dir; "
             "from third_party.torchssl.checkout import ensure_checkout; "
             "print(ensure_checkout(sys.argv[1] if len(sys.argv) > 1 else None, default_cache_dir()))"]
    if not stage("TorchSSL checkout", probe + ([args.torchssl_source] if args.torchssl_source else []), 60):
        impls = ["own"]
        summary.append("- TorchSSL unavailable (see session.log): ours alone")
    if args.data:  # decoded once into the cache here, so that no later stage spends its time limit on it
        stage("data", [sys.executable, "-c", "import sys; from harness.data import load_cifar10; "
                       "print(load_cifar10(sys.argv[1]).data_dir)", args.data], 90)
    # Our step eager against compiled (augmentation + forward/backward), without the harness around it.
    own = ["--batch-size", "4", "--uratio", "2", "--configs", "fp32", "fp32-compile", "--warmup", "1", "--repeats", "2",
           "--window", "1"] if cpu else \
        ["--batch-size", "64", "--uratio", "7", "--configs", "bf16-cl", "bf16-cl-compile", "--warmup", "20",
         "--repeats", "5", "--window", "20"]
    stage("own configurations", [sys.executable, "bench/own_steps.py", "--device", args.device, *own,
                                 "--json", str(out / "own-configs.json")], 100)
    batch = ["--batch-size", "4", "--uratio", "2", "--warmup", "2", "--window", "2", "--repeats", "2"] if cpu else \
        ["--batch-size", "64", "--uratio", "7", "--warmup", "40", "--window", "20", "--repeats", "5"]
    precision = "fp32" if cpu else "bf16"
    stage(f"throughput {precision}", [sys.executable, "bench/throughput.py", *shared, *batch, "--precision",
                                      precision, "--channels-last", "--impls", *impls,
                                      "--json", str(out / "throughput.json")], 130)
    # The GPU-only tests: augmentation on the GPU (eager and compiled) = the CPU's pixels; compiled steps = float64.
    stage("CUDA tests", [sys.executable, "-m", "pytest", "-q", "-rs", "--durations=5", "-k", "cuda",
                         "tests/test_augment.py", "tests/test_own_compile.py"], 120)

    steps = args.accuracy_steps or (8 if cpu else 1000)
    acc_out = out / "acc"
    size = ["--batch-size", "4", "--uratio", "2", "--eval-subset", "1000"] if cpu else []
    ok = stage("accuracy 4000 labels", [
        sys.executable, "run_all.py", "--budgets", "4000", "--preset", "short", "--steps", str(steps),
        "--eval-every", str(max(steps // 6, 1)), "--checkpoint-every", str(max(steps // 4, 1)), "--log-every",
        str(max(steps // 30, 1)), "--precision", precision, "--out", str(acc_out), "--no-warmup",
        "--impls", *impls, *shared, *size], left() - 20)
    if not (acc_out / "RESULTS.md").exists():  # cut off: report whatever runs finished
        stage("report", [sys.executable, "run_all.py", "--report-only", "--out", str(acc_out)], 15)
    if (acc_out / "RESULTS.md").exists():
        shutil.copy(acc_out / "RESULTS.md", out / "RESULTS.md")
        fig = acc_out / "figures" / "curves-4000.png"
        if fig.exists():
            shutil.copy(fig, out / "curves-4000.png")
        results = [json.loads(r.read_text()) for r in sorted(acc_out.glob("runs/*/result.json"))]
        (out / "accuracy.json").write_text(json.dumps(results, indent=1) + "\n")
    shutil.rmtree(acc_out, ignore_errors=True)  # checkpoints stay behind: only the 8 files travel back

    path = out / "own-configs.json"
    if path.exists():
        for r in json.loads(path.read_text())["rows"]:
            summary.append(f"- own {r['config']}: {r['steps_per_s']:.2f} steps/s, host per step: data "
                           f"{1e3 * r['data_host_s']:.1f} ms, step {1e3 * r['step_host_s']:.1f} ms")
    path = out / "throughput.json"
    if path.exists():
        t = json.loads(path.read_text())
        for impl, r in t["impls"].items():
            summary.append(f"- {t['precision']} {impl}: {r['steps_per_second']:.2f} steps/s, "
                           f"{r['achieved_tflops']:.1f} TFLOP/s, data wait "
                           f"{'n/a' if r['data_frac'] is None else format(r['data_frac'], '.1%')}")
        if "speedup_own_over_torchssl" in t:
            summary.append(f"- {t['precision']} speedup own/torchssl: {t['speedup_own_over_torchssl']:.2f}")
    summary.append(f"- accuracy run: {'ok' if ok else 'see session.log'}; total {time.monotonic() - t_start:.0f} s")
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
