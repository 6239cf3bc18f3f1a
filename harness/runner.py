"""The local launcher: one subprocess per run on this machine (one run per device at a time) with progress bars, and
the warm-up that times a few steps of each implementation for an estimate of the whole call."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from contract.results import LAUNCH_FILE, MetricsTail, Progress, latest_progress, read_metrics, read_result, \
    write_json_atomic
from contract.spec import RunFiles
from harness.launch import PROCESS_LOG, is_done, launch, log_tail, prepare
from harness.lifeline import scratch_folder, wait_for_release
from harness.plan import PlannedRun

STOP_WAIT_S = 120  # how long an interrupted call waits for each run's checkpoint before killing it


def warmup_estimate(runs: list[PlannedRun], shared: RunFiles, n_test: int, device: str) -> float | None:
    """Time a few steps of each implementation at the planned batch sizes; return the estimated total seconds.
    `runs`: the runs still to do; `n_test`: the number of test images."""
    total = 0.0
    for impl, algorithm in sorted({(r.spec.impl, r.spec.algorithm) for r in runs}):
        mine = [r for r in runs if (r.spec.impl, r.spec.algorithm) == (impl, algorithm)]
        probe_steps = 8
        spec = dataclasses.replace(mine[0].spec, steps=probe_steps, eval_every=probe_steps,
                                   checkpoint_every=probe_steps, log_every=1)
        # the scratch folder is removed on every exit, or by the next call
        with scratch_folder(warmup_root(runs), f"{impl}-{algorithm}-") as tmp:
            probe = PlannedRun(spec, Path(tmp) / "run", mine[0].split_file)
            prepare(probe, shared, device)
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
                print(f"warm-up of {impl} {algorithm} failed (exit {code}):\n{log_tail(probe.run_dir)}",
                      file=sys.stderr)
                return None
            # Steady-state speed: the median step time after the first two (cuDNN autotuning, loader start-up).
            marks = [r["train_seconds"] for r in read_metrics(probe.run_dir) if r.get("kind") == "train"]
            per_step = [b - a for a, b in zip(marks[2:], marks[3:])]
        sps = 1.0 / statistics.median(per_step) if per_step else result["steps_per_second"]

        def eval_seconds(s) -> float:  # a forward pass costs about a third of a training step's per image
            images = s.eval_subset or n_test
            return images / (3 * s.images_per_step * sps)

        startup = max(wall - probe_steps / sps - eval_seconds(spec), 0.0)
        for r in mine:
            n_evals = -(-r.spec.steps // r.spec.eval_every)
            total += startup + (r.spec.steps - latest_progress(r.run_dir).step) / sps + n_evals * eval_seconds(r.spec)
        print(f"warm-up {impl} {algorithm}: {sps:.2f} steps/s, {startup:.0f} s start-up per run")
    return total


def warmup_root(runs: list[PlannedRun]) -> Path:
    """OUT/.warmup: the warm-up probes' scratch folders (plan_runs puts runs in OUT/runs/<name>)."""
    return runs[0].run_dir.parent.parent / ".warmup"


