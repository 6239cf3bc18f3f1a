"""The fault suite: what the project survives, on real processes and files, on the CPU, as one summary table.

    python bench/faults.py --data ../shared/data/cifar10-jpeg.tar.gz [--impls own torchssl] [--seed 0]
                           [--parts kills damage inputs] [--summary FILE.md] [--work DIR] [--keep]

About 9 CPU-minutes (26 minutes of wall time on a busy 2-core machine). Every run is tiny (the smoke preset with
B=2, mu=1, 12 steps, an evaluation every 4 steps on 200 test images, a checkpoint every 2 steps) and is compared
with an uninterrupted run of the same spec.

- kills: run_all.py is started and, at a random step, during an evaluation or during a checkpoint write, killed:
  kill -9 of the runner alone, kill -9 of the runner's and the training process's whole process groups, or SIGHUP
  to the runner; also kill -9 during the warm-up. Measured: seconds until no process of the run is left, then a
  second call must resume and reach exactly the planned steps, with the split and data checksums of the
  uninterrupted run, a result that harness/verify.py finds consistent, and (ours) evaluations bit-identical to the
  uninterrupted run's. TorchSSL reseeds its random generators from the spec's seed on every start, so its resumed
  evaluations differ from an uninterrupted run's by design; for it only steps, checksums and consistency count.
- damage: checkpoints, result.json, spec.json, split files, cached arrays and identity.json damaged between calls:
  the next call must name the file and survive (resume, redo, rebuild), or refuse with one line naming it.
- inputs: bad command lines, each must end with one line on stderr and a non-zero exit, before any run starts.

Random moments come from --seed. Uses the data cache and TorchSSL checkout of the user (as run_all.py does).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import pickle
import platform
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import common
from harness.lifeline import processes_naming  # common puts the checkout on sys.path)

STEPS, EVAL_EVERY, CHECKPOINT_EVERY = 12, 4, 2
TINY = ["--no-identity", "--budgets", "40", "--preset", "smoke", "--batch-size", "2", "--uratio", "1",
        "--eval-subset", "200",        "--eval-batch-size", "100", "--device", "cpu", "--log-every", "1", "--steps", str(STEPS), "--eval-every",
        str(EVAL_EVERY), "--checkpoint-every", str(CHECKPOINT_EVERY)]
GONE_LIMIT_S = 10.0  # a killed runner's training process must be gone within this
CHECKPOINT_TMP = {"own": "checkpoint.pt.tmp", "torchssl": "torchssl/latest_model.pth.tmp"}
CHECKPOINT = {"own": "checkpoint.pt", "torchssl": "torchssl/latest_model.pth"}


@dataclass
class Row:
    part: str
    fault: str
    impl: str
    when: str = ""
    detected: str = ""
    outcome: str = ""
    ok: bool = False


@dataclass
class Suite:
    work: Path
    data: str
    rng: random.Random
    torchssl_source: str | None
    rows: list[Row] = field(default_factory=list)
    refs: dict[str, dict] = field(default_factory=dict)  # impl -> the uninterrupted run's result

    def env(self, **extra: str) -> dict[str, str]:
        # one thread per process: tiny steps on shared cores
        return {**os.environ, "PYTHONPATH": str(common.REPO), "OMP_NUM_THREADS": "1", **extra}

    def args(self, impl: str, out: Path, warmup: bool = False) -> list[str]:
        extra = ["--torchssl-source", self.torchssl_source] if self.torchssl_source else []
        return [*TINY, "--impls", impl, "--data", self.data, "--out", str(out), *extra,
                *([] if warmup else ["--no-warmup"])]

    def call(self, args: list[str], timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(common.REPO / "run_all.py"), *args], cwd=self.work,
                              env=self.env(**env), capture_output=True, text=True, timeout=timeout)

    def start(self, args: list[str], name: str) -> subprocess.Popen:
        """run_all.py in its own process group (so that a group kill spares this script), output to a file."""
        log = open(self.work / f"{name}.out", "w")
        return subprocess.Popen([sys.executable, str(common.REPO / "run_all.py"), *args], cwd=self.work,
                                env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def fresh(self, name: str) -> Path:
        out = self.work / name
        shutil.rmtree(out, ignore_errors=True)
        return out


# ---------------------------------------------------------------------------------------------------------------
# Looking at runs and processes


def records(run_dir: Path) -> list[dict]:
    from contract.results import read_metrics

    return read_metrics(run_dir)


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


def gone_after(text: str, limit: float = 60.0) -> float | None:
    """Seconds until no process names `text` (None: still there after `limit`)."""
    t0 = time.monotonic()
    return time.monotonic() - t0 if wait_for(lambda: not processes_naming(text), limit, 0.1) is not None else None


def moment(out: Path, impl: str, kind: str, rng: random.Random, proc: subprocess.Popen) -> tuple[Path, str] | None:
    """Wait for a kill moment: 'step' (after a random step), 'eval' (an evaluation under way), 'checkpoint' (a
    checkpoint being written: its temporary file exists). Returns (run folder, what was under way at the kill)."""
    first = rng.randint(2, STEPS - 3)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        run_dir = run_dir_of(out)
        if run_dir is None:
            time.sleep(0.2)
            continue
        if kind == "checkpoint":  # a write after the first: there is a checkpoint to fall back on
            if (run_dir / CHECKPOINT_TMP[impl]).exists() and (run_dir / CHECKPOINT[impl]).exists():
                return run_dir, "a checkpoint write"
            time.sleep(0.002)
            continue
        recs = records(run_dir)
        train = [r["step"] for r in recs if r.get("kind") == "train"]
        evals = {r["step"] for r in recs if r.get("kind") == "eval"}
        last = train[-1] if train else 0
        if kind == "step" and last >= first:
            return run_dir, f"step {last + 1}"
        if kind == "eval" and last >= EVAL_EVERY and last % EVAL_EVERY == 0 and last not in evals:
            return run_dir, f"the evaluation after step {last}"
        time.sleep(0.01)
    return None


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


# ---------------------------------------------------------------------------------------------------------------
# Checking a finished run against the uninterrupted one


def reference(suite: Suite, impl: str) -> dict:
    if impl not in suite.refs:
        out = suite.fresh(f"ref-{impl}")
        r = suite.call(suite.args(impl, out))
        if r.returncode != 0:
            raise RuntimeError(f"the uninterrupted {impl} run failed:\n{r.stderr[-3000:]}")
        suite.refs[impl] = json.loads((run_dir_of(out) / "result.json").read_text())
    return suite.refs[impl]


def judge(suite: Suite, impl: str, run_dir: Path, r: subprocess.CompletedProcess) -> tuple[str, bool]:
    """(what the finishing call did, whether it is what it must be)."""
    from harness.verify import load_run

    if r.returncode != 0 or not (run_dir / "result.json").exists():
        return f"second call exit {r.returncode}: {(r.stderr.strip().splitlines() or ['?'])[-1][:120]}", False
    ref, result = reference(suite, impl), json.loads((run_dir / "result.json").read_text())
    resumed = [line.split(" at step ")[1].split(" ")[0] for line in (run_dir / "log.txt").read_text().splitlines()
               if "resuming" in line and " at step " in line]
    train_steps = [m["step"] for m in records(run_dir) if m.get("kind") == "train"]
    steps_ok = result["steps"] == STEPS and train_steps == list(range(1, STEPS + 1))
    sums_ok = all(result[k] == ref[k] for k in ("split_sha256", "data_sha256", "spec_hash"))
    problems = load_run(run_dir)["problems"]
    same = result["evals"] == ref["evals"]
    if impl == "own":
        evals = "evaluations bit-identical" if same else "EVALUATIONS DIFFER"
    else:
        evals = "evaluations equal" if same else "evaluations differ (TorchSSL reseeds on resume, as stated)"
    text = (f"{'resumed at step ' + resumed[-1] if resumed else 'not resumed'}; steps {result['steps']}/{STEPS}"
            f"{'' if steps_ok else ' (LOGGED STEPS WRONG)'}; checksums {'equal' if sums_ok else 'DIFFER'}; "
            f"{evals}{'; ' + problems[0] if problems else ''}")
    return text, steps_ok and sums_ok and not problems and (same or impl != "own")


# ---------------------------------------------------------------------------------------------------------------
# Part 1: kills


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
    cut_short = kind == "checkpoint" and (run_dir / CHECKPOINT_TMP[impl]).exists()  # the write never finished
    row.when = f"during {under_way}" + (" (cut short: its .tmp file left)" if cut_short else "")
    row.detected = (f"no process left after {gone:.1f} s" if gone is not None else "PROCESSES STILL ALIVE after 60 s")
    if how == "hup":
        row.detected += f"; runner exit {proc.returncode}"
    row.outcome, ok = judge(suite, impl, run_dir, suite.call(suite.args(impl, out)))
    row.ok = ok and gone is not None and gone <= GONE_LIMIT_S and (how != "hup" or proc.returncode == 130)
    return row


def warmup_kill_case(suite: Suite) -> Row:
    row = Row("kill", "kill -9 of the runner during its warm-up probe", "own")
    out = suite.fresh("kill-own-warmup")
    proc = suite.start(suite.args("own", out, warmup=True), out.name)
    probe = wait_for(lambda: next((out / ".warmup").glob("*/run/metrics.jsonl"), None), 600)
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
    row.ok = gone is not None and gone <= GONE_LIMIT_S and left and not after and r.returncode == 0
    return row


def kills(suite: Suite, impls: list[str]) -> None:
    cases = {"own": [("runner", "step"), ("runner", "eval"), ("runner", "checkpoint"), ("groups", "step"),
                     ("groups", "eval"), ("groups", "checkpoint"), ("hup", "step")],
             "torchssl": [("runner", "step"), ("groups", "eval"), ("groups", "checkpoint"), ("hup", "step")]}
    for impl in impls:
        reference(suite, impl)
        for how, kind in cases[impl]:
            add(suite, kill_case(suite, impl, how, kind))
    if "own" in impls:
        add(suite, warmup_kill_case(suite))


# ---------------------------------------------------------------------------------------------------------------
# Part 2: damaged files


def stopped_run(suite: Suite, impl: str, name: str) -> tuple[Path, Path]:
    """A run interrupted (SIGTERM to its runner) after step 6 or later: it has a latest and a previous checkpoint."""
    out = suite.fresh(name)
    proc = suite.start(suite.args(impl, out), name)
    wait_for(lambda: run_dir_of(out) and any(r.get("step", 0) >= 6 for r in records(run_dir_of(out))), 600)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    return out, run_dir_of(out)


def finished_copy(suite: Suite, impl: str, name: str) -> tuple[Path, Path]:
    """A copy of the uninterrupted run's results folder (checkpoints included)."""
    reference(suite, impl)
    out = suite.fresh(name)
    shutil.copytree(suite.work / f"ref-{impl}", out)
    return out, run_dir_of(out)


