"""Faults of a shared cluster, on real processes, run folders and filesystems through the real command line: a run
that cannot start, a double interrupt, a full disk, read-only folders, lost evaluations, a checkout edited during a
run, a stopped training process or runner, clock skew, a copied run folder. (Several processes on one fresh cache
and results folder: test_concurrency.py.) Full disks and read-only folders are small filesystems mounted for the
test, which needs root (permissions alone do not stop root); elsewhere those tests skip, saying so."""
from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from contract.results import latest_progress, read_metrics
from harness.lifeline import processes_naming

from conftest import REPO, as_in_a_terminal, wait_until

sys.path.insert(0, str(REPO / "checks"))
import faults  # noqa: E402  (checks/faults.py: the fault suite's mounts)

TINY = ["--impls", "own", "--budgets", "40", "--preset", "smoke", "--batch-size", "2", "--uratio", "1",
        "--eval-subset", "100", "--eval-batch-size", "100", "--device", "cpu", "--log-every", "1", "--no-warmup",
        "--no-identity"]
STOPPED_S = 7.0  # how long a training process is kept stopped: more than the recorder's 5 s gap


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def run_all(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run_all.py"), *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def start_run_all(*args: str, **popen) -> subprocess.Popen:
    """run_all.py with SIGINT as a terminal delivers it (tests started in the background inherit it ignored)."""
    return subprocess.Popen([sys.executable, str(REPO / "run_all.py"), *args], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_in_a_terminal, **popen)


def trained_to(out: Path, step: int):
    """A condition: the run folder under OUT/runs once its metrics.jsonl logs `step`."""
    def run_dir():
        found = next((out / "runs").glob("*"), None) if (out / "runs").is_dir() else None
        return found if found is not None and latest_progress(found).step >= step else None
    return run_dir


def state(pid: int) -> str:
    """A process's state letter (R, S, T stopped, Z, ...); "gone" when it has exited."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def training_process(run_dir: Path) -> int:
    """The run's entry process (whatever it starts is its child, and may name the run folder too)."""
    pids = set(processes_naming(f"--run-dir {run_dir}"))
    [pid] = [p for p in pids if int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]) not in pids]
    return pid


@contextmanager
def or_skip(mount):
    """The fault suite's mount (checks/faults.py: filesystem, read_only_view) for the block; skips, saying why,
    where this machine cannot make it (it needs root)."""
    if why := faults.cannot_mount():
        pytest.skip(why)
    with ExitStack() as stack:
        try:
            made = stack.enter_context(mount)
        except OSError as e:
            pytest.skip(str(e))
        yield made


@contextmanager
def filesystem(where: Path, size: str = "1m", read_only: bool = False):
    """A small fresh filesystem mounted at `where` for the block (tmpfs, else a loop-mounted ext4 image): its path."""
    with or_skip(faults.filesystem(where, size, read_only)) as mount:
        yield mount.where


def read_only_view(source: Path, where: Path):
    """`source` seen read-only at `where` for the block: its path."""
    return or_skip(faults.read_only_view(source, where))


