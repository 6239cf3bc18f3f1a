"""The fault suite: what the project survives, on real processes, files and filesystems, on the CPU, as one summary
table.

    python checks/faults.py --data ../shared/data/cifar10-jpeg.tar.gz [--impls own torchssl usb] [--seed 0]
                            [--parts kills interrupts suspend damage concurrency disk read-only checkouts inputs]
                            [--summary FILE.md] [--work DIR] [--keep]

About 15 minutes of wall time on a 2-core machine shared with other work (load about 3). Every run is tiny (the
smoke preset with B=2, mu=1, 12 steps, an evaluation every 4 steps on 200 test images, a checkpoint every 2 steps)
and is compared with an uninterrupted run of the same spec: the same planned steps, split and data checksums, a
result that harness/verify.py finds consistent with its files, and (ours) evaluations bit-identical. TorchSSL and
USB reseed their random generators from the spec's seed on every start, so their resumed evaluations differ from an
uninterrupted run's by design.

- kills: run_all.py killed at a random step, during an evaluation or during a checkpoint write (kill -9 of the
  runner alone, of the runner's and the training process's process groups, SIGHUP to the runner), and during the
  warm-up: no process may be left after GONE_LIMIT_S, and the next call resumes from the checkpoint that was there.
  (USB evaluates inside its step, before the step's record: no evaluation moment is visible, so none is chosen.)
- interrupts: Ctrl-C twice and SIGTERM to the training process itself, within one step: the checkpoint holds the
  last finished step, and the next call resumes from it.
- suspend: the training process stopped (SIGSTOP, as Slurm suspends a job), then the runner (SIGTSTP, Ctrl-Z): the
  runner's runs stop with it, and neither stop counts as training time.
- damage: checkpoints, result.json, spec.json, metrics.jsonl, split files, cached arrays and identity.json damaged
  or lost, a run folder copied under another name, a file's time ahead of the clock: the next call or the report
  names the file and survives (resume, redo, rebuild, or the report's advice followed), or refuses in one line.
- concurrency: several `run_all.py --dry-run` at once on one fresh cache and one fresh --out, a few trials.
- disk: a run on a full disk (a small tmpfs, else a loop-mounted ext4 image): the failure names the checkpoint and
  leaves no temporary file; with room again, the next call finishes the run.
- read-only: a runs folder, a results folder and a fresh cache that cannot be written.
- checkouts: a TorchSSL or USB checkout another user owns (git's "dubious ownership"), or edited during a run.
- inputs: bad command lines, each must end with one line on stderr and a non-zero exit, before any run starts.

What is checked are result keys, files and imported constants, not the wording of messages; a message is required
to name its file (the path appears in it). Mounting and chown need root: without it those rows are skipped, with
the reason. Random moments come from --seed. Uses the data cache and checkouts of the user (as run_all.py does);
tests that change a checkout change a copy of it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import io
import json
import os
import pickle
import platform
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python checks/faults.py` from a checkout that is not installed
    sys.path.insert(0, str(REPO))

from contract.arrays import ARRAY_NAMES, indices_sha256  # noqa: E402
from contract.checkpoints import previous_path  # noqa: E402
from contract.results import METRICS_FILE, RESULT_FILE, MetricsTail, latest_progress, read_metrics  # noqa: E402
from contract.runtime import LOG_FILE  # noqa: E402
from contract.spec import SPEC_FILE  # noqa: E402
from harness import verify  # noqa: E402
from harness.launch import PROCESS_LOG  # noqa: E402
from harness.lifeline import processes_naming  # noqa: E402

IMPLS = ("own", "torchssl", "usb")
REFERENCES = ("torchssl", "usb")  # reseed on resume: steps, checksums and consistency count, not equal evaluations
STEPS, EVAL_EVERY, CHECKPOINT_EVERY = 12, 4, 2
TINY = ["--no-identity", "--budgets", "40", "--preset", "smoke", "--batch-size", "2", "--uratio", "1",
        "--eval-subset", "200", "--eval-batch-size", "100", "--device", "cpu", "--log-every", "1",
        "--eval-every", str(EVAL_EVERY), "--checkpoint-every", str(CHECKPOINT_EVERY)]  # suite.args adds --steps
SUSPEND_STEPS = 40  # a longer run, for two stops in one
GONE_LIMIT_S = 10.0  # a killed runner's training process must be gone within this
STOPPED_S = 8.0  # how long a process is kept stopped (contract/recorder.py notices gaps over SUSPENDED_S)
PROCESSES, TRIALS = 3, 3  # concurrency: processes at once, trials
FULL_DISK = "8m"  # a filesystem with room for a run's small files but not for a checkpoint (about 8-18 MB)
OTHER_UID = 4242  # "another user" for a checkout's owner
SUMS = ("split_sha256", "data_sha256", "spec_hash")


def checkpoint_names() -> dict[str, str]:
    """Each implementation's resume checkpoint, relative to its run folder (its previous one: previous_path)."""
    from own_impl.train import CHECKPOINT_FILE
    from third_party.torchssl.patches import RESUME_FILE as TORCHSSL_RESUME
    from third_party.usb.patches import RESUME_FILE as USB_RESUME

    return {"own": CHECKPOINT_FILE, "torchssl": f"torchssl/{TORCHSSL_RESUME}", "usb": f"usb/{USB_RESUME}"}


CHECKPOINT = checkpoint_names()
STEP_KEY = {"own": "step", "torchssl": "it", "usb": "it"}  # the finished steps, in each checkpoint


@dataclass
class Row:
    part: str
    fault: str
    impl: str
    when: str = ""
    detected: str = ""
    outcome: str = ""
    ok: bool = False
    skipped: str = ""  # why this machine cannot do it (e.g. mounting needs root)


@dataclass
class Suite:
    work: Path
    data: str
    rng: random.Random
    sources: dict[str, str] | None  # run_all.py's --torchssl-source / --usb-source, where given
    rows: list[Row] = field(default_factory=list)
    refs: dict[str, dict] = field(default_factory=dict)  # impl -> the uninterrupted run's result

    def env(self, **extra: str) -> dict[str, str]:
        # one thread per process: tiny steps on shared cores
        return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}

    def args(self, impl: str, out: Path, warmup: bool = False, steps: int = STEPS) -> list[str]:
        extra = [a for name, src in (self.sources or {}).items() for a in (f"--{name}-source", src)]
        return [*TINY, "--steps", str(steps), "--impls", impl, "--data", self.data, "--out", str(out), *extra,
                *([] if warmup else ["--no-warmup"])]

    def call(self, args: list[str], timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "run_all.py"), *args], cwd=self.work,
                              env=self.env(**env), capture_output=True, text=True, timeout=timeout)

    def start(self, args: list[str], name: str, session: bool = True) -> subprocess.Popen:
        """run_all.py, its output to a file: in its own session (so that a group kill spares this script), or
        (session False) in its own process group of this session, where Ctrl-Z (SIGTSTP) stops it as in a
        terminal (the kernel discards SIGTSTP for a group with no parent in its session)."""
        log = open(self.work / f"{name}.out", "w")
        where = {"start_new_session": True} if session else {"process_group": 0}
        return subprocess.Popen([sys.executable, str(REPO / "run_all.py"), *args], cwd=self.work,
                                env=self.env(), stdout=log, stderr=subprocess.STDOUT, preexec_fn=as_in_a_terminal,
                                **where)

    def fresh(self, name: str) -> Path:
        out = self.work / name
        shutil.rmtree(out, ignore_errors=True)
        return out


# ---------------------------------------------------------------------------------------------------------------
# Looking at runs and processes


