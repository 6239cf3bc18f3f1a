"""The Slurm launcher: its flags and their checks (one line each, before any job is submitted), one submitit job per
run with its ids kept in the run folder, and the wait that shows every run's state until its job ends.

A job runs the command the local runner runs, in the same run folder (harness/slurm_job.py); the run folder stays
the only contract, so a run can be started by one launcher and finished by the other. Job states come from `squeue`
(submitit's own state needs Slurm's accounting database, which many clusters lack); a run's outcome comes from its
files, as for local runs.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from contract.results import LAUNCH_FILE, read_json, write_json_atomic
from harness.env import PACKAGE_ROOT
from harness.plan import PlannedRun, UsageError

# squeue's job states: every state not listed here is a job still in the queue (pending, running, completing,
# being requeued, suspended, held).
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
# Folders every node has its own of, and filesystems that only this machine sees: a job writing there writes where
# this machine never looks.
LOCAL_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
LOCAL_FILESYSTEMS = {"tmpfs", "ramfs", "devtmpfs", "overlay", "aufs", "squashfs"}
# sbatch options the launcher sets itself: through its own flag, or never (they would break requeue or the logs).
OWN_FLAG = {"partition": "--partition", "p": "--partition", "account": "--account", "A": "--account",
            "qos": "--qos", "q": "--qos", "time": "--time", "t": "--time", "cpus-per-task": "--cpus-per-job",
            "c": "--cpus-per-job", "mem": "--mem", "gpus-per-node": "--gpus-per-job", "gres": "--gpus-per-job",
            "gpus": "--gpus-per-job", "G": "--gpus-per-job", "job-name": None, "J": None, "signal": None,
            "output": None, "o": None, "error": None, "e": None, "open-mode": None, "array": None,
            "no-requeue": None, "requeue": None}
SLURM_FLAGS = ("partition", "account", "qos", "time", "gpus_per_job", "cpus_per_job", "mem", "sbatch", "max_jobs",
               "max_requeues", "no_wait", "allow_local_out")
DEFAULT_MAX_REQUEUES = 3
# Shortest --time: a job is warned (SIGUSR2) 90 s before its limit, give or take Slurm's 60 s signal tick, and
# starting a run takes seconds to a minute; a shorter limit would requeue a job before it makes progress.
MIN_TIME_MIN = 5
RESULT_GRACE_S = 60  # seconds a completed job's result.json may take to show here (NFS caches attributes up to 60 s)


class SlurmError(ValueError):
    """Slurm cannot take the jobs as asked (unreachable, unknown partition, submission refused): one line."""


@dataclass(frozen=True)
class SlurmOptions:
    """How each run's job is asked for; checked against the cluster by `slurm_options`."""

    device: str  # every job's torch device: "cuda" (the job's own GPUs) or "cpu"
    partition: str  # the partition the jobs go to
    time_min: int  # each job's time limit in minutes; 0: none
    gpus: int = 0  # GPUs per job
    cpus: int | None = None  # CPUs per job (None: the cluster's default)
    mem: str | None = None  # memory per job in sbatch's format, e.g. 32G (None: the cluster's default)
    account: str | None = None
    qos: str | None = None
    sbatch: dict[str, str | bool] = field(default_factory=dict)  # more sbatch options; True: a bare flag
    max_jobs: int | None = None  # jobs queued or running at once (None: all)
    max_requeues: int = DEFAULT_MAX_REQUEUES  # per job
    wait: bool = True  # wait for the jobs, showing their state; else submit and return
    poll_s: float = 5.0  # seconds between two squeue calls while waiting


