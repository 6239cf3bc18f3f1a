"""The Slurm launcher: one submitit job per run, its id kept in the run folder, and the wait that shows every run's
state until its job ends.

A job runs the command the local runner runs, in the same run folder (harness/slurm_job.py); the run folder stays
the only contract, so a run can be started by one launcher and finished by the other. Job states come from `squeue`
(submitit's own state needs Slurm's accounting database, which many clusters lack); a run's outcome comes from its
files, as for local runs.
"""
from __future__ import annotations

import contextlib
import io
import shlex
import sys
import time

from contract.spec import RunFiles
from harness.env import PACKAGE_ROOT
from harness.launch import prepare
from harness.plan import PlannedRun
from harness.slurm_options import SlurmOptions
from harness.slurm_queue import (SlurmError, first_line, is_active, job_states, last_job, locked, plural,
                                 update_launch)
from harness.status import RunView

RESULT_GRACE_S = 60  # seconds a completed job's result.json may take to show here (NFS caches attributes up to 60 s)


def executor_parameters(run: PlannedRun, opts: SlurmOptions) -> dict:
    """submitit SlurmExecutor parameters of one run's job."""
    extra: dict[str, str | bool] = {"requeue": True}  # requeueable even where the cluster's default says not
    if opts.mem is not None:  # as given: submitit's own mem parameter takes GB as a number
        extra["mem"] = opts.mem
    params = dict(job_name=run.spec.name, partition=opts.partition, time=opts.time_min,
                  cpus_per_task=opts.cpus, gpus_per_node=opts.gpus or None, account=opts.account, qos=opts.qos,
                  # the job's Python imports this project (RunJob is unpickled by reference) from any folder
                  setup=[f"export PYTHONPATH={shlex.quote(str(PACKAGE_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"],
                  additional_parameters={**extra, **opts.sbatch})
    return {k: v for k, v in params.items() if v is not None}


def submit(run: PlannedRun, ctx: RunFiles, opts: SlurmOptions) -> str:
    """Write the run's spec.json (so that --status sees a queued run; the job writes it again on its node, naming
    that machine), submit the job, record its id in RUN/launch.json; return the id."""
    import submitit

    from harness.slurm_job import RunJob  # imports submitit, which only Slurm runs need

    prepare(run, ctx, opts.device)
    # submitit's own count of time-outs must never end a job before max_requeues does (RunJob's bound)
    executor = submitit.SlurmExecutor(folder=run.run_dir / "slurm" / "%j", max_num_timeout=opts.max_requeues + 1)
    executor.update_parameters(**executor_parameters(run, opts))
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's complaint too: one line is ours
            job = executor.submit(RunJob(run, ctx, opts.device, opts.max_requeues))
    except submitit.core.utils.FailedJobError as e:
        said = [line for line in str(e).splitlines() if "error" in line.lower()]
        raise SlurmError(f"sbatch refused the job of {run.spec.name}: "
                         f"{said[-1].strip() if said else first_line(str(e))}") from None
    job_id = str(job.job_id)

    def note(record: dict) -> None:
        if job_id not in record["job_ids"]:
            record["job_ids"].append(job_id)
        record["jobs"].setdefault(job_id, {}).update(submitted=time.strftime("%Y-%m-%dT%H:%M:%S"))
        record["max_requeues"] = opts.max_requeues

    update_launch(run.run_dir, note)
    return job_id


class SlurmScheduler:
    """Each run one Slurm job: a run whose job is still queued or running is followed, never submitted again; at
    most max_jobs are in the queue at once. Waits (unless options.wait is false) printing each run's state as it
    changes, and running runs' progress. .run() returns the runs that failed (none when it does not wait)."""

    def __init__(self, runs: list[PlannedRun], ctx: RunFiles, options: SlurmOptions):
        self.ctx, self.opts = ctx, options
        self.todo = list(runs)
        self.active: dict[str, RunView] = {}  # job id -> the run it runs
        self.views = {r.run_dir: RunView(r.run_dir, r.spec) for r in runs}
        self.failed: list[PlannedRun] = []
        self.runs = {r.run_dir: r for r in runs}
        self.ended_at: dict[str, float] = {}  # job id -> when it was first seen ended (time.monotonic())

    def run(self) -> list[PlannedRun]:
        self._follow_queued()
        try:
            while True:
                self._submit_while_room()
                if not self.opts.wait or not self.active:
                    break
                time.sleep(self.opts.poll_s)
                self._poll()
        except KeyboardInterrupt:
            if self.active:
                print(f"the {plural(len(self.active), 'job')} submitted keep running on the cluster: `--status` "
                      f"shows them, `scancel JOBID` stops one (it resumes when submitted again)", file=sys.stderr)
            raise
        if not self.opts.wait:
            queued = f"{plural(len(self.active), 'job')} queued or running"
            later = f"; {plural(len(self.todo), 'run')} not submitted (--max-jobs {self.opts.max_jobs}): call " \
                f"again to submit more" if self.todo else ""
            print(f"{queued}{later}; `--status` shows their state, `--report-only` reports what has finished")
        return self.failed

    def _follow_queued(self) -> None:
        """Runs whose last job is still in the queue (a call before this one submitted it): follow that job."""
        last = {r.run_dir: last_job(r.run_dir) for r in self.todo}
        states = job_states([j for j in last.values() if j])
        for r in list(self.todo):
            job = last[r.run_dir]
            if is_active(states.get(job)):
                self.todo.remove(r)
                self.active[job] = view = self.views[r.run_dir]
                view.seen = states[job]
                print(view.line(job, states[job], "already queued"))

    def _submit_while_room(self) -> None:
        while self.todo and (self.opts.max_jobs is None or len(self.active) < self.opts.max_jobs):
            run = self.todo.pop(0)
            with locked(run.run_dir, ".submit.lock"):  # two calls at once submit a run once
                job = last_job(run.run_dir)
                state = job_states([job]).get(job) if job else None
                if is_active(state):
                    print(self.views[run.run_dir].line(job, state, "already queued"))
                else:
                    job = submit(run, self.ctx, self.opts)
                    state = ("SUBMITTED", "", 0)
                    print(self.views[run.run_dir].line(job, state))
            self.active[job] = self.views[run.run_dir]
            self.views[run.run_dir].seen = state

    def _poll(self) -> None:
        try:
            states = job_states(list(self.active))
        except SlurmError as e:  # the controller may be restarting: the jobs go on, ask again next time
            print(f"(state unknown for now: {e})", file=sys.stderr)
            return
        for job, view in list(self.active.items()):
            state = states.get(job)
            if is_active(state):
                if view.changed(state):
                    print(view.line(job, state))
                continue
            # A job that completed wrote its result, which a network filesystem may show here a little later.
            ended_at = self.ended_at.setdefault(job, time.monotonic())
            if not view.done() and (state is None or state[0] == "COMPLETED") and \
                    time.monotonic() - ended_at < RESULT_GRACE_S:
                continue
            del self.active[job]
            print(view.line(job, state, ended=True))
            if not view.done():
                self.failed.append(self.runs[view.run_dir])
