"""What ties a call's processes and scratch folders to its life: children that stop when their runner dies, the
wait for a killed call's child to let go of its run folder, and scratch folders that no exit leaves behind."""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

PR_SET_PDEATHSIG = 1  # linux/prctl.h: the signal a process gets when the thread that started it ends
OWNER_FILE = ".owner"  # in a scratch folder: locked by the call that made it, for as long as it lives
LOCK_NAMES = (OWNER_FILE, ".lock")  # .lock: contract.runtime's run-folder lock, held by a training process
RELEASE_WAIT_S = 60.0  # how long a call waits for a killed call's child to checkpoint and let go of a run folder


def die_with_parent() -> Callable[[], None] | None:
    """A Popen preexec_fn that makes the child get SIGTERM when the thread that started it ends, by kill -9 included
    (Linux's parent-death signal). The entries handle SIGTERM by checkpointing after the current step and exiting,
    so a killed runner's child stops within a step. None where prctl does not exist (then nothing changes).

    The runner starts each child from the thread that waits for it, so that thread outlives the child. A runner
    that dies between fork and prctl is caught by comparing the parent's pid afterwards."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the runner is already gone: do not start
            os._exit(128 + signal.SIGTERM)

    return preexec


def _held(lock_file: Path) -> bool:
    """Whether another open file description holds an flock on `lock_file` (False if it does not exist)."""
    if not lock_file.is_file():
        return False
    try:
        f = open(lock_file, "a")
    except OSError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def wait_for_release(run_dir: Path, timeout_s: float = RELEASE_WAIT_S) -> bool:
    """Before starting a run: if a process still holds its folder (the child of a call that was just killed,
    checkpointing on its parent-death signal), wait up to timeout_s for it to finish. True if the folder is free."""
    lock = Path(run_dir) / ".lock"
    if not _held(lock):
        return True
    print(f"waiting up to {timeout_s:.0f} s for the process still holding {run_dir} (a stopped call's run, "
          f"checkpointing) to exit", file=sys.stderr)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if not _held(lock):
            return True
    return False


@contextlib.contextmanager
def scratch_folder(root: Path, prefix: str) -> Iterator[Path]:
    """A new folder under `root`, removed on every exit this process sees (return, exception, Ctrl-C, SIGTERM and
    SIGHUP, which the command line turns into KeyboardInterrupt). One left by a killed call is removed by the next
    call's clean_stale(root): its owner lock is free then."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    owner = open(folder / OWNER_FILE, "w")
    fcntl.flock(owner, fcntl.LOCK_EX)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        owner.close()


def clean_stale(root: Path) -> list[Path]:
    """Remove the folders under `root` that no live process owns (no lock in them held: neither the call that made
    it nor a training process still checkpointing there). Returns the folders removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        locks = [p for p in folder.rglob("*") if p.name in LOCK_NAMES]
        if not any(_held(p) for p in locks):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def processes_naming(text: str) -> list[int]:
    """Pids of the live processes (zombies excluded, this one too) whose command line contains `text`: how a check
    sees that no training process outlived the call that started it. Linux's /proc; empty elsewhere."""
    found = []
    for d in Path("/proc").iterdir() if Path("/proc/self").exists() else ():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            found.append(int(d.name))
    return found