def as_in_a_terminal() -> None:
    """In a started process, before it runs: SIGINT as a terminal delivers it. A suite started in the background
    (`nohup ... &`) inherits SIGINT ignored, and so would every run_all.py it starts, which Ctrl-C then misses."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_dir_of(out: Path) -> Path | None:
    return next((p for p in (out / "runs").glob("cifar10-*")), None) if (out / "runs").is_dir() else None


def wait_for(condition, timeout: float, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    return None


def trained_to(out: Path, step: int):
    """A condition: the run folder under OUT/runs once it has logged `step` (contract.results.latest_progress)."""
    def found() -> Path | None:
        run_dir = run_dir_of(out)
        return run_dir if run_dir is not None and latest_progress(run_dir).step >= step else None
    return found


def gone_after(text: str, limit: float = 60.0) -> float | None:
    """Seconds until no process names `text` (None: still there after `limit`)."""
    t0 = time.monotonic()
    return time.monotonic() - t0 if wait_for(lambda: not processes_naming(text), limit, 0.1) is not None else None


def state(pid: int) -> str:
    """A process's state letter (R, S, T when stopped, ...); "gone" once it has exited."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def training_process(run_dir: Path) -> int | None:
    """The run's entry process (not its data-loader workers: they are its children)."""
    pids = set(processes_naming(f"--run-dir {run_dir}"))
    for pid in pids:
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ValueError):
            continue
        if parent not in pids:
            return pid
    return None


class Logged:
    """The steps and evaluations a run has logged so far, polled through contract.results.MetricsTail (it reads
    only what was appended; a rewritten file is read again from its start)."""

    def __init__(self, run_dir: Path):
        self.tail, self.train, self.evals = MetricsTail(run_dir), set(), set()

    def poll(self) -> "Logged":
        for rec in self.tail.read():
            {"train": self.train, "eval": self.evals}.get(rec.get("kind"), set()).add(rec.get("step"))
        return self

    @property
    def last(self) -> int:
        return max(self.train, default=0)


def moment(out: Path, impl: str, kind: str, rng: random.Random, proc: subprocess.Popen) -> tuple[Path, str] | None:
    """Wait for a kill moment: 'step' (after a random step), 'eval' (an evaluation under way), 'checkpoint' (a
    checkpoint being written: its temporary file exists, with a checkpoint to fall back on). Returns (run folder,
    what was under way at the kill)."""
    first = rng.randint(2, STEPS - 3)
    deadline, logged = time.monotonic() + 600, None
    while time.monotonic() < deadline and proc.poll() is None:
        run_dir = run_dir_of(out)
        if run_dir is None:
            time.sleep(0.2)
            continue
        if kind == "checkpoint":
            if writing_checkpoint(run_dir, impl) and (run_dir / CHECKPOINT[impl]).exists():
                return run_dir, "a checkpoint write"
            time.sleep(0.002)
            continue
        logged = (logged or Logged(run_dir)).poll()
        if kind == "step" and logged.last >= first:
            return run_dir, f"step {logged.last + 1}"
        if kind == "eval" and logged.last >= EVAL_EVERY and logged.last % EVAL_EVERY == 0 and \
                logged.last not in logged.evals:
            return run_dir, f"the evaluation after step {logged.last}"
        time.sleep(0.01)
    return None


def writing_checkpoint(run_dir: Path, impl: str) -> bool:
    """A checkpoint write under way: its temporary file exists (ours: .checkpoint.pt.*.tmp, one of this process's
    own; TorchSSL's and USB's: NAME.tmp)."""
    path = run_dir / CHECKPOINT[impl]
    return any(path.parent.glob(f".{path.name}.*.tmp")) or path.with_name(path.name + ".tmp").exists()


def temporaries(run_dir: Path) -> list[str]:
    """Temporary files left in a run folder (a finished or stopped run has none)."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*.tmp"))


def checkpoint_step(run_dir: Path, impl: str) -> int:
    """The step a run resumes from: its latest checkpoint's, else its previous one's, else 0."""
    import torch

    path = run_dir / CHECKPOINT[impl]
    for p in (path, previous_path(path)):
        try:
            return int(torch.load(p, map_location="cpu", weights_only=False)[STEP_KEY[impl]])
        except Exception:  # absent or damaged: the next one
            continue
    return 0


def kill(proc: subprocess.Popen, run_dir: Path, how: str) -> None:
    """'runner': kill -9 of run_all.py alone; 'groups': kill -9 of its process group and of the training process's
    (a lost node or an OOM kill); 'hup': SIGHUP to the runner (a closed terminal)."""
    if how == "groups":
        children = processes_naming(f"--run-dir {run_dir}")
        for group in {os.getpgid(pid) for pid in children if Path(f"/proc/{pid}").exists()}:
            os.killpg(group, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGKILL if how == "runner" else signal.SIGHUP)
    proc.wait()


def lines_naming(text: str, path: Path | str) -> list[str]:
    return [line.strip() for line in text.splitlines() if str(path) in line]


def naming(run_dir: Path, path: Path | str) -> str:
    """The first line of the run's logs (log.txt, process.log) naming `path`, without its time stamp."""
    for name in (LOG_FILE, PROCESS_LOG):
        file = run_dir / name
        found = lines_naming(file.read_text(errors="replace"), path) if file.exists() else []
        if found:
            stamp = found[0].split(" ", 2)
            return stamp[2] if len(stamp) == 3 and stamp[1].count(":") == 2 else found[0]
    return ""


def last_line(text: str) -> str:
    return (text.strip().splitlines() or ["(nothing)"])[-1]


# ---------------------------------------------------------------------------------------------------------------
# Checking a finished run against the uninterrupted one


def reference(suite: Suite, impl: str) -> dict:
    if impl not in suite.refs:
        out = suite.fresh(f"ref-{impl}")
        r = suite.call(suite.args(impl, out))
        if r.returncode != 0:
            raise RuntimeError(f"the uninterrupted {impl} run failed:\n{r.stderr[-3000:]}")
        suite.refs[impl] = json.loads((run_dir_of(out) / RESULT_FILE).read_text())
    return suite.refs[impl]


def judge(suite: Suite, impl: str, run_dir: Path, r: subprocess.CompletedProcess,
          resumed: list[int] | None = None) -> tuple[str, bool]:
    """(what the finishing call did, whether it is what it must be). resumed: the result's resumed_at it must
    end with (None: not checked)."""
    if r.returncode != 0 or not (run_dir / RESULT_FILE).exists():
        return f"next call exit {r.returncode}: {last_line(r.stderr)[:160]}", False
    ref, result = reference(suite, impl), json.loads((run_dir / RESULT_FILE).read_text())
    train_steps = [m["step"] for m in read_metrics(run_dir) if m.get("kind") == "train"]
    steps_ok = result["steps"] == STEPS and train_steps == list(range(1, STEPS + 1))
    sums_ok = all(result[k] == ref[k] for k in SUMS)
    resumed_ok = resumed is None or result["resumed_at"] == resumed
    problems = verify.load_run(run_dir)["problems"]
    left = temporaries(run_dir)
    same = result["evals"] == ref["evals"]
    if impl == "own":
        evals = "evaluations bit-identical" if same else "EVALUATIONS DIFFER"
    else:
        evals = "evaluations equal" if same else f"evaluations differ ({impl} reseeds on resume, as stated)"
    at = result["resumed_at"]
    text = (f"resumed_at {at}{'' if resumed_ok else f' (EXPECTED {resumed})'}; steps {result['steps']}/{STEPS}"
            f"{'' if steps_ok else ' (LOGGED STEPS WRONG)'}; checksums {'equal' if sums_ok else 'DIFFER'}; {evals}"
            f"{'; temporary files left: ' + ', '.join(left) if left else ''}{'; ' + problems[0] if problems else ''}")
    return text, steps_ok and sums_ok and resumed_ok and not problems and not left and (same or impl != "own")


def runs_csv(out: Path) -> dict[str, str]:
    """run folder name -> files_check_out, from the report's runs.csv."""
    with open(out / "runs.csv") as f:
        return {row["run"]: row["files_check_out"] for row in csv.DictReader(f)}


# ---------------------------------------------------------------------------------------------------------------
# Mounts: small filesystems (a full disk, a read-only folder); root only


@dataclass
class Mount:
    where: Path
    kind: str  # "tmpfs" or "loop"


def cannot_mount() -> str:
    return "" if os.geteuid() == 0 else f"mounting a small filesystem needs root (this runs as uid {os.geteuid()})"


