"""What only a GPU can confirm, checked in one prepared run, most valuable first: the environment; the CUDA-only tests
(TF32 as the precision says, float32 logits under bf16, the EMA's grouped buffer copy, the augmentation's pixels
eager and compiled, compiled steps, a compiled run resumed); our step eager against compiled, with its compile time;
the implementations' throughput side by side (TorchSSL's loader as shipped and with as many loader processes as
cores; USB's as its config says); a short side-by-side accuracy run of ours and TorchSSL. Everything it learns goes
to --out, and summary.md says which line of check.log confirms each point.

    python bench/gpu_check.py --device cuda --out OUT --data PATH/cifar10-jpeg.tar.gz
    python bench/gpu_check.py --device cpu --out /tmp/gpu-check --data PATH/cifar10-jpeg.tar.gz   # the same, tiny

Each stage runs in its own process group with its own time limit, never past --time-limit; a stage that fails or
runs out of time is recorded, the next one still runs, and each prints the seconds it used. All stages share one
inductor cache folder (--inductor-cache), so a graph compiled once (the tests compile theirs again after
torch.compiler.reset(); our step is compiled by the configurations stage, then by the throughput and accuracy runs)
is loaded from disk afterwards. TorchSSL and USB each need git, gitpython and a verified checkout in the cache
folder ($FIXMATCH_BENCH_CACHE) or a source to clone it from (--torchssl-source, --usb-source); without them the
script measures ours alone, or ours with whichever of the two it has. --device cpu shrinks every stage to a few
steps of tiny batches through WRN-10-1 (the CUDA tests skip), so that the whole script can be checked on any machine
before a GPU is spent on it. It writes at most 8 files: env.txt, own-configs.json, throughput.json, accuracy.json,
RESULTS.md, curves-4000.png, check.log, summary.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from harness.launch import child_env  # contract and harness only: no torch in this process

REPO = common.REPO
PYTEST = [sys.executable, "-m", "pytest", "-v", "-rA", "-p", "no:cacheprovider", "--durations=0"]
# The CUDA-only tests, by what they confirm; without compiling first (seconds), then those that compile (minutes).
QUICK_TESTS = (
    "tests/test_precision.py::test_fp32_is_full_fp32_on_cuda_and_tf32_is_not",
    "tests/test_own_model.py::test_logits_are_float32_under_bf16_autocast[cuda]",
    "tests/test_own_optim.py::test_ema_buffer_copy_launches_few_kernels_on_cuda",
    "tests/test_own_optim.py::test_ema_copies_buffers_in_groups_of_one_dtype[cuda]",
    "tests/test_augment.py::test_cuda_matches_cpu",
)
COMPILE_TESTS = (
    "tests/test_augment.py::test_compiled_augmentation_changes_no_pixel[cuda]",
    "tests/test_own_compile.py::test_compiled_batches_are_the_eager_batches[False-paper-cuda]",
    "tests/test_own_compile.py::test_compiled_batches_are_the_eager_batches[True-paper-cuda]",
    "tests/test_own_compile.py::test_compiled_batches_are_the_eager_batches[False-torchssl-cuda]",
    "tests/test_own_compile.py::test_compiled_run_resumes_like_a_straight_run[cuda]",
    "tests/test_own_compile.py::test_compiled_steps_match_a_float64_reference[False-cuda]",
    "tests/test_own_compile.py::test_compiled_steps_match_a_float64_reference[True-cuda]",
)
# What only a GPU can confirm, and the tests whose outcome lines in check.log confirm it.
TEST_CLAIMS = (
    ("compiled augmentation: the eager pixels on CUDA, no fused multiply-add drift (and eager CUDA = CPU)",
     COMPILE_TESTS[:4] + ("tests/test_augment.py::test_cuda_matches_cpu",)),
    ("bf16: float32 logits from the float32 classifier", QUICK_TESTS[1:2]),
    ("TF32: fp32 is full fp32 on CUDA, tf32 is TF32 (errors against float64 printed)", QUICK_TESTS[:1]),
    ("resume on CUDA: equal to a straight run within 1e-4 (largest difference printed); a bare `cuda` device "
     "accepted", COMPILE_TESTS[4:5]),
    ("EMA: buffers copied in dtype groups, a few multi-tensor kernels (kernel counts printed)", QUICK_TESTS[2:4]),
    ("compiled steps on CUDA: float64's results within 1e-5, TF32 off", COMPILE_TESTS[5:]),
)
ENV_SCRIPT = """
import importlib.util, os, platform, sys, torch
print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda,
      '| cuDNN', torch.backends.cudnn.version() if torch.cuda.is_available() else None)
