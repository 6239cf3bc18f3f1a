"""The identity check as the harness runs it: one subprocess per algorithm (python -m identity) on the CPU, before the
training runs, writing OUT/identity/<algorithm>.json; a check of the same code and settings already there is kept."""
from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path

from contract.results import read_json, write_json_atomic
from contract.spec import RunFiles, write_spec
from harness.env import PACKAGE_ROOT, machine_info
from harness.launch import child_env
from harness.plan import PlannedRun

IDENTITY_DIR = "identity"
STEPS = 20  # K, steps in lockstep
# The code whose behaviour the check's answer depends on: a change to any of it reruns the check.
CHECKED_CODE = ("own_impl", "identity", "contract", "third_party")


def algorithms_to_check(runs: list[PlannedRun]) -> list[str]:
    """The algorithms whose runs include both ours and TorchSSL's, in plan order."""
    impls: dict[str, set[str]] = {}
    for r in runs:
        impls.setdefault(r.spec.algorithm, set()).add(r.spec.impl)
    return [a for a, found in impls.items() if {"own", "torchssl"} <= found]


def code_fingerprint() -> str:
    """sha256 of the checked code's Python files (names and bytes) and the torch version."""
    import torch

    h = hashlib.sha256(torch.__version__.encode())
    for folder in CHECKED_CODE:
        for path in sorted((PACKAGE_ROOT / folder).rglob("*.py")):
            h.update(str(path.relative_to(PACKAGE_ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def identity_paths(out: Path, algorithm: str) -> tuple[Path, Path, Path]:
    """(spec folder, result JSON, log) of an algorithm's check under OUT."""
    folder = Path(out) / IDENTITY_DIR
    return folder / algorithm, folder / f"{algorithm}.json", folder / f"{algorithm}.log"


def run_identity(runs: list[PlannedRun], out: Path, shared: RunFiles, steps: int = STEPS) -> dict[str, bool | None]:
    """The check of every algorithm that has both implementations in `runs`; by algorithm, whether it passed (None:
    it could not run; the JSON then holds the error). shared: harness.launch.shared_files (data, TorchSSL)."""
    verdicts = {}
    for algorithm in algorithms_to_check(runs):
        base = next(r for r in runs if r.spec.algorithm == algorithm and r.spec.impl == "torchssl")
        spec = dataclasses.replace(base.spec, impl="own", recipe="torchssl")
        spec_dir, result_path, log_path = identity_paths(out, algorithm)
        key = hashlib.sha256(f"{spec.hash()} {steps} {code_fingerprint()} {shared.torchssl_checkout}".encode()
                             ).hexdigest()[:16]
        if result_path.exists():
            try:
                previous = read_json(result_path, "identity result")
                if previous.get("key") == key and "verdict" in previous:
                    print(f"identity check of {algorithm}: kept ({previous['verdict']['exact']})")
                    verdicts[algorithm] = previous["verdict"]["passed"]
                    continue
            except ValueError:
                pass  # damaged: run again
        write_spec(spec_dir, spec, RunFiles(
            data_dir=shared.data_dir, split_file=str(base.split_file.resolve()), device="cpu",
            code_version=shared.code_version, machine=machine_info("cpu"), data_source=shared.data_source,
            torchssl_checkout=shared.torchssl_checkout))
        cmd = [sys.executable, "-m", "identity", "--spec", str(spec_dir / "spec.json"), "--out", str(result_path),
               "--steps", str(steps), "--key", key]
        print(f"identity check of {algorithm}: {steps} steps of ours and TorchSSL's in lockstep on the CPU ...",
              flush=True)
        with open(log_path, "w") as log:
            code = subprocess.run(cmd, cwd=PACKAGE_ROOT, stdout=log, stderr=subprocess.STDOUT, env=child_env()
                                  ).returncode
        result = read_json(result_path, "identity result") if result_path.exists() and code in (0, 1) else None
        if result is None or result.get("key") != key:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            write_json_atomic(result_path, {"algorithm": algorithm, "key": key, "error": tail[0],
                                            "log": str(log_path)})
            print(f"identity check of {algorithm} could not run (exit {code}): {tail[0]}", file=sys.stderr)
            verdicts[algorithm] = None
            continue
        v = result["verdict"]
        print(f"identity check of {algorithm}: {v['exact']}; {v['shipped']}; {v['power']}")
        verdicts[algorithm] = v["passed"]
    return verdicts
