"""Scheduling: one subprocess per run in its run folder; skip finished runs, resume interrupted ones, keep going."""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from contract.results import METRICS_FILE, read_metrics, read_result
from contract.spec import RunFiles, write_spec
from harness.plan import PlannedRun

REPO = Path(__file__).resolve().parents[1]
ENTRY = {"own": "own_impl.train", "torchssl": "third_party.torchssl.entry"}
PROCESS_LOG = "process.log"  # the subprocess's stdout and stderr; each implementation keeps its own log.txt


def is_done(run: PlannedRun) -> bool:
    result = read_result(run.run_dir)
    return result is not None and result.get("spec_hash") == run.spec.hash()


def command(run: PlannedRun) -> list[str]:
    spec_path = run.run_dir / "spec.json"
    return [sys.executable, "-m", ENTRY[run.spec.impl], "--spec", str(spec_path), "--run-dir", str(run.run_dir)]


def prepare(run: PlannedRun, data_dir: Path, device: str, extra: dict) -> None:
    write_spec(run.run_dir, run.spec, RunFiles(data_dir=str(data_dir), split_file=str(run.split_file.resolve()),
                                               device=device, extra=extra))


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process run from REPO: this project importable, output unbuffered."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1", **extra}


def launch(run: PlannedRun) -> subprocess.Popen:
    env = child_env()
    cmd = command(run)
    log = open(run.run_dir / PROCESS_LOG, "a")
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
    log.flush()
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def log_tail(run: PlannedRun, lines: int = 15) -> str:
    path = run.run_dir / PROCESS_LOG
    if not path.exists():
        return "(no log)"
    with open(path, errors="replace") as f:
        return "".join(deque(f, maxlen=lines))


class Progress:
    """(last step logged, last top-1) of a run's metrics.jsonl; each call reads only the lines appended since the
    last one (it is polled every second). A line still being written waits for its newline; a rewritten file (a
    resume truncates it through a new file) is read again from its start."""

    def __init__(self, run: PlannedRun):
        self.path = run.run_dir / METRICS_FILE
        self._restart(None)

    def _restart(self, file_id) -> None:
        self.file_id, self.offset, self.step, self.top1 = file_id, 0, 0, None

    def __call__(self) -> tuple[int, float | None]:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            self._restart(None)
            return self.step, self.top1
        with f:
            st = os.fstat(f.fileno())
            if (st.st_dev, st.st_ino) != self.file_id or st.st_size < self.offset:
                self._restart((st.st_dev, st.st_ino))
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # complete lines only
        self.offset += end
        for line in chunk[:end].decode(errors="replace").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill, as read_metrics skips it
                continue
            self.step = max(self.step, rec.get("step", 0))
            if rec.get("kind") == "eval":
                self.top1 = rec.get("top1")
        return self.step, self.top1


def progress(run: PlannedRun) -> tuple[int, float | None]:
    """(last step logged, last top-1) read from the run's metrics.jsonl."""
    return Progress(run)()