def add_flags(p) -> None:
    """The launcher's flags on run_all.py's parser."""
    p.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="where runs execute: subprocesses on this machine, or one Slurm job each (docs/slurm.md)")
    p.add_argument("--status", action="store_true",
                   help="print the state of every run under --out (done, queued, running, failed, ...) and exit")
    g = p.add_argument_group("Slurm (with --launcher slurm; every value is checked before any job is submitted)")
    g.add_argument("--partition", help="partition for the jobs (default: the cluster's default partition)")
    g.add_argument("--account", help="account to charge the jobs to")
    g.add_argument("--qos", help="quality of service of the jobs")
    g.add_argument("--time", help="time limit per job: minutes, or D-HH:MM:SS (default: the partition's default); "
                                  "a run longer than that is requeued and resumes")
    g.add_argument("--gpus-per-job", type=int, default=None, help="GPUs per job (default: 1; 0 with --device cpu)")
    g.add_argument("--cpus-per-job", type=int, default=None, help="CPUs per job (default: the cluster's)")
    g.add_argument("--mem", help="memory per job, e.g. 32G (default: the cluster's)")
    g.add_argument("--sbatch", action="append", default=None, metavar="KEY=VALUE",
                   help="one more sbatch option, e.g. constraint=a100 or exclusive (repeatable)")
    g.add_argument("--max-jobs", type=int, default=None, help="most jobs queued or running at once (default: all)")
    g.add_argument("--max-requeues", type=int, default=None,
                   help=f"most times a job is requeued after a time limit or pre-emption "
                        f"(default: {DEFAULT_MAX_REQUEUES}); a later call submits the run again")
    g.add_argument("--no-wait", action="store_true", help="submit the jobs and return (see --status)")
    g.add_argument("--allow-local-out", action="store_true",
                   help="accept an --out or cache folder on storage that looks local to this machine (e.g. under "
                        "/tmp), when the nodes do see it, as on a one-machine cluster")


def slurm_options(args, out: Path, cache_dir: Path) -> SlurmOptions | None:
    """The launcher's options from the flags (None for the local launcher), every one checked, the cluster's last."""
    if args.launcher == "local":
        given = [f for f in SLURM_FLAGS if getattr(args, f) not in (None, False)]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} applies to Slurm jobs only; add --launcher slurm")
        return None
    if args.gpus:
        raise UsageError(f"--gpus {' '.join(map(str, args.gpus))} spreads runs over this machine's GPUs; with "
                         f"--launcher slurm each job gets its own: use --gpus-per-job")
    device, gpus = job_device(args.device, args.gpus_per_job)
    for flag, value, least in (("--cpus-per-job", args.cpus_per_job, 1), ("--max-jobs", args.max_jobs, 1),
                               ("--max-requeues", args.max_requeues, 0)):
        if value is not None and value < least:
            raise UsageError(f"{flag} {value} is not accepted; accepted: an integer >= {least}")
    if args.mem is not None and not re.fullmatch(r"[1-9][0-9]*[KMGT]?", args.mem):
        raise UsageError(f"--mem {args.mem!r} is not accepted; accepted: a positive integer with an optional unit "
                         f"K, M, G or T, e.g. 32G")
    time_min = parse_time(args.time, "--time") if args.time is not None else None
    if time_min is not None and 0 < time_min < MIN_TIME_MIN:
        raise UsageError(f"--time {args.time} is too short: a job is warned 90 s before its limit and a run takes up "
                         f"to a minute to start; accepted: {MIN_TIME_MIN} minutes or more, or 0 for no limit")
    sbatch = parse_sbatch(args.sbatch or [])
    if not args.allow_local_out:
        for what, path in (("--out", out), ("the cache folder (--cache-dir: decoded data, TorchSSL)", cache_dir)):
            problem = local_storage(path)
            if problem:
                raise UsageError(f"{what} {path} is {problem}: the jobs would write or read where the other nodes "
                                 f"do not; use a folder on shared storage, or --allow-local-out if every node sees "
                                 f"it (a one-machine cluster)")
    check_submitit()
    part = check_cluster(args.partition, gpus, args.cpus_per_job, args.mem, time_min)
    return SlurmOptions(device=device, partition=part.name, time_min=part.time_min if time_min is None else time_min,
                        gpus=gpus, cpus=args.cpus_per_job, mem=args.mem, account=args.account, qos=args.qos,
                        sbatch=sbatch, max_jobs=args.max_jobs,
                        max_requeues=DEFAULT_MAX_REQUEUES if args.max_requeues is None else args.max_requeues,
                        wait=not args.no_wait)