def first_line_with(text: str, needle: str) -> str:
    """The first line of `text` holding `needle`, without a log line's time stamp; "(not found)" if none."""
    line = next((x.strip() for x in text.splitlines() if needle in x), "(not found)")
    stamp = line.split(" ", 2)
    return stamp[2] if len(stamp) == 3 and stamp[0].count("-") == 2 and stamp[1].count(":") == 2 else line


def cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def damaged_checkpoint(suite: Suite, impl: str) -> Row:
    row = Row("damage", f"latest checkpoint ({CHECKPOINT[impl].split('/')[-1]}) cut in half", impl, "between calls")
    out, run_dir = stopped_run(suite, impl, f"damage-{impl}-checkpoint")
    cut(run_dir / CHECKPOINT[impl])
    r = suite.call(suite.args(impl, out))
    row.detected = "named in log.txt: " + first_line_with((run_dir / "log.txt").read_text(), "cannot be read")
    row.outcome, row.ok = judge(suite, impl, run_dir, r)
    row.ok = row.ok and "previous checkpoint" in row.detected
    return row


def both_checkpoints_damaged(suite: Suite) -> Row:
    row = Row("damage", "latest and previous checkpoints cut in half", "own", "between calls")
    out, run_dir = stopped_run(suite, "own", "damage-own-both-checkpoints")
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        cut(run_dir / name)
    first = suite.call(suite.args("own", out))
    row.detected = f"exit {first.returncode}; " + first_line_with(first.stdout + first.stderr, "nor can the previous")
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):  # the way out the message gives
        (run_dir / name).unlink()
    outcome, ok = judge(suite, "own", run_dir, suite.call(suite.args("own", out)))
    row.outcome = "after deleting both as told: restarted; " + outcome
    row.ok = ok and first.returncode == 1 and "delete both" in row.detected
    return row