@contextmanager
def filesystem(where: Path, size: str, read_only: bool = False):
    """A fresh filesystem of `size` mounted at `where` for the block: tmpfs, else a loop-mounted ext4 image.
    Raises OSError saying why where neither can be mounted."""
    where.mkdir(parents=True, exist_ok=True)
    ro = ",ro" if read_only else ""
    image = where.parent / f".{where.name}.img"
    tries = [("tmpfs", ["mount", "-t", "tmpfs", "-o", f"size={size}{ro}", "tmpfs", str(where)]),
             ("loop", ["sh", "-c", f"truncate -s {size.upper()} {image} && mkfs.ext4 -q {image} && "
                                   f"mount -o loop{ro} {image} {where}"])]
    why = []
    for kind, cmd in tries:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            break
        why.append(f"{kind}: {last_line(r.stderr)[:120]}")
    else:
        raise OSError(f"cannot mount a small filesystem at {where} ({'; '.join(why)})")
    try:
        yield Mount(where, kind)
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
        image.unlink(missing_ok=True)


@contextmanager
def read_only_view(source: Path, where: Path):
    """`source` seen read-only at `where`: a bind mount, remounted read-only."""
    where.mkdir(parents=True, exist_ok=True)
    for cmd in (["mount", "--bind", str(source), str(where)], ["mount", "-o", "remount,bind,ro", str(where)]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["umount", str(where)], capture_output=True)
            raise OSError(f"cannot make a read-only view of {source}: {last_line(r.stderr)}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def needs_root(part: str, fault: str, impl: str = "-") -> Row | None:
    """A skipped row where this machine cannot mount or chown; None where it can."""
    why = cannot_mount()
    return Row(part, fault, impl, skipped=why) if why else None


# ---------------------------------------------------------------------------------------------------------------
# Part: kills


def kill_case(suite: Suite, impl: str, how: str, kind: str) -> Row:
    row = Row("kill", {"runner": "kill -9 of the runner alone", "groups": "kill -9 of runner + training groups",
                       "hup": "SIGHUP to the runner"}[how], impl)
    out = suite.fresh(f"kill-{impl}-{how}-{kind}")
    proc = suite.start(suite.args(impl, out), out.name)
    found = moment(out, impl, kind, suite.rng, proc)
    if found is None:
        proc.kill()
        row.when = f"no {kind} moment seen (run_all ended: exit {proc.wait()})"
        return row
    run_dir, under_way = found
    kill(proc, run_dir, how)
    gone = gone_after(f"--run-dir {run_dir}")
    cut_short = kind == "checkpoint" and writing_checkpoint(run_dir, impl)  # the write never finished
    row.when = f"during {under_way}" + (" (cut short: its temporary file left)" if cut_short else "")
    row.detected = (f"no process left after {gone:.1f} s" if gone is not None else "PROCESSES STILL ALIVE after 60 s")
    if how == "hup":
        row.detected += f"; runner exit {proc.returncode}"
    step = checkpoint_step(run_dir, impl)
    row.outcome, ok = judge(suite, impl, run_dir, suite.call(suite.args(impl, out)), [step] if step else [])
    row.ok = ok and gone is not None and gone <= GONE_LIMIT_S and (how != "hup" or proc.returncode == 130)
    return row


def warmup_kill_case(suite: Suite) -> Row:
    row = Row("kill", "kill -9 of the runner during its warm-up probe", "own")
    out = suite.fresh("kill-own-warmup")
    proc = suite.start(suite.args("own", out, warmup=True), out.name)
    probe = wait_for(lambda: next((out / ".warmup").glob(f"*/run/{METRICS_FILE}"), None), 600)
    if probe is None:
        proc.kill()
        row.when = "the warm-up probe was never seen"
        return row
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone = gone_after(str(out / ".warmup"))
    left = [p.name for p in (out / ".warmup").iterdir()]
    r = suite.call(suite.args("own", out))
    after = [p.name for p in (out / ".warmup").iterdir()]
    row.when = "during the warm-up probe's steps"
    row.detected = f"probe gone after {gone:.1f} s" if gone is not None else "PROBE STILL ALIVE after 60 s"
    row.outcome = (f"{len(left)} scratch folder(s) left by the kill, {len(after)} after the next call; "
                   f"next call exit {r.returncode}")
    row.ok = gone is not None and gone <= GONE_LIMIT_S and bool(left) and not after and r.returncode == 0
    return row


def kills(suite: Suite, impls: list[str]) -> None:
    # USB evaluates inside its step, before the step's record is written: no moment of its metrics.jsonl shows an
    # evaluation under way, so a kill at a step stands in for it.
    cases = {"own": [("runner", "step"), ("runner", "eval"), ("runner", "checkpoint"), ("groups", "step"),
                     ("groups", "eval"), ("groups", "checkpoint"), ("hup", "step")],
             "torchssl": [("runner", "step"), ("groups", "eval"), ("groups", "checkpoint"), ("hup", "step")],
             "usb": [("runner", "step"), ("groups", "step"), ("groups", "checkpoint"), ("hup", "step")]}
    for impl in impls:
        reference(suite, impl)
        for how, kind in cases[impl]:
            add(suite, kill_case(suite, impl, how, kind))
    if "own" in impls:
        add(suite, warmup_kill_case(suite))


# ---------------------------------------------------------------------------------------------------------------
# Part: interrupts (any number within a step: a checkpoint of the last finished step)


def double_interrupt(suite: Suite, impl: str) -> Row:
    row = Row("interrupt", "Ctrl-C twice to the runner and SIGTERM to the training process", impl)
    out = suite.fresh(f"interrupt-{impl}")
    proc = suite.start(suite.args(impl, out), out.name)
    first = suite.rng.randint(2, STEPS - 3)
    run_dir = wait_for(trained_to(out, first), 600)
    child = training_process(run_dir) if run_dir is not None else None
    if child is None:
        proc.kill()
        row.when = f"no training process seen by step {first} (run_all exit {proc.wait()})"
        return row
    row.when = f"during step {latest_progress(run_dir).step + 1}, the three 0.05 s apart"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    os.kill(child, signal.SIGTERM)
    proc.wait(timeout=600)
    gone = gone_after(f"--run-dir {run_dir}")
    last, step = latest_progress(run_dir).step, checkpoint_step(run_dir, impl)
    row.detected = (f"runner exit {proc.returncode}; no process left after {gone:.1f} s; last logged step {last}, "
                    f"checkpoint at step {step}" if gone is not None else "PROCESSES STILL ALIVE after 60 s")
    outcome, ok = judge(suite, impl, run_dir, suite.call(suite.args(impl, out)), [step])
    row.outcome = outcome
    row.ok = ok and gone is not None and proc.returncode == 130 and step == last
    return row


def interrupts(suite: Suite, impls: list[str]) -> None:
    for impl in impls:
        add(suite, double_interrupt(suite, impl))


# ---------------------------------------------------------------------------------------------------------------
# Part: suspend (stopped time is not training time; Ctrl-Z of the runner stops its runs)


def suspended_run(suite: Suite, impl: str) -> list[Row]:
    """One run of SUSPEND_STEPS stopped twice: its training process by SIGSTOP for STOPPED_S, then the runner by
    SIGTSTP for STOPPED_S. Two rows."""
    stop = Row("suspend", f"SIGSTOP of the training process for {STOPPED_S:.0f} s (as Slurm suspends)", impl)
    tstp = Row("suspend", f"Ctrl-Z (SIGTSTP) of the runner for {STOPPED_S:.0f} s", impl)
    out = suite.fresh(f"suspend-{impl}")
    proc = suite.start(suite.args(impl, out, steps=SUSPEND_STEPS), out.name, session=False)
    stopped, child_state, during = False, "?", None
    try:
        run_dir = wait_for(trained_to(out, 3), 600)
        child = training_process(run_dir) if run_dir is not None else None
        if child is None:
            stop.when = tstp.when = f"no training process seen (run_all exit {proc.poll()})"
            return [stop, tstp]
        stop.when = f"after step {latest_progress(run_dir).step}"
        os.kill(child, signal.SIGSTOP)
        time.sleep(STOPPED_S)
        os.kill(child, signal.SIGCONT)
        step = latest_progress(run_dir).step
        if wait_for(trained_to(out, step + 3), 300) is None or proc.poll() is not None:
            tstp.when = f"the run ended before its second stop (run_all exit {proc.poll()})"
        else:
            tstp.when = f"after step {latest_progress(run_dir).step}"
            proc.send_signal(signal.SIGTSTP)
            stopped = wait_for(lambda: state(proc.pid) == "T", 30) is not None
            time.sleep(1.0)  # the runner stops its runs before itself
            child_state, before = state(child), latest_progress(run_dir).step
            time.sleep(STOPPED_S)
            during = latest_progress(run_dir).step - before
            proc.send_signal(signal.SIGCONT)
            tstp.detected = (f"runner {'stopped' if stopped else 'NOT STOPPED'}; training process state "
                             f"{child_state!r}; {during} step(s) logged while stopped")
        code = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.send_signal(signal.SIGCONT)
            proc.wait()
    result = json.loads((run_dir / RESULT_FILE).read_text()) if (run_dir / RESULT_FILE).exists() else None
    marks = [m["train_seconds"] for m in read_metrics(run_dir) if m.get("kind") == "train"]
    longest = max((b - a for a, b in zip(marks, marks[1:])), default=float("nan"))
    problems = verify.load_run(run_dir)["problems"] if result else ["no result.json"]
    finished = (f"exit {code}; steps {result['steps'] if result else '-'}/{SUSPEND_STEPS}; "
                f"{'consistent' if not problems else problems[0]}")
    stop.detected = f"longest step in training time {longest:.2f} s"
    stop.outcome = (f"train_seconds {result['train_seconds']:.1f} of wall_seconds {result['wall_seconds']:.1f}; "
                    if result else "") + finished
    both_ok = code == 0 and result is not None and result["steps"] == SUSPEND_STEPS and not problems
    stop.ok = both_ok and longest < STOPPED_S / 2 and result["train_seconds"] < result["wall_seconds"] - 2 * STOPPED_S
    tstp.outcome = "continued with the runner; " + finished
    tstp.ok = both_ok and stopped and child_state == "T" and during == 0
    return [stop, tstp]


def suspend(suite: Suite, impls: list[str]) -> None:
    for impl in impls:
        for row in suspended_run(suite, impl):
            add(suite, row)


# ---------------------------------------------------------------------------------------------------------------
# Part: damaged or lost files


def stopped_run(suite: Suite, impl: str, name: str) -> tuple[Path, Path]:
    """A run interrupted (SIGTERM to its runner) after step 6 or later: it has a latest and a previous checkpoint."""
    out = suite.fresh(name)
    proc = suite.start(suite.args(impl, out), name)
    wait_for(trained_to(out, 6), 600)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    return out, run_dir_of(out)


def finished_copy(suite: Suite, impl: str, name: str) -> tuple[Path, Path]:
    """A copy of the uninterrupted run's results folder (checkpoints included)."""
    reference(suite, impl)
    out = suite.fresh(name)
    shutil.copytree(suite.work / f"ref-{impl}", out)
    return out, run_dir_of(out)


def cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def damaged_checkpoint(suite: Suite, impl: str) -> Row:
    row = Row("damage", f"latest checkpoint ({Path(CHECKPOINT[impl]).name}) cut in half", impl, "between calls")
    out, run_dir = stopped_run(suite, impl, f"damage-{impl}-checkpoint")
    latest = run_dir / CHECKPOINT[impl]
    cut(latest)
    step = checkpoint_step(run_dir, impl)  # the previous checkpoint's
    r = suite.call(suite.args(impl, out))
    named = naming(run_dir, latest)
    row.detected = f"named in the run's log: {named}" if named else "NOT NAMED in log.txt or process.log"
    outcome, ok = judge(suite, impl, run_dir, r, [step])
    row.outcome = f"resumed from the previous checkpoint (step {step}): " + outcome
    row.ok = ok and bool(named) and step > 0
    return row


def both_checkpoints_damaged(suite: Suite) -> Row:
    row = Row("damage", "latest and previous checkpoints cut in half", "own", "between calls")
    out, run_dir = stopped_run(suite, "own", "damage-own-both-checkpoints")
    latest = run_dir / CHECKPOINT["own"]
    for path in (latest, previous_path(latest)):
        cut(path)
    first = suite.call(suite.args("own", out))
    error = [line for line in lines_naming((run_dir / PROCESS_LOG).read_text(), latest)
             if previous_path(latest).name in line]
    row.detected = f"exit {first.returncode}; " + (error[-1] if error else "BOTH NOT NAMED in one line")
    for path in (latest, previous_path(latest)):  # the way out the message gives
        path.unlink()
    outcome, ok = judge(suite, "own", run_dir, suite.call(suite.args("own", out)), [])
    row.outcome = "after deleting both: restarted; " + outcome
    row.ok = ok and first.returncode == 1 and bool(error)
    return row


def report_flags(suite: Suite, out: Path, run_dir: Path, path: Path) -> tuple[str, bool]:
    """--report-only on `out`: whether runs.csv says the run's files do not check out and RESULTS.md names
    `path`."""
    report = suite.call(["--report-only", "--out", str(out)])
    text = (out / "RESULTS.md").read_text() if (out / "RESULTS.md").exists() else ""
    flagged = report.returncode == 0 and runs_csv(out).get(run_dir.name) == "False" and str(path) in text
    return (f"--report-only exit {report.returncode}; runs.csv "
            f"{'flags the run' if flagged else 'DOES NOT FLAG IT'} and RESULTS.md "
            f"{'names' if str(path) in text else 'DOES NOT NAME'} {path.name}"), flagged


def damaged_result(suite: Suite, edited: bool) -> Row:
    what = "result.json edited (steps 7, split sha deadbeef, top-1 99.9)" if edited else "result.json cut short"
    row = Row("damage", what, "own", "after the run finished")
    out, run_dir = finished_copy(suite, "own", f"damage-own-result-{'edited' if edited else 'cut'}")
    path = run_dir / RESULT_FILE
    if edited:
        path.write_text(json.dumps({**json.loads(path.read_text()), "steps": 7, "split_sha256": "deadbeef",
                                    "final_top1": 99.9}))
    else:
        cut(path)
    row.detected, flagged = report_flags(suite, out, run_dir, path)
    advice_ok = True
    if edited:  # its evaluations are intact: the advice must be to move it away (REDO), not to start afresh
        problems = verify.load_run(run_dir)["problems"]
        afresh = [p.split(": ")[1].split(";")[0] for p in problems if verify.AFRESH in p]
        advice_ok = bool(problems) and not afresh
        row.detected += (f"; advice for {len(afresh)} of its {len(problems)} problems: START AFRESH ({afresh[0]}), "
                         f"though metrics.jsonl is intact" if afresh else "; advice: move it away")
        path.rename(run_dir / "result.json.edited")  # REDO, which recovers the run
    r = suite.call(suite.args("own", out))
    kept = run_dir / f"{RESULT_FILE}.damaged"
    if not edited:
        named = lines_naming(r.stderr, path)
        row.detected += f"; next call: {named[0] if named else 'DOES NOT NAME IT'}"
        advice_ok = bool(named) and kept.exists()
    outcome, ok = judge(suite, "own", run_dir, r, [STEPS])
    row.outcome = ("moved away as the report says; " if edited else f"kept as {kept.name}; ") + \
        "finished again from its checkpoint; " + outcome
    row.ok = ok and flagged and advice_ok
    return row


def damaged_spec(suite: Suite) -> Row:
    row = Row("damage", "spec.json of a finished run not JSON", "own", "after the run finished")
    out, run_dir = finished_copy(suite, "own", "damage-own-spec")
    path = run_dir / SPEC_FILE
    path.write_text("{not json")
    report = suite.call(["--report-only", "--out", str(out)])
    named = str(path) in (out / "RESULTS.md").read_text()
    r = suite.call(suite.args("own", out))
    said = lines_naming(r.stderr, path)
    row.detected = (f"--report-only exit {report.returncode}, {'names it' if named else 'DOES NOT NAME IT'}; "
                    f"next call: {said[0] if said else 'DOES NOT NAME IT'}")
    outcome, ok = judge(suite, "own", run_dir, r)
    kept = (run_dir / f"{SPEC_FILE}.damaged").exists()
    row.outcome = f"{'kept as spec.json.damaged' if kept else 'NOT KEPT'}; written again; " + outcome
    row.ok = ok and named and bool(said) and kept and report.returncode == 0
    return row


def lost_evaluations(suite: Suite, impl: str) -> Row:
    row = Row("damage", "metrics.jsonl of a finished run deleted (its evaluations lost)", impl,
              "after the run finished")
    out, run_dir = finished_copy(suite, impl, f"damage-{impl}-metrics")
    (run_dir / METRICS_FILE).unlink()
    row.detected, flagged = report_flags(suite, out, run_dir, run_dir / RESULT_FILE)
    problems = verify.load_run(run_dir)["problems"]
    advice = bool(problems) and all(verify.AFRESH in p for p in problems)  # move the whole run folder away
    row.detected += f"; advice: {'start afresh' if advice else 'NOT TO START AFRESH'}"
    shutil.move(run_dir, suite.work / f"set-aside-{impl}-metrics")
    outcome, ok = judge(suite, impl, run_dir, suite.call(suite.args(impl, out)), [])
    row.outcome = "run folder moved away as the report says; started afresh: " + outcome
    row.ok = ok and flagged and advice
    return row


def copied_run(suite: Suite) -> Row:
    row = Row("damage", "a finished run's folder copied under another name", "own", "after the run finished")
    out, run_dir = finished_copy(suite, "own", "damage-own-copied")
    shutil.copytree(run_dir, out / "runs" / f"{run_dir.name}-copy")
    report = suite.call(["--report-only", "--out", str(out)])
    seen = runs_csv(out) if report.returncode == 0 else {}
    row.detected = f"--report-only exit {report.returncode}; runs.csv: " + ", ".join(
        f"{'copy' if k.endswith('-copy') else 'original'} files_check_out {v}" for k, v in sorted(seen.items()))
    row.outcome = f"counted {list(seen.values()).count('True')} time(s)"
    row.ok = report.returncode == 0 and len(seen) == 2 and sorted(seen.values()) == ["False", "True"]
    return row


def clock_ahead(suite: Suite) -> Row:
    row = Row("damage", "metrics.jsonl's time an hour ahead of the clock (another node's clock)", "own",
              "an unfinished run")
    out, run_dir = finished_copy(suite, "own", "damage-own-clock")
    (run_dir / RESULT_FILE).unlink()  # unfinished: --status says when it last logged
    ahead = time.time() + 3600
    os.utime(run_dir / METRICS_FILE, (ahead, ahead))
    r = suite.call(["--status", "--out", str(out)])
    line = next((x.replace(run_dir.name, "RUN") for x in r.stdout.splitlines() if run_dir.name in x), "")
    negative = re.search(r"-\d+:\d\d:\d\d", line) is not None  # a negative H:MM:SS
    row.detected = f"--status exit {r.returncode}: {line}"
    row.outcome = "a negative age shown" if negative else "no negative age"
    row.ok = r.returncode == 0 and bool(line) and not negative
    return row


def damaged_split(suite: Suite, edited: bool) -> Row:
    row = Row("damage", "split file: one index changed" if edited else "split file cut short", "own", "between calls")
    out, run_dir = finished_copy(suite, "own", f"damage-split-{'edited' if edited else 'cut'}")
    path = out / "splits" / "cifar10-40-seed0.json"
    if edited:
        payload = json.loads(path.read_text())
        payload["labeled_indices"][0] += 1
        path.write_text(json.dumps(payload))
    else:
        cut(path)
    before = path.read_bytes()
    r = suite.call(suite.args("own", out))
    lines = r.stderr.strip().splitlines()
    if edited:
        row.detected = f"exit {r.returncode}: {lines[-1] if lines else ''}"
        row.outcome = ("refused before any work; the file " +
                       ("unchanged (never overwritten)" if path.read_bytes() == before else "CHANGED"))
        row.ok = r.returncode == 2 and len(lines) == 1 and str(path) in lines[0] and path.read_bytes() == before
    else:
        named = lines_naming(r.stderr, path)
        kept = path.with_name(path.name + ".damaged")
        row.detected = named[0] if named else "NOT NAMED"
        sha = json.loads(path.read_text())["sha256"]
        same = sha == reference(suite, "own")["split_sha256"] == indices_sha256(
            json.loads(path.read_text())["labeled_indices"])
        row.outcome = (f"{'kept as ' + kept.name if kept.exists() else 'NOT KEPT'}; drawn again: sha256 "
                       f"{'equal' if same else 'DIFFERS'}; exit {r.returncode}")
        row.ok = r.returncode == 0 and same and bool(named) and kept.read_bytes() == before
    return row


def damaged_cache(suite: Suite, what: str) -> Row:
    from harness.data import load_cifar10

    row = Row("damage", {"pixels": "cached train_x.npy: one byte flipped",
                         "identity": "cached identity.json not JSON"}[what], "-", "before a call")
    real = load_cifar10(suite.data)
    expected, real = real.identity.data_sha256, real.data_dir
    cache = suite.fresh(f"damage-cache-{what}")
    entry = cache / "arrays" / real.name
    shutil.copytree(real, entry)
    if what == "pixels":
        with open(entry / "train_x.npy", "r+b") as f:
            f.seek(-1, os.SEEK_END)
            byte = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0xFF]))
    else:
        (entry / "identity.json").write_text("{")
    r = suite.call(["--dry-run", "--data", suite.data, "--out", str(cache / "out"), "--cache-dir", str(cache),
                    "--budgets", "40"])
    named = lines_naming(r.stderr, entry)
    row.detected = named[0] if named else "NOT NAMED"
    sha = json.loads((entry / "identity.json").read_text()).get("data_sha256") if r.returncode == 0 else None
    row.outcome = (f"rebuilt before any run; pixels sha256 {'equal' if sha == expected else 'DIFFERS'}; "
                   f"exit {r.returncode}")
    row.ok = r.returncode == 0 and sha == expected and bool(named)
    return row


