"""One run's launch, the floor every launcher stands on: what its spec.json carries besides the spec (one RunFiles
for the whole call, copied per run), its command, its process and log, and whether it is done. The local scheduler,
the Slurm scheduler and the Slurm job all start runs here."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from contract.spec import SPEC_FILE, RunFiles, write_spec
from harness.env import PACKAGE_ROOT, code_version, default_cache_dir, machine_info
from harness.lifeline import die_with_parent
from harness.plan import PlannedRun
from harness.verify import finished, set_aside_damaged

ENTRY = {"own": "own_impl.train", "torchssl": "third_party.torchssl.entry", "usb": "third_party.usb.entry"}
PROCESS_LOG = "process.log"  # the subprocess's stdout and stderr; each implementation keeps its own log.txt


def shared_files(data_dir: Path, *, data_source: str = "", compile: bool | None = None,
                 num_workers: int | None = None, torchssl_source: str | None = None, usb_source: str | None = None,
                 cache_dir: Path | None = None, need: tuple[str, ...] = ()) -> RunFiles:
    """What every run of this call carries besides its spec (split file and device are filled in per run). The
    checkouts of the references in `need` ("torchssl", "usb") are made (or found and verified) here."""
    from third_party.torchssl import checkout as torchssl
    from third_party.usb import checkout as usb

    cache_dir = cache_dir or default_cache_dir()
    checkouts = {name: str(pin.ensure_checkout(source, cache_dir=cache_dir)) if name in need else None
                 for name, pin, source in (("torchssl", torchssl, torchssl_source), ("usb", usb, usb_source))}
    return RunFiles(data_dir=str(data_dir), split_file="", code_version=code_version(), data_source=data_source,
                    compile=compile, num_workers=num_workers, torchssl_checkout=checkouts["torchssl"],
                    usb_checkout=checkouts["usb"])


def run_files(run: PlannedRun, shared: RunFiles, device: str) -> RunFiles:
    """`shared` for one run: its split file, device and machine, and only the settings its implementation reads."""
    impl = run.spec.impl
    return dataclasses.replace(
        shared, split_file=str(run.split_file.resolve()), device=device, machine=machine_info(device),
        compile=shared.compile if impl == "own" else None,
        num_workers=shared.num_workers if impl != "own" else None,
        torchssl_checkout=shared.torchssl_checkout if impl == "torchssl" else None,
        usb_checkout=shared.usb_checkout if impl == "usb" else None)


def prepare(run: PlannedRun, shared: RunFiles, device: str) -> None:
    """Write the run folder's spec.json: the spec, its inputs, the device, and how the implementation runs."""
    write_spec(run.run_dir, run.spec, run_files(run, shared, device))


def command(run: PlannedRun) -> list[str]:
    return [sys.executable, "-m", ENTRY[run.spec.impl], "--spec", str(run.run_dir / SPEC_FILE), "--run-dir",
            str(run.run_dir)]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: this project importable from any folder, output unbuffered."""
    path = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **extra}


def launch(run: PlannedRun, **popen) -> subprocess.Popen:
    """Start the run's entry point in its folder, output appended to its process.log; `popen`: more Popen options
    (the child gets SIGTERM, and so checkpoints, if the thread that started it dies)."""
    cmd = command(run)
    with open(run.run_dir / PROCESS_LOG, "a") as log:  # the child keeps its own descriptor
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        return subprocess.Popen(cmd, cwd=run.run_dir, stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                                start_new_session=True, **{"preexec_fn": die_with_parent(), **popen})


def log_tail(run_dir: Path, lines: int = 15) -> str:
    path = Path(run_dir) / PROCESS_LOG
    if not path.exists():
        return "(no log)"
    with open(path, errors="replace") as f:
        return "".join(deque(f, maxlen=lines))


def is_done(run: PlannedRun) -> bool:
    return finished(run.run_dir, run.spec.hash())


def pending(runs: list[PlannedRun]) -> list[PlannedRun]:
    """The runs not done yet, with one line for each done one; a damaged result.json or spec.json is set aside
    first (harness/verify.py), so that its run is finished again."""
    todo = []
    for r in runs:
        for line in set_aside_damaged(r.run_dir):
            print(line, file=sys.stderr)
        if is_done(r):
            print(f"done already: {r.spec.name}")
        else:
            todo.append(r)
    return todo