class LocalScheduler:
    """One worker thread per device, each running one run's subprocess at a time, with progress bars. An
    interruption (Ctrl-C, SIGTERM) starts no new run and sends SIGTERM to the running ones, which checkpoint."""

    def __init__(self, runs: list[PlannedRun], shared: RunFiles, devices: list[str]):
        from tqdm import tqdm

        self.tqdm, self.shared, self.devices = tqdm, shared, devices
        self.queue = deque(runs)
        self.failed: list[PlannedRun] = []
        self.active: set[subprocess.Popen] = set()
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.overall = tqdm(total=len(runs), desc="runs", position=0, unit="run", dynamic_ncols=True)

    def run(self) -> list[PlannedRun]:
        threads = [threading.Thread(target=self._worker, args=(d, i), daemon=True)
                   for i, d in enumerate(self.devices)]
        previous = signal.signal(signal.SIGTSTP, self._suspend)  # Ctrl-Z stops the runs too: they are not ours
        try:  # to stop otherwise (they run in their own sessions, so the terminal's signal misses them)
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.5)
        finally:
            signal.signal(signal.SIGTSTP, previous)
            self._stop_all()
            self.overall.close()
        return self.failed

    def _worker(self, device: str, slot: int) -> None:
        while True:
            with self.lock:
                if not self.queue or self.stopping.is_set():
                    return
                run = self.queue.popleft()
            try:
                wait_for_release(run.run_dir)  # a killed call's child may still be checkpointing there
                prepare(run, self.shared, device)
                write_json_atomic(run.run_dir / LAUNCH_FILE, {"launcher": "local"})
                with self.lock:
                    if self.stopping.is_set():
                        return
                    proc = launch(run)
                    self.active.add(proc)
            except Exception as e:  # a run that cannot start (a full disk, a read-only folder) is a failed run
                with self.lock:
                    self.failed.append(run)
                    self.tqdm.write(f"FAILED {run.spec.name}: it could not start: {e}")
                    self.overall.update(1)
                continue
            self._watch(run, proc, slot)
            with self.lock:
                self.active.discard(proc)
                self._report(run, proc)

    def _watch(self, run: PlannedRun, proc: subprocess.Popen, slot: int) -> None:
        """A progress bar of the run's steps and last top-1, from its metrics.jsonl, until its process ends."""
        bar = self.tqdm(total=run.spec.steps, desc=f"{run.spec.algorithm}/{run.spec.impl}/{run.spec.n_labels}/"
                                                   f"s{run.spec.seed}",
                        position=slot + 1, leave=False, unit="step", dynamic_ncols=True)
        tail, progress = MetricsTail(run.run_dir), Progress()
        while proc.poll() is None:
            time.sleep(1.0)
            progress.add(tail.read())
            bar.n = progress.step
            bar.set_postfix_str(f"top1 {progress.top1:.2f}%" if progress.top1 is not None else "", refresh=False)
            bar.refresh()
        bar.close()

    def _report(self, run: PlannedRun, proc: subprocess.Popen) -> None:
        finished = is_done(run)
        if self.stopping.is_set() and not finished:
            self.tqdm.write(f"interrupted {run.spec.name}: it resumes from its checkpoint on the next call")
        elif proc.returncode != 0 or not finished:
            self.failed.append(run)
            self.tqdm.write(f"FAILED {run.spec.name} (exit {proc.returncode}); end of "
                            f"{run.run_dir / PROCESS_LOG}:\n{log_tail(run.run_dir)}")
        else:
            res = read_result(run.run_dir)
            self.tqdm.write(f"finished {run.spec.name}: final top-1 {res['final_top1']:.2f}%, "
                            f"{res['steps_per_second']:.2f} steps/s")
        self.overall.update(1)

    def _stop_all(self) -> None:
        """Stop the runs still going and wait for their checkpoints (at most STOP_WAIT_S each); further interrupts
        meanwhile are answered with a line, not obeyed: only SIGKILL makes a run lose its steps since its last
        checkpoint."""
        with self.lock:
            self.stopping.set()
            self.queue.clear()
            active = list(self.active)
            for proc in active:  # an interruption: each run checkpoints on SIGTERM and resumes next time
                proc.terminate()
        if not active:
            return

        def patience(signum, frame) -> None:
            print(f"still waiting for {len(active)} run(s) to write their checkpoint (at most {STOP_WAIT_S} s); "
                  f"kill -9 would lose their steps since the last one", file=sys.stderr)

        saved = {s: signal.signal(s, patience) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            for proc in active:
                try:
                    proc.wait(timeout=STOP_WAIT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
        finally:
            for s, handler in saved.items():
                signal.signal(s, handler)

    def _suspend(self, signum, frame) -> None:
        """SIGTSTP (Ctrl-Z): stop every run's process group, then this process; on SIGCONT, continue them."""
        with self.lock:
            groups = [p.pid for p in self.active]
        for pid in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGSTOP)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # stops here until SIGCONT
        signal.signal(signal.SIGTSTP, self._suspend)
        for pid in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGCONT)