def damage(suite: Suite, impls: list[str]) -> None:
    cases = [lambda i=i: damaged_checkpoint(suite, i) for i in impls]
    if "own" in impls:
        cases += [lambda: both_checkpoints_damaged(suite), lambda: damaged_result(suite, edited=False),
                  lambda: damaged_result(suite, edited=True), lambda: damaged_spec(suite)]
    cases += [lambda i=i: lost_evaluations(suite, i) for i in impls]
    if "own" in impls:
        cases += [lambda: copied_run(suite), lambda: clock_ahead(suite), lambda: damaged_split(suite, edited=False),
                  lambda: damaged_split(suite, edited=True)]
    cases += [lambda: damaged_cache(suite, "pixels"), lambda: damaged_cache(suite, "identity")]
    for case in cases:
        add(suite, case())


# ---------------------------------------------------------------------------------------------------------------
# Part: concurrency (first use of one cache and one --out by several processes at once)


def concurrent_first_use(suite: Suite, trial: int) -> Row:
    from harness.data import load_cifar10

    row = Row("concurrency", f"{PROCESSES} dry runs at once on one fresh cache and one fresh --out", "-",
              f"trial {trial + 1} of {TRIALS}")
    budgets, seeds = ("40", "250"), ("0", "1")
    cache, out = suite.fresh(f"concurrent-{trial}-cache"), suite.fresh(f"concurrent-{trial}-out")
    procs = [subprocess.Popen([sys.executable, str(REPO / "run_all.py"), "--dry-run", "--data", suite.data,
                               "--budgets", *budgets, "--seeds", *seeds, "--out", str(out), "--cache-dir", str(cache)],
                              cwd=suite.work, env=suite.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(PROCESSES)]
    errors = [(p.communicate(timeout=900)[1], p.returncode) for p in procs]
    codes = [code for _, code in errors]
    failed = [last_line(err) for err, code in errors if code != 0]
    row.detected = f"exits {codes}" + (f": {failed[0]}" if failed else "")
    expected = load_cifar10(suite.data)
    entries = [p for p in (cache / "arrays").glob("[!.]*") if p.is_dir()]
    whole = len(entries) == 1 and sorted(p.name for p in entries[0].iterdir()) == sorted(
        [f"{n}.npy" for n in ARRAY_NAMES] + ["identity.json"])
    sha = json.loads((entries[0] / "identity.json").read_text()).get("data_sha256") if whole else None
    splits = sorted((out / "splits").glob("*.json")) if (out / "splits").is_dir() else []
    splits_ok = len(splits) == len(budgets) * len(seeds) and all(
        (s := json.loads(p.read_text()))["sha256"] == indices_sha256(s["labeled_indices"]) for p in splits)
    left = [p.name for p in [*(cache / "arrays").glob(".*"), *(out / "splits").glob(".*")]]
    row.outcome = (f"{len(entries)} cache entr{'y' if len(entries) == 1 else 'ies'}, "
                   f"{'whole' if whole else 'NOT WHOLE'}, pixels sha256 "
                   f"{'equal' if sha == expected.identity.data_sha256 else 'DIFFERS'}; {len(splits)} split files "
                   f"{'whole and verified' if splits_ok else 'NOT WHOLE'}"
                   f"{'; temporary files left: ' + ', '.join(left) if left else ''}")
    row.ok = not failed and whole and sha == expected.identity.data_sha256 and splits_ok and not left
    return row


def concurrency(suite: Suite) -> None:
    for trial in range(TRIALS):
        add(suite, concurrent_first_use(suite, trial))


# ---------------------------------------------------------------------------------------------------------------
# Part: a full disk


def full_disk(suite: Suite, impl: str) -> Row:
    fault = f"a full disk ({FULL_DISK.upper()} filesystem for --out: no room for a checkpoint)"
    row = needs_root("disk", fault, impl) or Row("disk", fault, impl, "at the first checkpoint write")
    if row.skipped:
        return row
    out = suite.fresh(f"disk-{impl}")
    try:
        with filesystem(out, FULL_DISK) as mount:
            r = suite.call(suite.args(impl, out))
            run_dir = run_dir_of(out)
            latest = run_dir / CHECKPOINT[impl]
            named = re.compile(re.escape(str(latest.parent)) + r"/[^\s'\"]*\.pth?\b")  # a checkpoint file of its
            error = [x for x in (run_dir / PROCESS_LOG).read_text().splitlines() if named.search(x)]
            left = temporaries(run_dir)
            said = bool(lines_naming(r.stderr, run_dir.name))
            said_last = error[-1] if error else "THE CHECKPOINT IS NOT NAMED: " + last_line(
                (run_dir / PROCESS_LOG).read_text())[:140]
            row.detected = f"exit {r.returncode}; {'run named as failed' if said else 'RUN NOT NAMED'}; {said_last}"
            # Room again: the same filesystem grown (tmpfs), else the folder copied to a disk with room.
            if mount.kind == "tmpfs":
                subprocess.run(["mount", "-o", "remount,size=1g", str(out)], check=True)
                again = out
            else:
                again = suite.fresh(f"disk-{impl}-room")
                shutil.copytree(out, again)
            step = checkpoint_step(run_dir_of(again), impl)
            outcome, ok = judge(suite, impl, run_dir_of(again), suite.call(suite.args(impl, again)),
                                [step] if step else [])
    except OSError as e:
        row.skipped = str(e)
        return row
    row.outcome = (f"temporary files left: {', '.join(left) if left else 'none'}; with room again: " + outcome)
    row.ok = ok and r.returncode == 1 and said and bool(error) and not left
    return row


def disk(suite: Suite, impls: list[str]) -> None:
    for impl in impls:
        add(suite, full_disk(suite, impl))


# ---------------------------------------------------------------------------------------------------------------
# Part: read-only folders


def read_only_runs(suite: Suite) -> Row:
    fault = "--out/runs read-only (the run's folder cannot be made)"
    row = needs_root("read-only", fault, "own") or Row("read-only", fault, "own", "before the run starts")
    if row.skipped:
        return row
    out = suite.fresh("read-only-runs")
    try:
        with filesystem(out / "runs", "1m", read_only=True):
            r = suite.call(suite.args("own", out))
    except OSError as e:
        row.skipped = str(e)
        return row
    name = reference_name(suite, "own")
    said = lines_naming(r.stderr, name)
    row.detected = f"exit {r.returncode}; " + (said[0] if said else "THE RUN IS NOT NAMED")
    row.outcome = f"counted as failed; the report {'written' if (out / 'RESULTS.md').exists() else 'NOT WRITTEN'}"
    row.ok = r.returncode == 1 and bool(said) and (out / "RESULTS.md").exists()
    return row


def reference_name(suite: Suite, impl: str) -> str:
    """The name of the uninterrupted run's folder: a call with the same flags plans the same run."""
    reference(suite, impl)
    return run_dir_of(suite.work / f"ref-{impl}").name


def read_only_out(suite: Suite) -> Row:
    fault = "--out read-only (split files there; no run can start, no report be written)"
    row = needs_root("read-only", fault, "own") or Row("read-only", fault, "own", "the whole call")
    if row.skipped:
        return row
    source = suite.fresh("read-only-out-source")
    shutil.copytree(suite.work / "ref-own" / "splits", source / "splits")
    out = suite.fresh("read-only-out")
    try:
        with read_only_view(source, out):
            r = suite.call(suite.args("own", out))
    except OSError as e:
        row.skipped = str(e)
        return row
    lines = r.stderr.splitlines()
    said = [i for i, x in enumerate(lines) if reference_name(suite, "own") in x]
    report = [i for i, x in enumerate(lines) if os.strerror(30) in x and str(out) in x]  # EROFS
    row.detected = f"exit {r.returncode}; " + (" / ".join(lines[i].strip() for i in [*said[:1], *report[:1]])
                                               or last_line(r.stderr))
    row.outcome = ("the failed run said before the report's error" if said and report and said[0] < report[0]
                   else "THE FAILED RUN IS NOT SAID FIRST")
    row.ok = r.returncode == 1 and bool(said) and bool(report) and said[0] < report[0]
    return row


def read_only_cache(suite: Suite) -> Row:
    fault = "a fresh --cache-dir read-only"
    row = needs_root("read-only", fault) or Row("read-only", fault, "-", "the data's first use")
    if row.skipped:
        return row

    def dry(cache: Path) -> tuple[subprocess.CompletedProcess, float]:
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
        r = suite.call(["--dry-run", "--budgets", "40", "--data", suite.data, "--out", str(cache.parent / "out"),
                        "--cache-dir", str(cache)])
        return r, resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - before

    _, decode = dry(suite.fresh("read-only-cache-writable") / "cache")  # what a decode costs here
    try:
        with filesystem(suite.fresh("read-only-cache") / "cache", "1m", read_only=True) as mount:
            r, cpu = dry(mount.where)
    except OSError as e:
        row.skipped = str(e)
        return row
    lines = r.stderr.strip().splitlines()
    row.detected = lines[-1] if lines else "(nothing on stderr)"
    row.outcome = f"exit {r.returncode} after {cpu:.1f} CPU-s (a decode: {decode:.1f} CPU-s)"
    row.ok = r.returncode == 2 and len(lines) == 1 and str(mount.where) in lines[0] and cpu < decode / 2
    return row


def read_only(suite: Suite) -> None:
    for case in (read_only_runs, read_only_out, read_only_cache):
        add(suite, case(suite))


# ---------------------------------------------------------------------------------------------------------------
# Part: checkouts (another user's; edited during a run)


def user_checkout(impl: str) -> Path:
    from harness.env import default_cache_dir

    module = __import__(f"third_party.{impl}.checkout", fromlist=["find_checkout"])
    found = module.find_checkout(default_cache_dir())
    if found is None:
        raise RuntimeError(f"no {impl} checkout in {default_cache_dir()}: run the {impl} reference run first")
    return found


def scratch_cache(suite: Suite, name: str, impl: str) -> tuple[Path, Path]:
    """(cache folder, its checkout): the decoded data linked, the user's checkout of `impl` copied."""
    from harness.data import load_cifar10

    cache = suite.fresh(name)
    real = load_cifar10(suite.data).data_dir
    (cache / "arrays").mkdir(parents=True)
    (cache / "arrays" / real.name).symlink_to(real)
    checkout = cache / user_checkout(impl).name
    shutil.copytree(user_checkout(impl), checkout, symlinks=True)
    return cache, checkout


def foreign_checkout(suite: Suite, impl: str) -> Row:
    fault = f"the {impl} checkout owned by another user (uid {OTHER_UID})"
    why = "" if os.geteuid() == 0 else f"chown needs root (this runs as uid {os.geteuid()})"
    row = Row("checkout", fault, impl, "before any run", skipped=why)
    if why:
        return row
    reference(suite, impl)
    cache, checkout = scratch_cache(suite, f"foreign-{impl}", impl)
    subprocess.run(["chown", "-R", f"{OTHER_UID}:{OTHER_UID}", str(checkout)], check=True)
    out = suite.work / f"foreign-{impl}-out"
    r = suite.call([*suite.args(impl, out), "--cache-dir", str(cache)])
    module = __import__(f"third_party.{impl}.checkout", fromlist=["verify_checkout", "CheckoutNotTrusted"])
    try:
        module.verify_checkout(checkout)
        raised = "nothing"
    except Exception as e:
        raised = type(e).__name__
    lines = r.stderr.strip().splitlines()
    one = r.returncode == 2 and len(lines) == 1 and str(checkout) in lines[0]
    git_term = one and "dubious ownership" in lines[0]  # git's own name for it, which the line must use
    row.detected = f"exit {r.returncode}: {lines[-1] if lines else ''}"
    row.outcome = (f"verify_checkout raises {raised}; "
                   f"{'no run started' if not (out / 'runs').exists() else 'A RUN STARTED'}")
    row.ok = one and git_term and raised == module.CheckoutNotTrusted.__name__ and not (out / "runs").exists()
    return row


def edited_checkout(suite: Suite, impl: str) -> Row:
    row = Row("checkout", f"the {impl} checkout edited during a run (README.md appended to)", impl,
              "after its first step")
    reference(suite, impl)
    cache, checkout = scratch_cache(suite, f"edited-{impl}", impl)
    out = suite.fresh(f"edited-{impl}-out")
    proc = suite.start([*suite.args(impl, out), "--cache-dir", str(cache)], out.name)
    if wait_for(trained_to(out, 1), 600) is None:
        proc.kill()
        row.when = f"no first step seen (run_all exit {proc.wait()})"
        return row
    with open(checkout / "README.md", "a") as f:
        f.write("\nedited during a run\n")
    code = proc.wait(timeout=900)
    run_dir = run_dir_of(out)
    result = json.loads((run_dir / RESULT_FILE).read_text()) if (run_dir / RESULT_FILE).exists() else {}
    key = f"{impl}_checkout_clean"
    row.detected = f"run exit {code}; result.json {key} {result.get(key)}"
    report, flagged = report_flags(suite, out, run_dir, run_dir / RESULT_FILE)
    row.outcome = report
    row.ok = code == 0 and result.get(key) is False and flagged
    return row


def checkouts(suite: Suite, impls: list[str]) -> None:
    for impl in (i for i in impls if i in REFERENCES):
        add(suite, foreign_checkout(suite, impl))
        add(suite, edited_checkout(suite, impl))


# ---------------------------------------------------------------------------------------------------------------
# Part: bad inputs


class RunsCode:
    """In a pickle: a plain pickle.loads would run `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def bad_data_sources(folder: Path) -> dict[str, Path]:
    """Data sources that must be refused: crafted pickles, a truncated archive, a file that is no archive, a folder
    laid out otherwise."""
    import numpy as np

    from harness.data import CIFAR10_CLASSES

    batches = folder / "crafted" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        content = {"data": np.zeros((10, 3072), np.uint8), "labels": list(range(10))}
        (batches / name).write_bytes(pickle.dumps(content))
    (batches / "batches.meta").write_bytes(pickle.dumps({"label_names": list(CIFAR10_CLASSES),
                                                         "x": RunsCode(folder / "code-was-run")}))
    with tarfile.open(folder / "crafted.tar.gz", "w:gz") as tar:
        tar.add(batches, arcname="cifar-10-batches-py")
    with tarfile.open(folder / "whole.tar.gz", "w:gz") as tar:  # random pixels: a tar.gz that does not shrink
        for name in [f"data_batch_{i}" for i in range(1, 6)]:
            blob = pickle.dumps({"data": np.random.default_rng(0).integers(0, 256, (10, 3072), np.uint8),
                                 "labels": list(range(10))})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    whole = (folder / "whole.tar.gz").read_bytes()
    (folder / "truncated.tar.gz").write_bytes(whole[: len(whole) // 2])
    (folder / "notes.txt.tar.gz").write_text("not an archive\n" * 100)
    (folder / "layout" / "images").mkdir(parents=True)
    (folder / "a-file").write_text("a file, not a folder\n")
    return {"crafted": folder / "crafted", "crafted_tar": folder / "crafted.tar.gz",
            "truncated": folder / "truncated.tar.gz", "not_tar": folder / "notes.txt.tar.gz",
            "layout": folder / "layout", "file": folder / "a-file", "marker": folder / "code-was-run"}


def bad_inputs(suite: Suite, f: dict[str, Path]) -> list[tuple[str, list[str], dict]]:
    """(what, command-line arguments, extra environment); --out is added per case."""
    d = ["--data", suite.data, "--dry-run", "--preset", "smoke"]
    empty_cache = str(f["file"].parent / "empty-cache")
    return [
        ("budget not a multiple of 10", [*d, "--budgets", "45"], {}),
        ("budget 0", [*d, "--budgets", "0"], {}),
        ("budget beyond the classes", [*d, "--budgets", "60000"], {}),
        ("budget repeated", [*d, "--budgets", "40", "40"], {}),
        ("no budget after --budgets", [*d, "--budgets"], {}),
        ("negative seed", [*d, "--seeds", "-1"], {}),
        ("seed 2^32", [*d, "--seeds", str(2**32)], {}),
        ("seed not an integer", [*d, "--seeds", "1.5"], {}),
        ("unknown implementation", [*d, "--impls", "mixmatch"], {}),
        ("unknown preset", [*d, "--preset", "huge"], {}),
        ("unknown device", [*d, "--device", "tpu"], {}),
        ("CUDA device on a CPU machine", [*d, "--device", "cuda:7"], {}),
        ("--gpus on a CPU machine", [*d, "--gpus", "0"], {}),
        ("0 steps", [*d, "--steps", "0"], {}),
        ("steps not a number", [*d, "--steps", "ten"], {}),
        ("infinite lr", [*d, "--lr", "inf"], {}),
        ("negative lr", [*d, "--lr", "-1"], {}),
        ("NaN weight decay", [*d, "--weight-decay", "nan"], {}),
        ("-inf lambda_u", [*d, "--lambda-u=-inf"], {}),
        ("threshold above 1", [*d, "--threshold", "1.5"], {}),
        ("EMA decay 1", [*d, "--ema-decay", "1"], {}),
        ("momentum 1", [*d, "--momentum", "1"], {}),
        ("WRN depth 27", [*d, "--depth", "27"], {}),
        ("eval subset not a multiple of 10", [*d, "--eval-subset", "15"], {}),
        ("eval subset beyond the test set", [*d, "--eval-subset", "20000"], {}),
        ("eval batch size 0", [*d, "--eval-batch-size", "0"], {}),
        ("negative TorchSSL workers", [*d, "--torchssl-workers", "-1"], {}),
        ("channels_last with TorchSSL", [*d, "--channels-last"], {}),
        ("channels_last with USB", [*d, "--impls", "usb", "--channels-last"], {}),
        ("unknown flag", [*d, "--bogus"], {}),
        ("missing data path", ["--dry-run", "--data", str(f["file"]) + "-missing"], {}),
        ("missing data path in $FIXMATCH_BENCH_DATA", ["--dry-run"], {"FIXMATCH_BENCH_DATA": "/nonexistent/c.tgz"}),
        ("data file that is no archive", ["--dry-run", "--data", str(f["not_tar"])], {}),
        ("truncated archive", ["--dry-run", "--data", str(f["truncated"])], {}),
        ("data folder laid out otherwise", ["--dry-run", "--data", str(f["layout"])], {}),
        ("crafted pickle (runs code) in a folder", ["--dry-run", "--data", str(f["crafted"])], {}),
        ("crafted pickle (runs code) in a tar.gz", ["--dry-run", "--data", str(f["crafted_tar"])], {}),
        ("--out is a file", [*d, "--out", str(f["file"])], {}),
        ("--cache-dir is a file", [*d, "--cache-dir", str(f["file"])], {}),
        ("--report-only on a missing folder", ["--report-only", "--out", str(f["file"]) + "-missing"], {}),
        ("TorchSSL source that does not exist", [*TINY, "--no-warmup", "--data", suite.data, "--cache-dir",
                                                 empty_cache, "--impls", "torchssl", "--torchssl-source",
                                                 str(f["file"]) + "-missing"], {}),
        ("USB source that does not exist", [*TINY, "--no-warmup", "--data", suite.data, "--cache-dir", empty_cache,
                                            "--impls", "usb", "--usb-source", str(f["file"]) + "-missing"], {}),
    ]


def input_case(suite: Suite, i: int, what: str, args: list[str], env: dict, marker: Path) -> Row:
    common_prefix = ["--data", suite.data, "--dry-run", "--preset", "smoke"]
    shown = args[len(common_prefix):] if args[:len(common_prefix)] == common_prefix else args
    shown = shown[shown.index("--impls"):] if "--impls" in shown else shown  # a real call: its point is at the end
    shown = " ".join(Path(a).name if "/" in a else a for a in shown)
    out = suite.work / "inputs" / f"out-{i}"
    if "--out" not in args:
        args = [*args, "--out", str(out)]
    r = suite.call(args, timeout=600, **env)
    lines = r.stderr.strip().splitlines()
    started = (out / "runs").exists() or marker.exists()
    row = Row("input", what, "-", f"`{shown[:70]}`" + (f" with {', '.join(f'{k}={v}' for k, v in env.items())}"
                                                       if env else ""))
    row.detected = lines[-1] if lines else "(nothing on stderr)"
    row.outcome = f"exit {r.returncode}, {len(lines)} line(s) on stderr{', A RUN STARTED' if started else ''}"
    row.ok = r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ") and not started
    return row


def inputs(suite: Suite) -> None:
    from harness.data import load_cifar10

    files = bad_data_sources(suite.work / "inputs")
    empty = files["file"].parent / "empty-cache"  # a cache with no checkouts must not decode the data for nothing
    (empty / "arrays").mkdir(parents=True, exist_ok=True)
    real = load_cifar10(suite.data).data_dir
    if not (empty / "arrays" / real.name).exists():
        (empty / "arrays" / real.name).symlink_to(real)
    cases = bad_inputs(suite, files)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:  # mostly start-up time: two at a time
        rows = list(pool.map(lambda c: input_case(suite, c[0], *c[1], files["marker"]), enumerate(cases)))
    for row in rows:
        add(suite, row)


# ---------------------------------------------------------------------------------------------------------------
# The table


PARTS = {"kills": "kill", "interrupts": "interrupt", "suspend": "suspend", "damage": "damage",
         "concurrency": "concurrency", "disk": "disk", "read-only": "read-only", "checkouts": "checkout",
         "inputs": "input"}  # --parts name -> the rows' part


def shorten(text: str, work: Path, limit: int = 230) -> str:
    """Paths inside the scratch folder written from it (W/...), and at most `limit` characters."""
    text = text.replace(str(work), "W")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def add(suite: Suite, row: Row) -> None:
    """Keep a row for the table (paths in the scratch folder shortened) and print it at once."""
    row.detected, row.outcome = shorten(row.detected, suite.work), shorten(row.outcome, suite.work)
    suite.rows.append(row)
    mark = "skip" if row.skipped else "ok  " if row.ok else "FAIL"
    print(f"{mark} {row.part:11s} {row.impl:8s} {row.fault}: {row.skipped or row.detected} -> {row.outcome}",
          flush=True)


def table(rows: list[Row]) -> list[str]:
    lines = ["| # | part | fault | impl | when / input | detected / named | outcome | ok |",
             "|---:|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        ok = f"skipped: {r.skipped}" if r.skipped else "yes" if r.ok else "**NO**"
        cells = [str(i), r.part, r.fault, r.impl, r.when, r.detected, r.outcome, ok]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return lines


def counts(rows: list[Row]) -> list[str]:
    found = []
    for part in PARTS.values():
        mine = [r for r in rows if r.part == part]
        done = [r for r in mine if not r.skipped]
        if mine:
            found.append(f"{part}: {sum(r.ok for r in done)}/{len(done)} survived as required"
                         + (f" ({len(mine) - len(done)} skipped)" if len(done) < len(mine) else ""))
    return found


def summary(rows: list[Row], argv: list[str], seconds: float, seed: int) -> str:
    import torch

    from harness.env import code_version, machine_info

    shown = []  # where the output goes is not part of the command's meaning
    for a in argv:
        if shown and shown[-1] in ("--summary", "--work"):
            shown.pop()
        elif a != "--keep":
            shown.append(a)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"] * 3
    failed = [f"#{i} ({r.part}, {r.impl}: {r.fault})" for i, r in enumerate(rows, 1) if not r.ok and not r.skipped]
    return "\n".join([
        "# Fault suite", "",
        f"- Command: `python checks/faults.py {' '.join(shown)}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M %Z')}; wall time {seconds / 60:.1f} min; random moments from seed "
        f"{seed}",
        f"- Machine: {machine_info('cpu')}, {platform.system()} {platform.release()}; Python "
        f"{platform.python_version()}, torch {torch.__version__}; code {code_version()}; load average at the end "
        f"{' / '.join(load)} (1 / 5 / 15 min); {'root' if os.geteuid() == 0 else 'not root'}",
        f"- Runs: smoke preset, B=2, mu=1, {STEPS} steps ({SUSPEND_STEPS} for the suspend part), evaluation every "
        f"{EVAL_EVERY} steps on 200 test images, checkpoint every {CHECKPOINT_EVERY} steps; each compared with an "
        f"uninterrupted run of the same spec",
        f"- Result: {'; '.join(counts(rows))}",
        f"- Not as required: {', '.join(failed) if failed else 'none'}", "",
        *table(rows), "",
        "TorchSSL and USB reseed their random generators from the spec's seed every time they start, so a resumed run "
        "of theirs replays the random draws of its first steps and its evaluations differ from an uninterrupted "
        "run's; for them the suite checks the steps, the resume step, the checksums and the result's consistency "
        "only. Ours restores every random state and must match bit for bit. Paths inside the suite's scratch folder "
        "are written W/....", ""])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--data", default=os.environ.get("FIXMATCH_BENCH_DATA"),
                   help="CIFAR-10 source as run_all.py takes it (default: $FIXMATCH_BENCH_DATA)")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    p.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    p.add_argument("--torchssl-source", default=None, help="as run_all.py's")
    p.add_argument("--usb-source", default=None, help="as run_all.py's")
    p.add_argument("--summary", type=Path, default=None, help="also write the summary (markdown) here")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = p.parse_args()
    if not args.data:
        raise ValueError("no data: pass --data PATH (a CIFAR-10 source as run_all.py takes it) or set "
                         "FIXMATCH_BENCH_DATA")
    data = os.path.abspath(os.path.expanduser(args.data))
    work = Path(tempfile.mkdtemp(prefix="faults-")) if args.work is None else args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    sources = {k: v for k, v in (("torchssl", args.torchssl_source), ("usb", args.usb_source)) if v}
    suite, t0 = Suite(work, data, random.Random(args.seed), sources), time.monotonic()
    parts = {"kills": lambda: kills(suite, args.impls), "interrupts": lambda: interrupts(suite, args.impls),
             "suspend": lambda: suspend(suite, args.impls), "damage": lambda: damage(suite, args.impls),
             "concurrency": lambda: concurrency(suite), "disk": lambda: disk(suite, args.impls),
             "read-only": lambda: read_only(suite), "checkouts": lambda: checkouts(suite, args.impls),
             "inputs": lambda: inputs(suite)}
    try:
        for name in PARTS:
            if name in args.parts:
                parts[name]()
    finally:
        text = summary(suite.rows, sys.argv[1:], time.monotonic() - t0, args.seed)
        print("\n" + text)
        if args.summary is not None:
            args.summary.parent.mkdir(parents=True, exist_ok=True)
            args.summary.write_text(text)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if suite.rows and all(r.ok or r.skipped for r in suite.rows) else 1


def run_main() -> None:
    """sys.exit(main()), with bad input (a data path, a checkout source) as one line."""
    from harness.data import DataError
    from third_party.checkout import CheckoutError

    try:
        sys.exit(main())
    except (ValueError, OSError, CheckoutError, DataError) as e:
        sys.exit(f"checks/faults.py: error: {e}")


if __name__ == "__main__":
    run_main()
