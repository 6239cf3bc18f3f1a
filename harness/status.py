"""The state of runs, read from their folders and from squeue: `run_all.py --status`, and the lines the Slurm launcher
prints while it waits (pending, running with step and ETA, done, failed with the end of its log)."""
from __future__ import annotations

import time
from collections import Counter, deque
from pathlib import Path

from contract.results import METRICS_FILE, latest_progress, read_launch, read_result
from contract.spec import SPEC_FILE, read_spec
from harness.launch import PROCESS_LOG
from harness.slurm_queue import SlurmError, is_active, job_states, last_job

PROGRESS_EVERY_S = 30  # while waiting, a running run's progress is printed at most this often (seconds)


def clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def file_tail(path: Path, lines: int) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n") for line in deque(f, maxlen=lines)]
    except FileNotFoundError:
        return []


class RunView:
    """One run's state as shown to the user: its folder and spec, its Slurm job's squeue state (state, reason,
    requeues) if it has one, and the last state printed (to print only changes)."""

    def __init__(self, run_dir: Path, spec):
        self.run_dir, self.spec = Path(run_dir), spec
        self.seen: tuple[str, str, int] | None = None
        self.step_shown, self.shown_at = -1, 0.0

    def done(self) -> bool:
        result = read_result(self.run_dir)
        return result is not None and result.get("spec_hash") == self.spec.hash()

    def progress(self, eta: bool = True) -> str:
        p = latest_progress(self.run_dir)
        text = f"step {p.step}/{self.spec.steps}"
        if p.top1 is not None:
            text += f", top-1 {p.top1:.2f}%"
        if eta and p.train_seconds and p.step and p.step < self.spec.steps:  # at the training speed so far
            text += f", ETA {clock((self.spec.steps - p.step) * p.train_seconds / p.step)}"
        return text

    def changed(self, state: tuple[str, str, int]) -> bool:
        """A new queue state, or (at most every PROGRESS_EVERY_S) new steps of a running run."""
        if state != self.seen:
            self.seen = state
            return True
        step = latest_progress(self.run_dir).step
        if state[0] == "RUNNING" and step != self.step_shown and time.monotonic() - self.shown_at >= PROGRESS_EVERY_S:
            return True
        return False

    def line(self, job: str, state: tuple[str, str, int] | None, note: str = "", ended: bool = False,
             log_lines: int = 15) -> str:
        """`name  job N: what it is doing` for a queued job; for an ended one, done or FAILED with the end of its
        logs."""
        head = f"{self.spec.name}  job {job}: "
        if ended:
            if self.done():
                return head + self.finished()
            how = "ended without a result (the job has left the queue)" if state is None else \
                "cancelled" if state[0] == "CANCELLED" else f"FAILED (ended {state[0]})"
            return head + f"{how} at {self.progress(eta=False)}; the next call submits it again and it resumes\n" + \
                self.log_end(job, log_lines)
        name, reason, requeues = state
        self.step_shown, self.shown_at = latest_progress(self.run_dir).step, time.monotonic()
        detail = f" ({reason})" if reason not in ("", "None") else ""
        what = {"PENDING": f"pending ({reason})", "RUNNING": f"running, {self.progress()}",
                "SUBMITTED": "submitted"}.get(name, name.lower() + detail)
        if requeues:
            what += f"; requeued {requeues}x"
        return head + what + (f" [{note}]" if note else "")

    def finished(self) -> str:
        res = read_result(self.run_dir)
        return f"done: final top-1 {res['final_top1']:.2f}%, {res['steps']} steps"

    def log_end(self, job: str | None, lines: int) -> str:
        """The end of the run's process.log and of its job's error log, indented."""
        parts = [f"  end of {self.run_dir / PROCESS_LOG}:"] + [f"    {x}" for x in file_tail(
            self.run_dir / PROCESS_LOG, lines)]
        if job:
            err = self.run_dir / "slurm" / job / f"{job}_0_log.err"
            tail = [x for x in file_tail(err, 200) if x.strip()][-min(lines, 5):]
            if tail:
                parts += [f"  end of {err}:"] + [f"    {x}" for x in tail]
        return "\n".join(parts)

    def status(self, job: str | None, state: tuple[str, str, int] | None, unknown: str | None) -> tuple[str, str]:
        """(kind, line) for --status: kind is done, queued, running, failed, cancelled, ended (without a result,
        the job gone from the queue), unfinished, unknown or new."""
        if self.done():
            return "done", f"{self.spec.name}  " + self.finished() + (f" (job {job})" if job else " (local)")
        if job is None:
            step = latest_progress(self.run_dir).step
            if step == 0:
                return "new", f"{self.spec.name}  not started"
            metrics = self.run_dir / METRICS_FILE
            age = time.time() - metrics.stat().st_mtime if metrics.exists() else None
            when = ("at an unknown time" if age is None else f"{clock(age)} ago" if age >= 0 else
                    "just now (the file's time is ahead of this machine's clock)")
            return "unfinished", (f"{self.spec.name}  unfinished ({read_launch(self.run_dir)['launcher']}): "
                                  f"{self.progress()}, last logged {when}; the next call resumes it")
        if unknown is not None:
            return "unknown", f"{self.spec.name}  job {job}: state unknown ({unknown}); {self.progress()}"
        if is_active(state):
            return ("running" if state[0] == "RUNNING" else "queued"), self.line(job, state)
        kind = "ended" if state is None else "cancelled" if state[0] == "CANCELLED" else "failed"
        return kind, self.line(job, state, ended=True, log_lines=3)


def print_status(out: Path) -> int:
    """One line per run folder under OUT/runs (and the end of the logs of failed ones), then a count by state."""
    runs_dir = Path(out) / "runs"
    folders = sorted(p.parent for p in runs_dir.glob(f"*/{SPEC_FILE}"))
    if not folders:
        print(f"no runs under {runs_dir}")
        return 0
    views = [RunView(p, read_spec(p / SPEC_FILE)[0]) for p in folders]
    jobs = {v.run_dir: last_job(v.run_dir) for v in views}
    states, unknown = {}, None
    try:
        states = job_states([j for j in jobs.values() if j])
    except SlurmError as e:
        unknown = str(e)
    kinds = Counter()
    for v in views:
        job = jobs[v.run_dir]
        kind, line = v.status(job, states.get(job), unknown if job else None)
        kinds[kind] += 1
        print(line)
    print(f"{len(views)} run{'s' if len(views) != 1 else ''}: " + ", ".join(f"{n} {k}" for k, n in kinds.most_common()))
    return 0
