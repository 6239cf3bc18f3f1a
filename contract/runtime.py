"""What every implementation's entry point shares: its command line, the run-folder lock, stop signals, the log,
exit codes."""
from __future__ import annotations

import fcntl
import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from contract.checkpoints import remove_temporaries

LOG_FILE = "log.txt"
LOCK_FILE = ".lock"

class RunInterrupted(Exception):
    """SIGTERM, SIGHUP or SIGINT arrived; the run wrote a checkpoint after its last whole step and stops."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; the checkpoint resumes it")
        self.signum, self.step = signum, step


class StoppedAfter(Exception):
    """stop_after=k (tests): the run stopped after step k as an interruption would, with a checkpoint written."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: the run stops and keeps its last good checkpoint."""


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder."""


class StopFlag:
    """SIGTERM, SIGHUP (a closed terminal or dropped ssh; a dead runner's parent-death signal is SIGTERM) and SIGINT
    only set a flag that the loop reads between steps, so a checkpoint always holds whole steps. Any number of them
    does the same (a double Ctrl-C, then the runner's parent-death SIGTERM): only SIGKILL loses the steps since the
    last checkpoint."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}
        self._pid = os.getpid()

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker inherited the handler: behave as if it had none
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> "StopFlag":
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: signals stay with whoever owns them
                pass
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def make_log(run_dir: Path) -> Callable[[str], None]:
    """A logger that prints a time-stamped line and appends it to RUN/log.txt."""
    path = Path(run_dir) / LOG_FILE

    def log(msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        print(line, flush=True)
        with open(path, "a") as f:
            f.write(line + "\n")

    return log


@contextmanager
def run_lock(run_dir: Path):
    """Hold RUN/.lock for the whole run, so two processes can never write one run folder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusy(f"run folder {run_dir} is in use by another process; wait for it or stop it") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def resolve_device(name: str):
    """A torch.device from its name; CUDA asked for where there is none is one clear error. cuda means cuda:N
    with N the current device, so the device can be handed to torch.cuda.set_device and compared."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available here")
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    return device


def entry_main(prog: str, description: str, run: Callable, argv: list[str] | None = None,
               add_flags: Callable | None = None, expected: tuple = ()) -> int:
    """The command line every implementation's entry point shares:

        python -m PROG --spec RUN/spec.json --run-dir RUN [--device D] [its own flags]

    run(spec, files, run_dir, device_name, args) does the work; add_flags(parser) adds the entry's own flags."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=description)
    parser.add_argument("--spec", type=Path, required=True, help="the run's spec.json")
    parser.add_argument("--run-dir", type=Path, required=True, help="the run folder (outputs go here)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: spec.json's)")
    parser.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: stop and resume
    if add_flags is not None:
        add_flags(parser)
    args = parser.parse_args(argv)
    run_dir = args.run_dir.resolve()

    def body() -> None:
        from contract.spec import read_spec

        spec, files = read_spec(args.spec)
        run(spec, files, run_dir, args.device or files.device, args)

    return run_entry(prog, run_dir, body, expected)


def run_entry(prog: str, run_dir: Path, body: Callable[[], object], expected: tuple = ()) -> int:
    """Run `body` under the run-folder lock; turn every way it can end into one stderr line and an exit code.

    0 done; 128 + signal when stopped by a signal (checkpoint written); 1 on an error.
    """
    try:
        with run_lock(run_dir):
            for folder in (run_dir, *(p for p in run_dir.iterdir() if p.is_dir())):
                remove_temporaries(folder)  # a killed process's half-written files: never read, now gone
            body()
    except StoppedAfter:
        return 0
    except RunInterrupted as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # before the run's own handlers were installed: nothing was trained yet
        print(f"{prog}: interrupted before training began", file=sys.stderr)
        return 130
    except (RunFolderBusy, NonFiniteLoss, ValueError, OSError, *expected) as e:  # an OSError names its path
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # unexpected: one line here, the traceback in log.txt
        if Path(run_dir).is_dir():
            with open(Path(run_dir) / LOG_FILE, "a") as f:
                f.write(traceback.format_exc())
        print(f"{prog}: error: {type(e).__name__}: {e} (traceback in {Path(run_dir) / LOG_FILE})", file=sys.stderr)
        return 1
    return 0