@pytest.fixture(scope="module")
def finished(shared_archive, cifar, tmp_path_factory) -> Path:
    """A results folder holding one finished tiny run of ours (4 steps, evaluated at 2 and 4), made by run_all.py;
    tests copy it."""
    out = tmp_path_factory.mktemp("finished") / "out"
    r = run_all(*TINY, "--steps", "4", "--eval-every", "2", "--data", str(shared_archive), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def copy_of(finished: Path, to: Path) -> tuple[Path, Path]:
    """(results folder, its one run folder): a copy of `finished`."""
    shutil.copytree(finished, to, symlinks=True)
    return to, next((to / "runs").glob("*"))


# ---------------------------------------------------------------------------------------------------------------
# 1. A run that cannot start is a failed run


def test_a_run_that_cannot_start_is_a_failed_run(shared_archive, finished, tmp_path):
    out = tmp_path / "out"
    name = next((finished / "runs").iterdir()).name  # the same flags: the same run
    with filesystem(out / "runs", read_only=True):  # its folder cannot be made: prepare() fails
        r = run_all(*TINY, "--steps", "4", "--eval-every", "2", "--data", str(shared_archive), "--out", str(out))
        assert list((out / "runs").iterdir()) == []
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert name in r.stderr
    assert (out / "RESULTS.md").exists()  # the report is still written


# ---------------------------------------------------------------------------------------------------------------
# 3. Any number of interrupts within a step ends with a checkpoint of the last finished step


def test_a_double_interrupt_checkpoints_the_last_finished_step(shared_archive, cifar, tmp_path):
    import torch

    out = tmp_path / "out"
    # Steps of about half a second, and no checkpoint but the one the interruption writes.
    proc = start_run_all(*TINY, "--batch-size", "16", "--uratio", "2", "--steps", "60", "--eval-every", "60",
                         "--checkpoint-every", "1000", "--data", str(shared_archive), "--out", str(out),
                         start_new_session=True)
    run_dir = wait_until(trained_to(out, 2), 300, "a second step", proc)
    child = training_process(run_dir)
    proc.send_signal(signal.SIGINT)  # Ctrl-C twice, then SIGTERM to the training process itself (as scancel does)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    os.kill(child, signal.SIGTERM)
    proc.communicate(timeout=300)
    assert proc.returncode == 130
    wait_until(lambda: state(child) == "gone", 60, "the training process to exit")
    last = latest_progress(run_dir).step
    assert last >= 2 and torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == last


# ---------------------------------------------------------------------------------------------------------------
# 4. Failures are said first and name their files; a full disk; a read-only cache


def test_a_failed_run_is_said_before_a_report_that_cannot_be_written(shared_archive, finished, tmp_path):
    source, run_dir = copy_of(finished, tmp_path / "source")
    shutil.rmtree(source / "runs")  # its split file is there, its run is to do
    with read_only_view(source, tmp_path / "out") as out:  # the run cannot start; the report cannot be written
        r = run_all(*TINY, "--steps", "4", "--eval-every", "2", "--data", str(shared_archive), "--out", str(out))
    lines = r.stderr.splitlines()
    said = [i for i, line in enumerate(lines) if run_dir.name in line]
    report = [i for i, line in enumerate(lines) if os.strerror(errno.EROFS) in line and str(out) in line]
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert said and report and said[0] < report[0], r.stderr[-2000:]


def test_a_full_disk_names_the_checkpoint_and_leaves_no_temporary_file(shared_archive, cifar, tmp_path):
    out = tmp_path / "out"
    with filesystem(out, size="8m"):  # room for everything but a checkpoint (about 18 MB)
        r = run_all(*TINY, "--steps", "4", "--eval-every", "2", "--checkpoint-every", "2", "--data",
                    str(shared_archive), "--out", str(out))
        [run_dir] = (out / "runs").iterdir()
        error = (run_dir / "process.log").read_text().strip().splitlines()[-1]
        left = sorted(p.name for p in run_dir.rglob("*tmp*"))
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert str(run_dir / "checkpoint.pt") in error, error
    assert left == []


def test_a_fresh_read_only_cache_is_refused_before_any_decoding(shared_archive, tmp_path):
    """Decoding the archive costs about 7 CPU-seconds; a refusal costs the start-up alone (about 1.5)."""
    with filesystem(tmp_path / "cache", read_only=True) as cache:
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
        r = run_all("--dry-run", "--budgets", "40", "--data", str(shared_archive), "--out", str(tmp_path / "out"),
                    "--cache-dir", str(cache))
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - before
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and str(cache) in lines[0]
    assert cpu < 4.0, f"{cpu:.1f} CPU-seconds before the refusal: {lines}"


# ---------------------------------------------------------------------------------------------------------------
# 6. The report's advice for lost evaluations recovers the run


def test_following_the_advice_for_lost_evaluations_recovers_the_run(shared_archive, finished, tmp_path):
    from harness import verify
    from harness.report.studies import load_runs

    out, run_dir = copy_of(finished, tmp_path / "out")
    (run_dir / "metrics.jsonl").unlink()
    [problem] = verify.load_run(run_dir)["problems"]
    if getattr(verify, "AFRESH", None) and verify.AFRESH in problem:
        run_dir.rename(tmp_path / "set-aside")
    else:  # the advice for a result that disagrees with its files: move result.json away
        assert verify.REDO in problem, problem
        (run_dir / "result.json").rename(tmp_path / "result.json.set-aside")
    r = run_all(*TINY, "--steps", "4", "--eval-every", "2", "--data", str(shared_archive), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    [run] = load_runs(out)
    assert run["problems"] == [] and run["result"]["steps"] == 4


# ---------------------------------------------------------------------------------------------------------------
# 7. A result whose checkout changed during the run is flagged


def test_a_result_from_a_checkout_edited_during_the_run_is_flagged(make_run_dir, torchssl_checkout, tmp_path):
    from harness.verify import load_run

    checkout = tmp_path / "cache" / torchssl_checkout.name  # a copy: the user's checkout is never touched
    shutil.copytree(torchssl_checkout, checkout, symlinks=True)
    run_dir = make_run_dir("torchssl", files={"torchssl_checkout": str(checkout), "num_workers": 0}, steps=8,
                           eval_every=4, checkpoint_every=4)
    proc = subprocess.Popen([sys.executable, "-m", "third_party.torchssl.entry", "--spec", str(run_dir / "spec.json"),
                             "--run-dir", str(run_dir)], cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_until(lambda: latest_progress(run_dir).step >= 1, 300, "a first step", proc)
    with open(checkout / "README.md", "a") as f:  # verified at the start; edited while it trains
        f.write("\nedited during a run\n")
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, err[-2000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["torchssl_checkout_clean"] is False
    problems = load_run(run_dir)["problems"]
    assert any(p.startswith(str(run_dir / "result.json")) and "torchssl_checkout_clean" in p for p in problems), \
        problems


# ---------------------------------------------------------------------------------------------------------------
# 8. Stopped processes, clock skew, a copied run folder


@pytest.fixture(scope="module")
def suspended(shared_archive, cifar, tmp_path_factory) -> dict:
    """One run stopped twice as it trains: its training process by SIGSTOP for STOPPED_S (Slurm's suspend), then
    the runner by SIGTSTP (Ctrl-Z) for STOPPED_S. Returns what was seen: the training process's state while the
    runner was stopped, the runner's exit status, the run folder."""
    out = tmp_path_factory.mktemp("suspended") / "out"
    # The runner in a process group of its own inside this session: Ctrl-Z stops it as it would in a terminal (a
    # group with no parent in its session is orphaned, and the kernel discards SIGTSTP for it).
    proc = start_run_all(*TINY, "--steps", "40", "--eval-every", "40", "--checkpoint-every", "1000", "--data",
                         str(shared_archive), "--out", str(out), process_group=0)
    seen = {}
    try:
        run_dir = wait_until(trained_to(out, 3), 300, "a third step", proc)
        child = training_process(run_dir)
        os.kill(child, signal.SIGSTOP)
        time.sleep(STOPPED_S)
        os.kill(child, signal.SIGCONT)
        step = latest_progress(run_dir).step
        wait_until(lambda: latest_progress(run_dir).step >= step + 3, 300, "three more steps", proc)
        proc.send_signal(signal.SIGTSTP)
        wait_until(lambda: state(proc.pid) == "T", 30, "the runner to stop")
        time.sleep(1.0)  # the runner stops its runs before itself
        seen["child while the runner is stopped"] = state(child)
        seen["steps while the runner is stopped"] = -latest_progress(run_dir).step
        time.sleep(STOPPED_S)
        seen["steps while the runner is stopped"] += latest_progress(run_dir).step
        proc.send_signal(signal.SIGCONT)
        proc.communicate(timeout=300)
        seen.update(run_dir=run_dir, returncode=proc.returncode)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.send_signal(signal.SIGCONT)
    return seen


def test_stopped_time_is_not_training_time(suspended):
    run_dir = suspended["run_dir"]
    assert suspended["returncode"] == 0
    marks = [m["train_seconds"] for m in read_metrics(run_dir) if m["kind"] == "train"]
    assert len(marks) == 40
    longest = max(b - a for a, b in zip(marks, marks[1:]))  # a step of this run takes well under a second
    assert longest < STOPPED_S / 2, f"a step took {longest:.1f} s of training time"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["train_seconds"] < result["wall_seconds"] - 2 * STOPPED_S + 2


def test_ctrl_z_of_the_runner_stops_its_training_process_too(suspended):
    assert suspended["child while the runner is stopped"] == "T"
    assert suspended["steps while the runner is stopped"] == 0
    assert suspended["returncode"] == 0  # continued, and finished


def test_status_shows_no_negative_age_for_a_file_ahead_of_the_clock(finished, tmp_path):
    out, run_dir = copy_of(finished, tmp_path / "out")
    (run_dir / "result.json").unlink()  # unfinished: --status says when it last logged
    ahead = time.time() + 3600
    os.utime(run_dir / "metrics.jsonl", (ahead, ahead))
    r = run_all("--status", "--out", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    [line] = [line.replace(run_dir.name, "") for line in r.stdout.splitlines() if run_dir.name in line]
    assert not re.search(r"-\d+:\d\d:\d\d", line), line


def test_a_run_folder_copied_under_another_name_is_counted_once(finished, tmp_path):
    import csv

    from harness.report import write_report

    out, run_dir = copy_of(finished, tmp_path / "out")
    shutil.copytree(run_dir, out / "runs" / "a-copy", symlinks=True)
    write_report(out)
    with open(out / "runs.csv") as f:
        rows = {row["run"]: row["files_check_out"] for row in csv.DictReader(f)}
    assert set(rows) == {run_dir.name, "a-copy"} and sorted(rows.values()) == ["False", "True"]  # one flagged
