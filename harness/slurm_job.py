"""What runs inside a Slurm job: the local runner's command for one run, requeued (a bounded number of times) when
its time limit nears, it is pre-empted or it gets SIGTERM.

submitit pickles a RunJob at submission and calls it in the job. The run's entry point is started exactly as the
local runner starts it (harness.runner.launch: same command, run folder, process.log); it checkpoints on SIGTERM,
exits 143 and resumes from its checkpoint when started again, so a requeue is a resume. Two ways end in a requeue:

- SIGUSR2, which Slurm sends 90 s before the time limit (submitit's `--signal=USR2@90`): submitit calls
  `checkpoint()`, which sends SIGTERM to the entry point, waits for its checkpoint and hands submitit a fresh
  RunJob; submitit requeues the job.
- SIGTERM reaching the entry point directly (pre-emption, `scancel --signal=TERM`, the time limit itself): it exits
  143 and `__call__` requeues the job with `scontrol requeue`.

A requeued job keeps its id; Slurm counts its starts in SLURM_RESTART_COUNT, which bounds the requeues for both ways
(submitit's own bound counts time-outs only) and is written to RUN/launch.json at every start, so that result.json
carries it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable

import submitit

from harness.launch import PROCESS_LOG, launch, prepare
from harness.lifeline import die_with_parent
from harness.slurm_queue import cancelled, update_launch

STOPPED = (128 + signal.SIGTERM, -signal.SIGTERM)  # the entry's exit status after SIGTERM (checkpoint written), or
# its death by SIGTERM before it could install its handler (it resumes from its previous checkpoint)
CHECKPOINT_WAIT_S = 75  # seconds checkpoint() waits for the entry point: within the 90 s before the time limit


def restart_count() -> int:
    """How many times Slurm has requeued this job (SLURM_RESTART_COUNT is unset before the first requeue)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def _child_setup(parent_death) -> Callable[[], None]:
    """The entry point's preexec_fn. Slurm signals every process of the job step, and SIGUSR2's default action
    would kill it: an ignored signal stays ignored across exec. And it gets SIGTERM (and so checkpoints) if this
    wrapper dies (`parent_death`: harness.lifeline.die_with_parent()): without cgroups Slurm would lose track of an
    orphan."""
    def setup() -> None:
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        if parent_death is not None:
            parent_death()

    return setup


class RunJob(submitit.helpers.Checkpointable):
    """One run as one Slurm job: `run` a harness.plan.PlannedRun, `ctx` the RunFiles every run of the call shares
    (harness.launch.shared_files), `device` the job's torch device."""

    def __init__(self, run, ctx, device: str, max_requeues: int):
        self.run, self.ctx, self.device, self.max_requeues = run, ctx, device, max_requeues
        self._proc: subprocess.Popen | None = None
        self._got_term = False

    def __call__(self) -> None:
        job_id, restarts = os.environ["SLURM_JOB_ID"], restart_count()
        update_launch(self.run.run_dir, lambda r: _note_start(r, job_id, restarts))
        prepare(self.run, self.ctx, self.device)  # spec.json again, naming the machine the job runs on
        signal.signal(signal.SIGTERM, self._note_term)  # the entry point handles it; remember it came
        self._proc = launch(self.run, preexec_fn=_child_setup(die_with_parent()))
        code = self._proc.wait()
        if code == 0:
            return
        # A stop by SIGTERM, or any end after the job got one (TorchSSL's DataLoader workers die of it first, so the
        # run resumes from its last periodic checkpoint).
        if not (code in STOPPED or self._got_term):
            self._fail(f"exit {code}")
        again = "the next run_all.py call submits it again and it resumes"
        if cancelled(job_id):
            self._fail(f"cancelled (exit {code}); not requeued; {again}")
        if restarts >= self.max_requeues:
            self._fail(f"stopped (exit {code}) after {restarts} requeues, the most allowed (--max-requeues "
                       f"{self.max_requeues}); {again}")
        requeued = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        if requeued.returncode != 0:
            self._fail(f"stopped (exit {code}); not requeued: {requeued.stderr.strip() or 'scontrol failed'}; {again}")
        self._note(f"job {job_id}: stopped (exit {code}); requeued ({restarts + 1} of at most {self.max_requeues}), "
                   f"it resumes from its checkpoint")
        sys.exit(1)  # not an Exception: submitit writes no result, the job is not over

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        """submitit's SIGUSR2 handler (the time limit is 90 s away, or the job is pre-empted): stop the entry point
        (it checkpoints) and return what the requeued job runs, or None to end the job."""
        code = self._stop_child()
        restarts = restart_count()
        if code == 0:
            return None  # the run finished as the signal came: nothing to resume
        if restarts >= self.max_requeues:
            self._note(f"job {os.environ.get('SLURM_JOB_ID')}: time limit or pre-emption after {restarts} requeues, "
                       f"the most allowed (--max-requeues {self.max_requeues}); not requeued; the next run_all.py call "
                       f"submits it again and it resumes")
            return None
        self._note(f"job {os.environ.get('SLURM_JOB_ID')}: time limit or pre-emption (SIGUSR2); requeued "
                   f"({restarts + 1} of at most {self.max_requeues}), it resumes from its checkpoint")
        return submitit.helpers.DelayedSubmission(RunJob(self.run, self.ctx, self.device, self.max_requeues))

    def _stop_child(self) -> int | None:
        """SIGTERM to the entry point, then its exit status once it has ended (None: still running after
        CHECKPOINT_WAIT_S). This runs inside a signal handler that interrupted Popen.wait() in __call__, which
        holds Popen's lock: Popen.wait() here would deadlock, so the child is polled with WNOWAIT and left for
        that wait() to reap."""
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is not None:
            return proc.returncode
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + CHECKPOINT_WAIT_S
        while time.monotonic() < deadline:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if info is not None:
                return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
            time.sleep(0.1)
        return None

    def _note_term(self, signum, frame) -> None:
        self._got_term = True

    def _note(self, message: str) -> None:
        """A line in the run's process.log, where the local runner writes its own, and in the job's output."""
        line = f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        print(line, flush=True)
        with open(self.run.run_dir / PROCESS_LOG, "a") as f:
            f.write(line + "\n")

    def _fail(self, why: str) -> None:
        self._note(f"job {os.environ.get('SLURM_JOB_ID')}: {why}")
        raise RuntimeError(f"run {self.run.spec.name}: {why}")

    def __getstate__(self) -> dict[str, Any]:  # submitit pickles the job at submission and at checkpoint()
        return {"run": self.run, "ctx": self.ctx, "device": self.device, "max_requeues": self.max_requeues}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)


def _note_start(record: dict[str, Any], job_id: str, restarts: int) -> None:
    if job_id not in record["job_ids"]:  # started before the launcher recorded it
        record["job_ids"].append(job_id)
    record["jobs"].setdefault(job_id, {})["requeues"] = restarts
