"""The Slurm launcher's options: the flags' values checked one by one (one line each, before any job is submitted),
then the cluster itself (controller, partition, node sizes)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from harness.plan import UsageError
from harness.slurm_queue import SlurmError, first_line, slurm_command

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
DEFAULT_MAX_REQUEUES = 3
# Shortest --time: a job is warned (SIGUSR2) 90 s before its limit, give or take Slurm's 60 s signal tick, and
# starting a run takes seconds to a minute; a shorter limit would requeue a job before it makes progress.
MIN_TIME_MIN = 5


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


@dataclass(frozen=True)
class SlurmRequest:
    """The Slurm flags as given (None: not given), and the run flags they depend on."""

    device: str = "auto"
    gpus: list[int] | None = None  # --gpus: this machine's GPUs, refused with Slurm
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    gpus_per_job: int | None = None
    cpus_per_job: int | None = None
    mem: str | None = None
    sbatch: list[str] | None = None
    max_jobs: int | None = None
    max_requeues: int | None = None
    no_wait: bool = False
    allow_local_out: bool = False


def slurm_options(args: SlurmRequest, out: Path, cache_dir: Path) -> SlurmOptions:
    """The launcher's options from the flags, every one checked, the cluster's last."""
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