if torch.cuda.is_available():
    print('gpu', torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0),
          'count', torch.cuda.device_count())
else:
    print('gpu none')
print('cores', os.cpu_count(), '|', platform.platform())
print('defaults: cudnn.allow_tf32', torch.backends.cudnn.allow_tf32, 'matmul.allow_tf32',
      torch.backends.cuda.matmul.allow_tf32)
print('modules:', {m: importlib.util.find_spec(m) is not None
                   for m in ('triton', 'pytest', 'git', 'matplotlib', 'sklearn', 'yaml', 'tensorboard')})
print('inductor cache', os.environ.get('TORCHINDUCTOR_CACHE_DIR'))
"""


class Stages:
    """Runs each stage as a command in its own process group, for at most its limit (times `slow`) and never past
    the run's end; the output goes to check.log, and one line per stage says how it ended and how long it took.

    At its limit a stage's whole group (training subprocesses included) gets SIGTERM, so runs checkpoint and stop,
    then SIGKILL a minute later; nothing holds the GPU afterwards."""

    def __init__(self, log_path: Path, time_limit: float, slow: float, env: dict[str, str]):
        self.log = open(log_path, "a")
        self.t_start, self.time_limit, self.slow, self.env = time.monotonic(), time_limit, slow, env
        self.lines: list[str] = []

    def left(self) -> float:
        return self.time_limit - (time.monotonic() - self.t_start)

    def run(self, name: str, cmd: list[str], limit: float, stdout=None) -> bool:
        limit = max(10.0, min(limit * self.slow, self.left() - 5))
        self.log.write(f"\n=== {name}: {' '.join(cmd)} (limit {limit:.0f} s)\n")
        self.log.flush()
        t = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=stdout or self.log, stderr=subprocess.STDOUT,
                                env=child_env(**self.env), start_new_session=True)
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
        self.note(f"{name}: {status}, {time.monotonic() - t:.0f} s")
        return ok

    def note(self, line: str) -> None:
        self.lines.append(line)
        self.log.write(f"=== {line}\n")
        self.log.flush()
        print(line, flush=True)


def environment_and_checks(args, out: Path, stages: Stages) -> list[str]:
    """The environment, the CUDA tests, TorchSSL's and USB's checkouts and the data; returns the implementations to
    measure (ours, and each reference whose checkout can be had: git, gitpython and the checkout are needed)."""
    with open(out / "env.txt", "w") as f:
        stages.run("environment", [sys.executable, "-c", ENV_SCRIPT], 60, stdout=f)
    shutil.copyfileobj(open(out / "env.txt"), stages.log)
    with open(out / "env.txt", "a") as f:
        if shutil.which("nvidia-smi"):
            subprocess.run(["nvidia-smi"], stdout=f, stderr=subprocess.STDOUT, timeout=30)
        subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze"], stdout=f,
                       stderr=subprocess.DEVNULL, timeout=60)
    stages.run("CUDA checks", [*PYTEST, *QUICK_TESTS], 120)
    impls = ["own"]
    for impl, name, source in (("torchssl", "TorchSSL", args.torchssl_source), ("usb", "USB", args.usb_source)):
        probe = [sys.executable, "-c", "import sys; from harness.env import default_cache_dir; "
                 f"from third_party.{impl}.checkout import ensure_checkout; "
                 "print(ensure_checkout(sys.argv[1] if len(sys.argv) > 1 else None, default_cache_dir()))"]
        if stages.run(f"{name} checkout", probe + ([source] if source else []), 60):
            impls.append(impl)
        else:
            stages.note(f"{name} unavailable (see check.log): measured without it")
    if args.data:  # decoded once into the cache here, so that no later stage spends its time limit on it
        stages.run("data", [sys.executable, "-c", "import sys; from harness.data import load_cifar10; "
                            "print(load_cifar10(sys.argv[1]).data_dir)", args.data], 120)
    stages.run("CUDA compile checks", [*PYTEST, *COMPILE_TESTS], 240)
    return impls


def speed(args, out: Path, stages: Stages, impls: list[str], shared: list[str], tiny: list[str]) -> None:
    """Our step eager against compiled, without the harness around it (it compiles the graphs that the throughput
    stage's run of ours then loads from the inductor cache: same shapes, precision and layout); then both
    implementations' throughput side by side."""
    cpu = args.device == "cpu"
    precision = "fp32" if cpu else "bf16"
    own = ["--warmup", "1", "--repeats", "2", "--window", "1"] if cpu else \
        ["--batch-size", "64", "--uratio", "7", "--warmup", "20", "--repeats", "5", "--window", "20"]
    stages.run("own configurations", [sys.executable, "bench/own_steps.py", "--device", args.device, *tiny, *own,
                                      "--configs", f"{precision}-cl", f"{precision}-cl-compile", "--json",
                                      str(out / "own-configs.json")], 180)
    batch = ["--warmup", "2", "--window", "2", "--repeats", "2"] if cpu else \
        ["--batch-size", "64", "--uratio", "7", "--warmup", "40", "--window", "20", "--repeats", "5"]
    stages.run(f"throughput {precision}", [sys.executable, "bench/throughput.py", *shared, *tiny, *batch,
                                           "--precision", precision, "--channels-last", "--impls", *impls,
                                           "--json", str(out / "throughput.json")], 300)


def accuracy(args, out: Path, stages: Stages, impls: list[str], shared: list[str], tiny: list[str]) -> list[dict]:
    """A short side-by-side run at 4000 labels with the time that is left; its report, curve and results are
    copied to --out (the run folders, checkpoints included, are not). Returns the runs' result.json contents."""
    cpu = args.device == "cpu"
    steps = args.accuracy_steps or (8 if cpu else 1000)
    acc_out = out / "acc"
    size = [*tiny, "--eval-subset", "100"] if cpu else []
    stages.run("accuracy 4000 labels", [
        sys.executable, "run_all.py", "--budgets", "4000", "--preset", "short", "--steps", str(steps),
        "--eval-every", str(max(steps // (2 if cpu else 6), 1)), "--checkpoint-every", str(max(steps // 4, 1)),
        "--log-every", str(max(steps // 30, 1)), "--precision", "fp32" if cpu else "bf16", "--out", str(acc_out),
        "--no-warmup", "--impls", *impls, *shared, *size], (stages.left() - 20) / stages.slow)
    if not (acc_out / "RESULTS.md").exists():  # cut off: report whatever runs finished
        stages.run("report", [sys.executable, "run_all.py", "--report-only", "--out", str(acc_out)], 15)
    if (acc_out / "RESULTS.md").exists():
        shutil.copy(acc_out / "RESULTS.md", out / "RESULTS.md")
        fig = acc_out / "figures" / "curves-4000.png"
        if fig.exists():
            shutil.copy(fig, out / "curves-4000.png")
    results = [json.loads(r.read_text()) for r in sorted(acc_out.glob("runs/*/result.json"))]
    if results:
        (out / "accuracy.json").write_text(json.dumps(results, indent=1) + "\n")
    shutil.rmtree(acc_out, ignore_errors=True)  # checkpoints stay behind: only the 8 files travel back
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--out", required=True, help="folder for everything the run learns")
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (dry mode: tiny settings)")
    p.add_argument("--data", default=os.environ.get("FIXMATCH_BENCH_DATA"))
    p.add_argument("--torchssl-source", default=os.environ.get("TORCHSSL_SOURCE"))
    p.add_argument("--usb-source", default=os.environ.get("USB_SOURCE"))
    p.add_argument("--accuracy-steps", type=int, default=None, help="steps of the accuracy run (default 1000 on "
                   "a GPU, 8 on the CPU)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds for the whole run (default: 510 on a GPU, 900 on the CPU, whose compiles are slow)")
    p.add_argument("--inductor-cache", default=os.environ.get("TORCHINDUCTOR_CACHE_DIR") or
                   str(Path(tempfile.gettempdir()) / "fixmatch-bench-inductor"),
                   help="inductor's cache folder for every stage (default: $TORCHINDUCTOR_CACHE_DIR, else one in "
                        "the temporary folder, kept between runs)")
    args = p.parse_args()

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cpu = args.device == "cpu"
    env = {"TORCHINDUCTOR_CACHE_DIR": str(Path(args.inductor_cache).resolve())}
    if args.data:
        env["FIXMATCH_BENCH_DATA"] = str(Path(args.data).resolve())
    # stage limits are doubled on a CPU: it compiles and steps more slowly than the GPU machine's host
    stages = Stages(out / "check.log", args.time_limit or (900.0 if cpu else 510.0), 2.0 if cpu else 1.0, env)
    shared = ["--device", args.device, *(["--data", args.data] if args.data else []),
              *(["--torchssl-source", args.torchssl_source] if args.torchssl_source else []),
              *(["--usb-source", args.usb_source] if args.usb_source else [])]
    tiny = ["--batch-size", "4", "--uratio", "2", "--depth", "10", "--widen-factor", "1"] if cpu else []

    impls = environment_and_checks(args, out, stages)
    speed(args, out, stages, impls, shared, tiny)
    results = accuracy(args, out, stages, [i for i in impls if i != "usb"], shared, tiny)
    stages.log.close()
    text = summary(args.device, out, (out / "check.log").read_text().splitlines(), stages.lines, results,
                   time.monotonic() - stages.t_start)
    (out / "summary.md").write_text(text)
    print(text)
    return 0


def find_line(lines: list[str], pattern: str) -> tuple[int, str] | None:
    """(1-based number, text) of the first line of check.log matching the regular expression, else None."""
    rx = re.compile(pattern)
    return next(((i + 1, ln.strip()) for i, ln in enumerate(lines) if rx.search(ln)), None)


def cite(found: tuple[int, str] | None) -> str:
    return "not reached (see check.log)" if found is None else f"check.log line {found[0]}: `{found[1][:150]}`"


def test_outcome(lines: list[str], node: str) -> tuple[str, tuple[int, str] | None]:
    """What pytest -v said of the test `node` in check.log: PASSED, FAILED, SKIPPED, ERROR, or "not run"."""
    found = find_line(lines, "^" + re.escape(node) + r" (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
    return ("not run" if found is None else found[1].split()[1]), found


def summary(device: str, out: Path, lines: list[str], stages: list[str], results: list[dict],
            seconds: float) -> str:
    """summary.md: each stage's outcome and time; for each point only a GPU can confirm, the lines that confirm it;
    then the numbers."""
    md = [f"# GPU check on {device}", "", f"Total {seconds:.0f} s. Environment: " +
          "; ".join(ln.strip() for ln in lines if ln.startswith(("python ", "gpu "))), "", "## Stages", ""]
    md += [f"- {s}" for s in stages]
    md += ["", "## What confirms each point (outcome: the test's line in check.log)", ""]
    for claim, nodes in TEST_CLAIMS:
        md.append(f"- {claim}:")
        for node in nodes:
            outcome, found = test_outcome(lines, node)
            md.append(f"  - **{outcome}** `{node}`" + ("" if found is None else f" (check.log line {found[0]})"))
    rows = [(i + 1, ln.strip()) for i, ln in enumerate(lines) if re.match(r"(own|usb|torchssl-w\d+) +\d", ln)]
    md.append("- TorchSSL's loader as shipped and with as many loader processes as cores, and USB's, beside ours "
              "(steps/s, data wait, loader processes): " + ("; ".join(cite(r) for r in rows) if rows else cite(None)))
    md.append("- compile time of our step and augmentation, first in the configurations stage (cold unless the "
              "inductor cache already held them): "
              + cite(find_line(lines, r"-compile .* compile \d")) + "; again in the throughput stage (from the "
              "inductor cache if the configurations stage finished): " + cite(find_line(lines, r"^own .* compiled in"))
              + "; the slowest compiling test: "
              + cite(find_line(lines, r"^\d+\.\d+s call +tests/test_(augment|own_compile)\.py::test_compiled")))
    md += ["", "## Numbers", ""]
    path = out / "own-configs.json"
    if path.exists():
        for r in json.loads(path.read_text())["rows"]:
            md.append(f"- own {r['config']}: {r['steps_per_s']:.2f} steps/s, host per step: data "
                      f"{1e3 * r['data_host_s']:.1f} ms, step {1e3 * r['step_host_s']:.1f} ms"
                      + (f", compiled in {r['compile_s']:.0f} s" if r["compile_s"] else ""))
    path = out / "throughput.json"
    if path.exists():
        t = json.loads(path.read_text())
        for label, r in t["impls"].items():
            loaders = "" if r.get("num_workers") is None else f", {r['loader_processes']} loader processes"
            md.append(f"- {t['precision']} {label}: {r['steps_per_second']:.2f} steps/s, "
                      f"{r['achieved_tflops']:.1f} TFLOP/s, data wait "
                      f"{'n/a' if r['data_frac'] is None else format(r['data_frac'], '.1%')}{loaders}")
        for label, ratio in t.get("speedups_own_over", {}).items():
            md.append(f"- {t['precision']} speedup own/{label}: {ratio:.2f}")
    for r in results:
        md.append(f"- accuracy run {r['impl']}: final top-1 {r['final_top1']:.2f} after {r['steps']} steps, "
                  f"{r['steps_per_second'] or 0:.2f} steps/s, TF32 conv/matmul {r.get('tf32_conv')}/"
                  f"{r.get('tf32_matmul')}")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())
