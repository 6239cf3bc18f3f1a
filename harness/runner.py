"""Scheduling: one subprocess per run in its run folder; skip finished runs, resume interrupted ones, keep going."""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from contract.results import LAUNCH_FILE, METRICS_FILE, read_metrics, read_result, write_json_atomic
from contract.spec import RunFiles, write_spec
from harness.env import PACKAGE_ROOT, code_version, machine_info
from harness.lifeline import clean_stale, die_with_parent, scratch_folder, wait_for_release
from harness.plan import PlannedRun
from harness.verify import finished

ENTRY = {"own": "own_impl.train", "torchssl": "third_party.torchssl.entry"}
PROCESS_LOG = "process.log"  # the subprocess's stdout and stderr; each implementation keeps its own log.txt


@dataclass(frozen=True)
class RunOptions:
    """How the planned runs execute (nothing here changes what they compute)."""

    devices: list[str]  # one run per device at a time
    torchssl_source: str | None = None  # where to clone TorchSSL from (None: $TORCHSSL_SOURCE, else GitHub)
    cache_dir: Path | None = None  # None: harness.env.default_cache_dir()
    warmup: bool = True  # time a few steps first and print an estimate of the total time
    compile_own: bool | None = None  # own_impl's torch.compile, asked for or left to its policy (None)
    torchssl_workers: int | None = None  # TorchSSL's DataLoader workers (None: its config's)
    slurm: object | None = None  # harness.slurm.SlurmOptions: each run a Slurm job (None: subprocesses here)


@dataclass(frozen=True)
class RunContext:
    """What every run's spec.json carries besides its spec, the same for all runs of one call."""

    data_dir: Path
    code_version: str
    data_source: str = ""
    compile_own: bool | None = None
    compile_binding: bool = True
    torchssl_workers: int | None = None
    torchssl_checkout: str | None = None


def is_done(run: PlannedRun) -> bool:
    return finished(run.run_dir, run.spec.hash())  # a damaged result.json or spec.json is named and set aside


def command(run: PlannedRun) -> list[str]:
    spec_path = run.run_dir / "spec.json"
    return [sys.executable, "-m", ENTRY[run.spec.impl], "--spec", str(spec_path), "--run-dir", str(run.run_dir)]


def prepare(run: PlannedRun, ctx: RunContext, device: str) -> None:
    """Write the run folder's spec.json: the spec, its inputs, the device, and how the implementation runs."""
    own, torchssl = run.spec.impl == "own", run.spec.impl == "torchssl"
    write_spec(run.run_dir, run.spec, RunFiles(
        data_dir=str(ctx.data_dir), split_file=str(run.split_file.resolve()), device=device,
        code_version=ctx.code_version, machine=machine_info(device), data_source=ctx.data_source,
        compile=ctx.compile_own if own else None, compile_binding=ctx.compile_binding,
        num_workers=ctx.torchssl_workers if torchssl else None,
        torchssl_checkout=ctx.torchssl_checkout if torchssl else None))


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: this project importable from any folder, output unbuffered."""
    path = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **extra}


def launch(run: PlannedRun, **popen) -> subprocess.Popen:
    """Start the run's entry point in its folder, output appended to its process.log; `popen`: more Popen options."""
    env = child_env()
    cmd = command(run)
    log = open(run.run_dir / PROCESS_LOG, "a")
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
    log.flush()
    return subprocess.Popen(cmd, cwd=run.run_dir, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, **{"preexec_fn": die_with_parent(), **popen})


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


def warmup_estimate(runs: list[PlannedRun], ctx: RunContext, n_test: int, device: str) -> float | None:
    """Time a few steps of each implementation at the planned batch sizes; return the estimated total seconds.
    `runs`: the runs still to do; `n_test`: the number of test images."""
    total = 0.0
    for impl, algorithm in sorted({(r.spec.impl, r.spec.algorithm) for r in runs}):
        mine = [r for r in runs if (r.spec.impl, r.spec.algorithm) == (impl, algorithm)]
        probe_steps = 8
        spec = dataclasses.replace(mine[0].spec, steps=probe_steps, eval_every=probe_steps,
                                   checkpoint_every=probe_steps, log_every=1)
        with scratch_folder(warmup_root(runs), f"{impl}-{algorithm}-") as tmp:  # removed on every exit, or by the next call
            probe = PlannedRun(spec, Path(tmp) / "run", mine[0].split_file)
            prepare(probe, ctx, device)
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
                print(f"warm-up of {impl} {algorithm} failed (exit {code}):\n{log_tail(probe)}", file=sys.stderr)
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
            total += startup + (r.spec.steps - progress(r)[0]) / sps + n_evals * eval_seconds(r.spec)
        print(f"warm-up {impl} {algorithm}: {sps:.2f} steps/s, {startup:.0f} s start-up per run")
    return total


def warmup_root(runs: list[PlannedRun]) -> Path:
    """OUT/.warmup: the warm-up probes' scratch folders (plan_runs puts runs in OUT/runs/<name>)."""
    return runs[0].run_dir.parent.parent / ".warmup"