def damaged_result(suite: Suite, edited: bool) -> Row:
    what = "result.json edited (steps 7, split sha deadbeef, top-1 99.9)" if edited else "result.json cut short"
    row = Row("damage", what, "own", "after the run finished")
    out, run_dir = finished_copy(suite, "own", f"damage-own-result-{'edited' if edited else 'cut'}")
    path = run_dir / "result.json"
    if edited:
        path.write_text(json.dumps({**json.loads(path.read_text()), "steps": 7, "split_sha256": "deadbeef",
                                    "final_top1": 99.9}))
    else:
        cut(path)
    report = suite.call(["--report-only", "--out", str(out)])
    text = (out / "RESULTS.md").read_text() if (out / "RESULTS.md").exists() else ""
    flagged = "DO NOT CHECK OUT" in text and str(path) in text and "| 40 | ours" not in text
    row.detected = (f"--report-only exit {report.returncode}; RESULTS.md "
                    f"{'flags it and leaves it out of the tables' if flagged else 'DOES NOT FLAG IT'}")
    if edited:
        path.rename(run_dir / "result.json.edited")  # what the report says to do
    r = suite.call(suite.args("own", out))
    if not edited:
        row.detected += "; next call: " + first_line_with(r.stderr, "result.json")
    outcome, ok = judge(suite, "own", run_dir, r)
    row.outcome = ("moved away as the report says; " if edited else "") + "finished again from its checkpoint; " + \
        outcome
    row.ok = ok and flagged and report.returncode == 0
    return row


