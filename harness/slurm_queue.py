"""What Slurm's queue and a run folder's launch record say of a run's job: squeue states, the launch record
(RUN/launch.json: job ids, requeues) and its lock. Read by the Slurm launcher, the job itself and --status."""
from __future__ import annotations

import fcntl
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from contract.results import LAUNCH_FILE, read_json, write_json_atomic

# squeue's job states: every state not listed here is a job still in the queue (pending, running, completing,
# being requeued, suspended, held).
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}

class SlurmError(ValueError):
    """Slurm cannot take the jobs as asked (unreachable, unknown partition, submission refused): one line."""


def slurm_command(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """A Slurm client command, captured; a missing one is one line."""
    if shutil.which(argv[0]) is None:
        raise SlurmError(f"--launcher slurm: no Slurm here ({argv[0]} is not on PATH); run from a machine that "
                         f"submits to the cluster, or try scripts/local_slurm.sh start")
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(argv)} did not answer in {timeout:.0f} s: is the Slurm controller up?") from None


def first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def job_states(job_ids: list[str]) -> dict[str, tuple[str, str, int]]:
    """{job id: (state, reason, requeues)} for the ids squeue still knows (a job ended more than MinJobAge ago,
    5 min by default, is gone). One squeue call; a controller that does not answer raises SlurmError."""
    if not job_ids:
        return {}
    r = slurm_command("squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-O",
                      "JobID:|,State:|,Reason:|,RestartCnt:")
    if r.returncode != 0:
        if "Invalid job id" in r.stderr:  # every id is gone
            return {}
        raise SlurmError(f"squeue failed: {first_line(r.stderr) or f'exit {r.returncode}'}")
    states = {}
    for line in r.stdout.splitlines():
        fields = [x.strip() for x in line.split("|")]
        if len(fields) >= 4 and fields[0]:
            states[fields[0]] = (fields[1], fields[2], int(fields[3]) if fields[3].isdigit() else 0)
    return states


def plural(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def is_active(state: tuple[str, str, int] | None) -> bool:
    return state is not None and state[0] not in ENDED


@contextmanager
def locked(run_dir: Path, name: str = ".launch.lock"):
    """An exclusive lock on RUN/`name`: the launch record is written by the launcher (at submission) and by the job
    (at each start); submissions take another lock, so that two calls at once submit a run once."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / name, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def update_launch(run_dir: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Read RUN/launch.json, apply `change` to it, write it back atomically; return it. A record another launcher
    wrote (e.g. {"launcher": "local"}) starts a fresh Slurm record."""
    path = Path(run_dir) / LAUNCH_FILE
    with locked(run_dir):
        record = read_json(path, "launch file") if path.exists() else {}
        if record.get("launcher") != "slurm":
            record = {"launcher": "slurm", "job_ids": [], "jobs": {}}
        change(record)
        write_json_atomic(path, record)
    return record


def read_slurm_launch(run_dir: Path) -> dict[str, Any] | None:
    """The run's Slurm launch record, or None if it has none (never submitted, or last started by another
    launcher). Keys: job_ids (oldest first), jobs {id: {submitted, requeues}}, max_requeues."""
    path = Path(run_dir) / LAUNCH_FILE
    try:
        record = read_json(path, "launch file")
    except FileNotFoundError:
        return None
    return record if record.get("launcher") == "slurm" else None


def last_job(run_dir: Path) -> str | None:
    record = read_slurm_launch(run_dir)
    return record["job_ids"][-1] if record and record.get("job_ids") else None


def cancelled(job_id: str) -> bool:
    """The job is being cancelled (`scancel` without --signal: it ends whatever the run does), as opposed to a
    signal only (`scancel --signal`, pre-emption) or its time limit (Reason=TimeLimit)."""
    r = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-O", "State:|,Reason:|"], capture_output=True,
                       text=True)
    state, _, reason = r.stdout.strip().partition("|")
    return state == "CANCELLED" or (state == "COMPLETING" and reason.strip("|") == "None")