def job_device(device: str, gpus: int | None) -> tuple[str, int]:
    """(each job's torch device, GPUs per job) from --device and --gpus-per-job; the device is resolved on the job's
    node, not here (a login node often has no GPU)."""
    if device not in ("auto", "cpu", "cuda", "cuda:0"):
        raise UsageError(f"--device {device!r} is not accepted with --launcher slurm; accepted: auto, cpu, cuda "
                         f"(each job sees only its own GPUs)")
    if gpus is None:
        gpus = 0 if device == "cpu" else 1
    if gpus < 0:
        raise UsageError(f"--gpus-per-job {gpus} is not accepted; accepted: an integer >= 0")
    if device.startswith("cuda") and gpus == 0:
        raise UsageError(f"--device {device} needs a GPU per job; leave out --gpus-per-job 0 or use --device cpu")
    if device == "auto":
        return ("cuda" if gpus else "cpu"), gpus
    return ("cuda" if device.startswith("cuda") else "cpu"), gpus


def parse_time(text: str, what: str) -> int | None:
    """Slurm's time format (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes, seconds rounded up; None for
    "infinite"/"UNLIMITED"."""
    t = text.strip()
    if t.lower() in ("infinite", "unlimited"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", t)
    if not m:
        raise UsageError(f"{what} {text!r} is not accepted; accepted: minutes, or D-HH:MM:SS (also HH:MM:SS, MM:SS)")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-H[:M[:S]]
        hours, minutes, seconds = a, b or 0, c or 0
    elif c is not None:  # H:M:S
        hours, minutes, seconds = a, b, c
    else:  # M[:S]
        hours, minutes, seconds = 0, a, b or 0
    return ((days or 0) * 24 + hours) * 60 + minutes + (seconds > 0)


def format_minutes(minutes: int) -> str:
    if minutes == 0:
        return "none"
    days, rest = divmod(minutes, 24 * 60)
    return (f"{days}-" if days else "") + f"{rest // 60:02d}:{rest % 60:02d}:00"


def parse_sbatch(items: list[str]) -> dict[str, str | bool]:
    """--sbatch KEY=VALUE (or a bare KEY for a flag such as exclusive) as submitit's additional parameters."""
    out: dict[str, str | bool] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().lstrip("-").replace("_", "-")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", key) or (eq and not value):
            raise UsageError(f"--sbatch {item!r} is not accepted; accepted: KEY=VALUE with an sbatch option name, "
                             f"e.g. constraint=a100, or a bare flag such as exclusive")
        if key in OWN_FLAG:
            use = OWN_FLAG[key]
            raise UsageError(f"--sbatch {item!r}: " + (f"use {use}" if use else
                                                        "the launcher sets this option itself (needed for requeue "
                                                        "and the logs)"))
        out[key] = value if eq else True
    return out


def local_storage(path: Path) -> str | None:
    """Why `path` looks local to this machine (under /tmp, on tmpfs, ...), or None. The filesystem is that of the
    deepest mount point holding the path (/proc/mounts)."""
    real = os.path.realpath(path)
    for d in LOCAL_DIRS:
        if real == d or real.startswith(d + "/"):
            return f"under {d}, which every node has its own of"
    best, fstype = "", None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, fstype = mount, parts[2]
    except OSError:  # no /proc: nothing more can be told
        return None
    if fstype in LOCAL_FILESYSTEMS:
        return f"on a {fstype} filesystem ({best}), which only this machine sees"
    return None


def check_submitit() -> None:
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UsageError("--launcher slurm needs submitit: pip install 'fixmatch-bench[slurm]' "
                         "(or pip install submitit)") from None


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


@dataclass(frozen=True)
class Partition:
    name: str
    time_min: int  # the time limit a job gets without --time: its default, else its maximum; 0: none
    max_min: int | None  # its maximum time limit (None: none)
    cpus: int  # CPUs of its largest node
    mem_mb: int  # memory of its largest node, MB
    gpus: bool  # some node has GPUs (a gpu GRES)


def check_cluster(partition: str | None, gpus: int, cpus: int | None, mem: str | None,
                  time_min: int | None) -> Partition:
    """The controller answers, the partition exists, and one job of this size fits on one of its nodes."""
    conf = os.environ.get("SLURM_CONF")
    if conf and not os.path.isfile(conf):  # every client command would retry for a minute first
        raise SlurmError(f"SLURM_CONF {conf} is not a file; point it at the cluster's slurm.conf or unset it")
    ping = slurm_command("scontrol", "ping", timeout=30)
    if ping.returncode != 0 or " is UP" not in ping.stdout:
        said = first_line(ping.stdout) or first_line(ping.stderr) or f"exit {ping.returncode}"
        raise SlurmError(f"--launcher slurm: the Slurm controller does not answer ({said}); check `scontrol ping`")
    parts = read_partitions()
    names = ", ".join(sorted(parts)) or "none"
    if partition is None:
        default = [p for p in parts.values() if p[1]]
        if not default:
            raise SlurmError(f"the cluster has no default partition: give --partition (one of: {names})")
        part = default[0][0]
    elif partition not in parts:
        raise SlurmError(f"--partition {partition}: no such partition here; accepted: {names}")
    else:
        part = parts[partition][0]
    if gpus and not part.gpus:
        raise SlurmError(f"--gpus-per-job {gpus}: partition {part.name} has no GPUs; use a GPU partition, or "
                         f"--device cpu (no GPU per job)")
    if cpus is not None and cpus > part.cpus:
        raise SlurmError(f"--cpus-per-job {cpus} is more than any node of partition {part.name} has ({part.cpus})")
    if mem is not None:
        mb = int(mem[:-1] if mem[-1].isalpha() else mem) * {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2}.get(
            mem[-1], 1)
        if mb > part.mem_mb:
            raise SlurmError(f"--mem {mem} is more than any node of partition {part.name} has ({part.mem_mb} MB)")
    if time_min is not None and part.max_min is not None and (time_min == 0 or time_min > part.max_min):
        raise SlurmError(f"--time {format_minutes(time_min)} is more than partition {part.name} allows "
                         f"({format_minutes(part.max_min)})")
    return part


def read_partitions() -> dict[str, tuple[Partition, bool]]:
    """{name: (Partition, is the default)} from one sinfo call (a line per group of alike nodes)."""
    r = slurm_command("sinfo", "-h", "-o", "%P|%L|%l|%c|%m|%G")
    if r.returncode != 0:
        raise SlurmError(f"sinfo failed: {first_line(r.stderr) or f'exit {r.returncode}'}")
    found: dict[str, tuple[Partition, bool]] = {}
    for line in r.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 6:
            continue
        name, default_t, max_t, cpus, mem, gres = fields
        is_default, name = name.endswith("*"), name.rstrip("*")
        max_min = None if max_t in ("infinite", "n/a") else parse_time(max_t, "sinfo's time limit")
        default_min = None if default_t in ("n/a", "infinite") else parse_time(default_t, "sinfo's default time")
        part = Partition(name, time_min=default_min or max_min or 0, max_min=max_min,
                         cpus=int(cpus.rstrip("+")), mem_mb=int(mem.rstrip("+")), gpus="gpu" in gres)
        if name in found:  # more nodes of the same partition: the largest node, any GPU
            old = found[name][0]
            part = Partition(name, part.time_min, part.max_min, max(old.cpus, part.cpus),
                             max(old.mem_mb, part.mem_mb), old.gpus or part.gpus)
        found[name] = (part, is_default)
    return found


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


def submit(run: PlannedRun, ctx, opts: SlurmOptions) -> str:
    """Write the run's spec.json (so that --status sees a queued run; the job writes it again on its node, naming
    that machine), submit the job, record its id in RUN/launch.json; return the id."""
    import submitit

    from harness.runner import prepare
    from harness.slurm_job import RunJob

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


class SlurmScheduler:
    """Each run one Slurm job: a run whose job is still queued or running is followed, never submitted again; at
    most max_jobs are in the queue at once. Waits (unless options.wait is false) printing each run's state as it
    changes, and running runs' progress. .run() returns the runs that failed (none when it does not wait)."""

    def __init__(self, runs: list[PlannedRun], ctx, options: SlurmOptions):
        from harness.status import RunView

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