def damaged_spec(suite: Suite) -> Row:
    row = Row("damage", "spec.json of a finished run not JSON", "own", "after the run finished")
    out, run_dir = finished_copy(suite, "own", "damage-own-spec")
    (run_dir / "spec.json").write_text("{not json")
    report = suite.call(["--report-only", "--out", str(out)])
    named = str(run_dir / "spec.json") in (out / "RESULTS.md").read_text()
    r = suite.call(suite.args("own", out))
    row.detected = (f"--report-only exit {report.returncode}, {'names it' if named else 'DOES NOT NAME IT'}; "
                    f"next call: " + first_line_with(r.stderr, "spec.json"))
    outcome, ok = judge(suite, "own", run_dir, r)
    row.outcome = "written again; " + outcome
    row.ok = ok and named and report.returncode == 0
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
    r = suite.call(suite.args("own", out))
    lines = r.stderr.strip().splitlines()
    if edited:
        row.detected = f"exit {r.returncode}: {lines[-1] if lines else ''}"
        row.outcome = "refused before any work (split files are never overwritten)"
        row.ok = r.returncode == 2 and len(lines) == 1 and str(path) in lines[0]
    else:
        row.detected = first_line_with(r.stderr, "split file")
        sha = json.loads(path.read_text())["sha256"]
        row.outcome = (f"drawn again: sha256 {'equal' if sha == reference(suite, 'own')['split_sha256'] else 'DIFFERS'}"
                       f"; exit {r.returncode}")
        row.ok = r.returncode == 0 and sha == reference(suite, "own")["split_sha256"] and "drawn again" in row.detected
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
    row.detected = first_line_with(r.stderr, "damaged")
    sha = json.loads((entry / "identity.json").read_text()).get("data_sha256") if r.returncode == 0 else None
    row.outcome = (f"rebuilt before any run; pixels sha256 {'equal' if sha == expected else 'DIFFERS'}; "
                   f"exit {r.returncode}")
    row.ok = r.returncode == 0 and sha == expected and str(entry) in row.detected
    return row


def damage(suite: Suite, impls: list[str]) -> None:
    cases = [lambda: damaged_checkpoint(suite, "own"), lambda: both_checkpoints_damaged(suite),
             lambda: damaged_result(suite, edited=False), lambda: damaged_result(suite, edited=True),
             lambda: damaged_spec(suite), lambda: damaged_split(suite, edited=False),
             lambda: damaged_split(suite, edited=True), lambda: damaged_cache(suite, "pixels"),
             lambda: damaged_cache(suite, "identity")]
    if "torchssl" in impls:
        cases.insert(1, lambda: damaged_checkpoint(suite, "torchssl"))
    for case in cases:
        add(suite, case())


# ---------------------------------------------------------------------------------------------------------------
# Part 3: bad inputs


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
                                                 str(f["file"].parent / "empty-cache"), "--impls", "torchssl",
                                                 "--torchssl-source", str(f["file"]) + "-missing"], {}),
    ]


def input_case(suite: Suite, i: int, what: str, args: list[str], env: dict, marker: Path) -> Row:
    common_prefix = ["--data", suite.data, "--dry-run", "--preset", "smoke"]
    shown = args[len(common_prefix):] if args[:len(common_prefix)] == common_prefix else args
    shown = shown[shown.index("--impls"):] if "--impls" in shown else shown  # a real call: its point is at the end
    shown = " ".join(Path(a).name if "/" in a else a for a in shown)
    out = suite.work / "inputs" / f"out-{i}"
    if "--out" not in args:
        args = [*args, "--out", str(out)]
    if "--cache-dir" in args:  # a fresh cache must not decode the data for nothing: link the decoded entry
        cache = Path(args[args.index("--cache-dir") + 1])
        if cache.name == "empty-cache" and not cache.exists():
            from harness.data import load_cifar10

            real = load_cifar10(suite.data).data_dir
            (cache / "arrays").mkdir(parents=True)
            (cache / "arrays" / real.name).symlink_to(real)
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
    files = bad_data_sources(suite.work / "inputs")
    cases = bad_inputs(suite, files)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:  # mostly start-up time: two at a time
        rows = list(pool.map(lambda c: input_case(suite, c[0], *c[1], files["marker"]), enumerate(cases)))
    for row in rows:
        add(suite, row)


