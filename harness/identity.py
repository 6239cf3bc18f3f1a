"""The identity check as the harness runs it: one subprocess per algorithm and pair (ours against TorchSSL, ours
against USB, USB against TorchSSL: python -m identity) on the CPU, before the training runs, writing
OUT/identity/<name>.json; a check of the same code, settings and checkouts already there is kept."""
from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from contract.results import read_json, write_json_atomic
from contract.spec import RunFiles, write_spec
from harness.env import PACKAGE_ROOT, machine_info
from harness.launch import child_env
from harness.plan import PlannedRun

IDENTITY_DIR = "identity"
STEPS = 20  # K, steps in lockstep
# The code whose behaviour the check's answer depends on: a change to any of it reruns the check.
CHECKED_CODE = ("own_impl", "identity", "contract", "third_party")


class Pair(NamedTuple):
    """What is checked against which reference, for one algorithm."""

    algorithm: str
    subject: str  # "own" (ours, with the reference's recipe) or "usb"
    reference: str  # "torchssl" or "usb"

    @property
    def name(self) -> str:
        """The file name's stem: <algorithm> for ours against TorchSSL, <algorithm>-usb against USB, and
        <algorithm>-usb-vs-torchssl for USB against TorchSSL."""
        if self.subject == "own":
            return self.algorithm if self.reference == "torchssl" else f"{self.algorithm}-{self.reference}"
        return f"{self.algorithm}-{self.subject}-vs-{self.reference}"


PAIRS = (("own", "torchssl"), ("own", "usb"), ("usb", "torchssl"))


def pairs_to_check(runs: list[PlannedRun]) -> list[Pair]:
    """Every (subject, reference) of PAIRS whose two implementations the plan runs for an algorithm, in plan order."""
    impls: dict[str, set[str]] = {}
    for r in runs:
        impls.setdefault(r.spec.algorithm, set()).add(r.spec.impl)
    return [Pair(a, s, ref) for a, found in impls.items() for s, ref in PAIRS if {s, ref} <= found]


def code_fingerprint() -> str:
    """sha256 of the checked code's Python files (names and bytes) and the torch version."""
    import torch

    h = hashlib.sha256(torch.__version__.encode())
    for folder in CHECKED_CODE:
        for path in sorted((PACKAGE_ROOT / folder).rglob("*.py")):
            h.update(str(path.relative_to(PACKAGE_ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def identity_paths(out: Path, name: str) -> tuple[Path, Path, Path]:
    """(spec folder, result JSON, log) of one check under OUT."""
    folder = Path(out) / IDENTITY_DIR
    return folder / name, folder / f"{name}.json", folder / f"{name}.log"


def run_identity(runs: list[PlannedRun], out: Path, shared: RunFiles, steps: int = STEPS) -> dict[str, bool | None]:
    """Every check pairs_to_check finds; by check name, whether it passed (None: it could not run; the JSON then
    holds the error). shared: harness.launch.shared_files (data and the checkouts)."""
    verdicts = {}
    for pair in pairs_to_check(runs):
        base = next(r for r in runs if r.spec.algorithm == pair.algorithm and r.spec.impl == pair.reference)
        spec = dataclasses.replace(base.spec, impl="own", recipe=pair.reference)
        spec_dir, result_path, log_path = identity_paths(out, pair.name)
        key = hashlib.sha256(f"{spec.hash()} {steps} {pair} {code_fingerprint()} {shared.torchssl_checkout} "
                             f"{shared.usb_checkout}".encode()).hexdigest()[:16]
        what = f"identity check, {pair.algorithm}: {pair.subject} against {pair.reference}"
        if result_path.exists():
            try:
                previous = read_json(result_path, "identity result")
                if previous.get("key") == key and "verdict" in previous:
                    print(f"{what}: kept ({previous['verdict']['exact']})")
                    verdicts[pair.name] = previous["verdict"]["passed"]
                    continue
            except ValueError:
                pass  # damaged: run again
        write_spec(spec_dir, spec, RunFiles(
            data_dir=shared.data_dir, split_file=str(base.split_file.resolve()), device="cpu",
            code_version=shared.code_version, machine=machine_info("cpu"), data_source=shared.data_source,
            torchssl_checkout=shared.torchssl_checkout, usb_checkout=shared.usb_checkout))
        cmd = [sys.executable, "-m", "identity", "--spec", str(spec_dir / "spec.json"), "--out", str(result_path),
               "--steps", str(steps), "--subject", pair.subject, "--reference", pair.reference, "--key", key]
        print(f"{what}: {steps} steps in lockstep on the CPU ...", flush=True)
        with open(log_path, "w") as log:
            code = subprocess.run(cmd, cwd=PACKAGE_ROOT, stdout=log, stderr=subprocess.STDOUT, env=child_env()
                                  ).returncode
        result = read_json(result_path, "identity result") if result_path.exists() and code in (0, 1) else None
        if result is None or result.get("key") != key:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            write_json_atomic(result_path, {"algorithm": pair.algorithm, "subject": pair.subject,
                                            "reference": pair.reference, "key": key, "error": tail[0],
                                            "log": str(log_path)})
            print(f"{what} could not run (exit {code}): {tail[0]}", file=sys.stderr)
            verdicts[pair.name] = None
            continue
        v = result["verdict"]
        print(f"{what}: {v['exact']}; {v['shipped']}; {v['power']}")
        verdicts[pair.name] = v["passed"]
    return verdicts