def warmup_estimate(runs: list[PlannedRun], data_dir: Path, n_test: int, device: str,
                    extras: dict[str, dict]) -> float | None:
    """Time a few steps of each implementation at the planned batch sizes; return the estimated total seconds.
    `runs`: the runs still to do; `n_test`: the number of test images."""
    total = 0.0
    for impl in sorted({r.spec.impl for r in runs}):
        mine = [r for r in runs if r.spec.impl == impl]
        probe_steps = 8
        spec = dataclasses.replace(mine[0].spec, steps=probe_steps, eval_every=probe_steps,
                                   checkpoint_every=probe_steps, log_every=1)
        with tempfile.TemporaryDirectory(prefix=f"warmup-{impl}-") as tmp:
            probe = PlannedRun(spec, Path(tmp) / "run", mine[0].split_file)
            prepare(probe, data_dir, device, extras.get(impl, {}))
            t0 = time.perf_counter()
            proc = launch(probe)
            try:
                code = proc.wait()
            finally:
                if proc.poll() is None:  # interrupted: the probe is in its own session, so stop it here
                    proc.kill()
                    proc.wait()
            wall = time.perf_counter() - t0
            result = read_result(probe.run_dir)
            if code != 0 or result is None:
                print(f"warm-up of {impl} failed (exit {code}):\n{log_tail(probe)}", file=sys.stderr)
                return None
            # Steady-state speed: the median step time after the first two (cuDNN autotuning, loader start-up).
            marks = [r["train_seconds"] for r in read_metrics(probe.run_dir) if r.get("kind") == "train"]
            per_step = [b - a for a, b in zip(marks[2:], marks[3:])]
        sps = 1.0 / statistics.median(per_step) if per_step else result["steps_per_second"]

        def eval_seconds(s) -> float:  # a forward pass costs about a third of a training step's per image
            images = s.eval_subset or n_test
            return images / (3 * s.batch_size * (1 + 2 * s.uratio) * sps)

        startup = max(wall - probe_steps / sps - eval_seconds(spec), 0.0)
        for r in mine:
            n_evals = -(-r.spec.steps // r.spec.eval_every)
            total += startup + (r.spec.steps - progress(r)[0]) / sps + n_evals * eval_seconds(r.spec)
        print(f"warm-up {impl}: {sps:.2f} steps/s, {startup:.0f} s start-up per run")
    return total


def execute(runs: list[PlannedRun], *, data, devices: list[str], torchssl_source: str | None,
            cache_dir: Path | None, warmup: bool = True, compile_own: bool | None = None) -> list[PlannedRun]:
    """Run every planned run that is not done; return the ones that failed."""
    from tqdm import tqdm

    extras: dict[str, dict] = {"own": {} if compile_own is None else {"compile": compile_own}, "torchssl": {}}
    done, todo = [], []
    for r in runs:
        (done if is_done(r) else todo).append(r)
    if any(r.spec.impl == "torchssl" for r in todo):
        from third_party.torchssl.checkout import ensure_checkout

        checkout = ensure_checkout(torchssl_source, cache_dir=cache_dir)  # None: $TORCHSSL_SOURCE, else GitHub
        extras["torchssl"] = {"torchssl_checkout": str(checkout)}
    for r in done:
        print(f"done already: {r.spec.name}")
    if not todo:
        return []
    if warmup:
        est = warmup_estimate(todo, data.data_dir, len(data.test_y), devices[0], extras)
        if est is not None:
            print(f"estimated time for {len(todo)} runs on {len(devices)} device(s): "
                  f"{est / len(devices) / 60:.1f} min")

    failed: list[PlannedRun] = []
    active: set[subprocess.Popen] = set()
    stopping = threading.Event()  # set on an interruption: no new run starts, running ones checkpoint
    lock = threading.Lock()
    queue = deque(todo)
    overall = tqdm(total=len(todo), desc="runs", position=0, unit="run", dynamic_ncols=True)

    def worker(device: str, slot: int) -> None:
        while True:
            with lock:
                if not queue or stopping.is_set():
                    return
                run = queue.popleft()
            prepare(run, data.data_dir, device, extras[run.spec.impl])
            bar = tqdm(total=run.spec.steps, desc=f"{run.spec.impl}/{run.spec.n_labels}/s{run.spec.seed}",
                       position=slot + 1, leave=False, unit="step", dynamic_ncols=True)
            with lock:
                if stopping.is_set():
                    bar.close()
                    return
                proc = launch(run)
                active.add(proc)
            run_progress = Progress(run)
            while proc.poll() is None:
                time.sleep(1.0)
                step, top1 = run_progress()
                bar.n = step
                bar.set_postfix_str(f"top1 {top1:.2f}%" if top1 is not None else "", refresh=False)
                bar.refresh()
            bar.close()
            with lock:
                active.discard(proc)
                finished = is_done(run)
                if stopping.is_set() and not finished:
                    tqdm.write(f"interrupted {run.spec.name}: it resumes from its checkpoint on the next call")
                elif proc.returncode != 0 or not finished:
                    failed.append(run)
                    tqdm.write(f"FAILED {run.spec.name} (exit {proc.returncode}); end of "
                               f"{run.run_dir / PROCESS_LOG}:\n{log_tail(run)}")
                else:
                    res = read_result(run.run_dir)
                    tqdm.write(f"finished {run.spec.name}: final top-1 {res['final_top1']:.2f}%, "
                               f"{res['steps_per_second']:.2f} steps/s")
                overall.update(1)

    threads = [threading.Thread(target=worker, args=(d, i), daemon=True) for i, d in enumerate(devices)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    finally:
        with lock:
            stopping.set()
            queue.clear()
            for proc in active:  # an interruption: each run checkpoints on SIGTERM and resumes next time
                proc.terminate()
        for proc in list(active):
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
        overall.close()
    return failed