# ---------------------------------------------------------------------------------------------------------------
# The table


def shorten(text: str, work: Path, limit: int = 230) -> str:
    """Paths inside the scratch folder written from it (W/...), and at most `limit` characters."""
    text = text.replace(str(work), "W")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def add(suite: Suite, row: Row) -> None:
    """Keep a row for the table (paths in the scratch folder shortened) and print it at once."""
    row.detected, row.outcome = shorten(row.detected, suite.work), shorten(row.outcome, suite.work)
    suite.rows.append(row)
    print(f"{'ok  ' if row.ok else 'FAIL'} {row.part:6s} {row.impl:8s} {row.fault}: {row.detected} -> {row.outcome}",
          flush=True)


def table(rows: list[Row]) -> list[str]:
    lines = ["| # | part | fault | impl | when / input | detected / named | outcome | ok |",
             "|---:|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        cells = [str(i), r.part, r.fault, r.impl, r.when, r.detected, r.outcome, "yes" if r.ok else "**NO**"]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return lines


def summary(rows: list[Row], argv: list[str], seconds: float, seed: int) -> str:
    import torch

    from harness.env import code_version, machine_info

    counts = []
    for part in ("kill", "damage", "input"):
        mine = [r for r in rows if r.part == part]
        if mine:
            counts.append(f"{part}: {sum(r.ok for r in mine)}/{len(mine)} survived as required")
    shown = []  # where the output goes is not part of the command's meaning
    for a in argv:
        if shown and shown[-1] in ("--summary", "--work"):
            shown.pop()
        elif a != "--keep":
            shown.append(a)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"] * 3
    return "\n".join([
        "# Fault suite", "",
        f"- Command: `python bench/faults.py {' '.join(shown)}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M %Z')}; wall time {seconds / 60:.1f} min; random moments from seed "
        f"{seed}",
        f"- Machine: {machine_info('cpu')}, {platform.system()} {platform.release()}; Python "
        f"{platform.python_version()}, torch {torch.__version__}; code {code_version()}; load average at the end "
        f"{' / '.join(load)} (1 / 5 / 15 min)",
        f"- Runs: smoke preset, B=2, mu=1, {STEPS} steps, evaluation every {EVAL_EVERY} steps on 200 test images, "
        f"checkpoint every {CHECKPOINT_EVERY} steps; each compared with an uninterrupted run of the same spec",
        f"- Result: {'; '.join(counts)}", "",
        *table(rows), "",
        "TorchSSL reseeds its random generators from the spec's seed every time it starts, so a resumed TorchSSL run "
        "replays the data order and augmentations of its first steps and its evaluations differ from an "
        "uninterrupted run's; for it the suite checks the steps, the checksums and the result's consistency only. "
        "Ours restores every random state and must match bit for bit. Paths inside the suite's scratch folder are "
        "written W/....", ""])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--data", default=os.environ.get("FIXMATCH_BENCH_DATA"),
                   help="CIFAR-10 source as run_all.py takes it (default: $FIXMATCH_BENCH_DATA)")
    p.add_argument("--impls", nargs="+", default=["own", "torchssl"], choices=["own", "torchssl"])
    p.add_argument("--parts", nargs="+", default=["kills", "damage", "inputs"], choices=["kills", "damage", "inputs"])
    p.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    p.add_argument("--torchssl-source", default=None, help="as run_all.py's")
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
    suite, t0 = Suite(work, data, random.Random(args.seed), args.torchssl_source), time.monotonic()
    try:
        if "kills" in args.parts:
            kills(suite, args.impls)
        if "damage" in args.parts:
            damage(suite, args.impls)
        if "inputs" in args.parts:
            inputs(suite)
    finally:
        text = summary(suite.rows, sys.argv[1:], time.monotonic() - t0, args.seed)
        print("\n" + text)
        if args.summary is not None:
            args.summary.parent.mkdir(parents=True, exist_ok=True)
            args.summary.write_text(text)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if suite.rows and all(r.ok for r in suite.rows) else 1


if __name__ == "__main__":
    common.run_main("bench/faults.py", main)