def run_context(data, options: RunOptions, need_torchssl: bool, data_source: str = "") -> RunContext:
    """What spec.json files carry; the TorchSSL checkout is made (or found, verified) here if a run needs it."""
    checkout = None
    if need_torchssl:
        from harness.env import default_cache_dir
        from third_party.torchssl.checkout import ensure_checkout

        checkout = str(ensure_checkout(options.torchssl_source, cache_dir=options.cache_dir or default_cache_dir()))
    return RunContext(data_dir=Path(data.data_dir), code_version=code_version(), data_source=data_source,
                      compile_own=options.compile_own,
                      torchssl_workers=options.torchssl_workers, torchssl_checkout=checkout)


def execute(runs: list[PlannedRun], *, data, options: RunOptions, ctx: RunContext) -> list[PlannedRun]:
    """Run every planned run that is not done; return the ones that failed. ctx: run_context's."""
    done, todo = [], []
    for r in runs:
        (done if is_done(r) else todo).append(r)
    for r in done:
        print(f"done already: {r.spec.name}")
    if runs:
        clean_stale(warmup_root(runs))  # what a killed call's warm-up left
    if not todo:
        return []
    if options.slurm is not None:  # jobs on a cluster: nothing is timed on this machine
        from harness.slurm import SlurmScheduler

        return SlurmScheduler(todo, ctx, options.slurm).run()
    if options.warmup:
        est = warmup_estimate(todo, ctx, len(data.test_y), options.devices[0])
        if est is not None:
            print(f"estimated time for {len(todo)} runs on {len(options.devices)} device(s): "
                  f"{est / len(options.devices) / 60:.1f} min")
    return LocalScheduler(todo, ctx, options.devices).run()


class LocalScheduler:
    """One worker thread per device, each running one run's subprocess at a time, with progress bars. An
    interruption (Ctrl-C, SIGTERM) starts no new run and sends SIGTERM to the running ones, which checkpoint."""

    def __init__(self, runs: list[PlannedRun], ctx: RunContext, devices: list[str]):
        from tqdm import tqdm

        self.tqdm, self.ctx, self.devices = tqdm, ctx, devices
        self.queue = deque(runs)
        self.failed: list[PlannedRun] = []
        self.active: set[subprocess.Popen] = set()
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.overall = tqdm(total=len(runs), desc="runs", position=0, unit="run", dynamic_ncols=True)

    def run(self) -> list[PlannedRun]:
        threads = [threading.Thread(target=self._worker, args=(d, i), daemon=True)
                   for i, d in enumerate(self.devices)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.5)
        finally:
            self._stop_all()
            self.overall.close()
        return self.failed

    def _worker(self, device: str, slot: int) -> None:
        while True:
            with self.lock:
                if not self.queue or self.stopping.is_set():
                    return
                run = self.queue.popleft()
            wait_for_release(run.run_dir)  # a killed call's child may still be checkpointing there
            prepare(run, self.ctx, device)
            write_json_atomic(run.run_dir / LAUNCH_FILE, {"launcher": "local"})
            with self.lock:
                if self.stopping.is_set():
                    return
                proc = launch(run)
                self.active.add(proc)
            self._watch(run, proc, slot)
            with self.lock:
                self.active.discard(proc)
                self._report(run, proc)

    def _watch(self, run: PlannedRun, proc: subprocess.Popen, slot: int) -> None:
        """A progress bar of the run's steps and last top-1, from its metrics.jsonl, until its process ends."""
        bar = self.tqdm(total=run.spec.steps, desc=f"{run.spec.algorithm}/{run.spec.impl}/{run.spec.n_labels}/"
                                                   f"s{run.spec.seed}",
                        position=slot + 1, leave=False, unit="step", dynamic_ncols=True)
        read = Progress(run)
        while proc.poll() is None:
            time.sleep(1.0)
            step, top1 = read()
            bar.n = step
            bar.set_postfix_str(f"top1 {top1:.2f}%" if top1 is not None else "", refresh=False)
            bar.refresh()
        bar.close()

    def _report(self, run: PlannedRun, proc: subprocess.Popen) -> None:
        finished = is_done(run)
        if self.stopping.is_set() and not finished:
            self.tqdm.write(f"interrupted {run.spec.name}: it resumes from its checkpoint on the next call")
        elif proc.returncode != 0 or not finished:
            self.failed.append(run)
            self.tqdm.write(f"FAILED {run.spec.name} (exit {proc.returncode}); end of "
                            f"{run.run_dir / PROCESS_LOG}:\n{log_tail(run)}")
        else:
            res = read_result(run.run_dir)
            self.tqdm.write(f"finished {run.spec.name}: final top-1 {res['final_top1']:.2f}%, "
                            f"{res['steps_per_second']:.2f} steps/s")
        self.overall.update(1)

    def _stop_all(self) -> None:
        with self.lock:
            self.stopping.set()
            self.queue.clear()
            for proc in self.active:  # an interruption: each run checkpoints on SIGTERM and resumes next time
                proc.terminate()
        for proc in list(self.active):
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
