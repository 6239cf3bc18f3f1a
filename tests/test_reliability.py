"""What the project survives, on real processes and files: a killed runner, hang-ups, crafted data files, paths
with ~ or relative to another folder, damaged bookkeeping files, checkpoints and cache entries, edited results."""
from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from contract.results import read_metrics
from contract.spec import read_spec
from harness.data import CIFAR10_CLASSES, load_cifar10
from harness.lifeline import processes_naming

from conftest import REPO, flat, run_module, wait_until

TINY = ["--impls", "own", "--budgets", "40", "--preset", "smoke", "--batch-size", "2", "--uratio", "1",
        "--eval-subset", "100", "--eval-batch-size", "100", "--device", "cpu", "--log-every", "1"]
QUIET = {"OMP_NUM_THREADS": "1"}  # small steps on shared cores: one thread each


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **QUIET, **extra}


def run_all(*args: str, cwd=REPO, extra_env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run_all.py"), *args], cwd=cwd, env=env(**(extra_env or {})),
                          capture_output=True, text=True, timeout=timeout)


def start_run_all(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "run_all.py"), *args], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)



def seed_cache(cache: Path, cifar) -> None:
    """A cache folder holding the real data's decoded entry (a link to the session's): no decoding needed."""
    (cache / "arrays").mkdir(parents=True)
    (cache / "arrays" / cifar.data_dir.name).symlink_to(cifar.data_dir)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stderr)
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# 1. A training child never outlives its runner; SIGHUP is SIGTERM; warm-up folders never stay


def test_killed_runner_leaves_no_training_process_and_the_next_call_resumes(shared_archive, cifar, tmp_path):
    out = tmp_path / "res"
    args = [*TINY, "--no-warmup", "--steps", "16", "--eval-every", "8", "--checkpoint-every", "2", "--data",
            str(shared_archive), "--out", str(out)]

    def trained_to(step):
        return lambda: next((d for d in (out / "runs").glob("*")
                             if any(r.get("step", 0) >= step for r in read_metrics(d))), None)

    # SIGHUP (a closed terminal): the runner stops its run, which checkpoints, and exits as for Ctrl-C.
    proc = start_run_all(*args)
    run_dir = wait_until(trained_to(2), 300, "a first step", proc)
    proc.send_signal(signal.SIGHUP)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "interrupted" in err, err
    assert "stopped by SIGTERM" in (run_dir / "log.txt").read_text()
    assert processes_naming(str(out)) == []

    # kill -9 of the runner alone: its child notices within seconds, checkpoints and exits.
    proc = start_run_all(*args)
    stepped = max(r["step"] for r in read_metrics(run_dir))
    wait_until(trained_to(stepped + 2), 300, "two more steps", proc)
    children = processes_naming(f"--run-dir {run_dir}")
    assert children, "no training process found"
    proc.kill()
    proc.wait()
    t_kill = time.time()
    wait_until(lambda: not processes_naming(str(out)), 10, "the training process to exit after its runner's kill")
    assert time.time() - t_kill <= 10
    log = (run_dir / "log.txt").read_text()
    assert log.count("stopped by SIGTERM") == 2 and log.count("resuming") == 1
    assert not (run_dir / "result.json").exists()

    r = run_all(*args)  # at once: the folder is free, the run resumes from its checkpoint
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 16 and [e["step"] for e in result["evals"]] == [8, 16]
    assert [m["step"] for m in read_metrics(run_dir) if m["kind"] == "train"] == list(range(1, 17))
    assert (run_dir / "log.txt").read_text().count("resuming") == 2


def test_killed_warmup_leaves_no_process_and_its_folder_goes_with_the_next_call(shared_archive, cifar, tmp_path):
    out = tmp_path / "res"
    args = [*TINY, "--steps", "2", "--eval-every", "2", "--data", str(shared_archive), "--out", str(out)]
    proc = start_run_all(*args)  # with the warm-up probe
    probe = wait_until(lambda: next((out / ".warmup").glob("*/run/metrics.jsonl"), None), 300, "the warm-up probe",
                       proc)
    assert processes_naming(str(probe.parent))
    proc.kill()
    proc.wait()
    wait_until(lambda: not processes_naming(str(out)), 10, "the warm-up probe to exit after its runner's kill")
    assert list((out / ".warmup").iterdir()), "nothing was left to clean (the probe ended too early?)"

    r = run_all(*args, "--no-warmup")
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((out / ".warmup").iterdir()) == []


def test_scratch_folders_go_on_every_exit_and_only_unowned_ones_are_cleaned(tmp_path):
    from harness.lifeline import clean_stale, scratch_folder

    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc), scratch_folder(tmp_path / "w", "x-") as folder:
            (folder / "file").write_text("data")
            raise exc()
        assert not folder.exists()
    left = tmp_path / "w" / "left-by-a-killed-call"  # its owner lock is not held by anyone
    (left / "run").mkdir(parents=True)
    (left / ".owner").touch()
    (left / "run" / ".lock").touch()
    with scratch_folder(tmp_path / "w", "live-") as live:
        assert clean_stale(tmp_path / "w") == [left]
        assert live.exists() and not left.exists()


def test_sighup_sets_the_stop_flag_like_sigterm():
    from contract.runtime import StopFlag

    before = signal.getsignal(signal.SIGHUP)  # SIG_DFL, or SIG_IGN under nohup
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.1)  # the handler runs between bytecodes
        assert stop.signum == signal.SIGHUP
    assert signal.getsignal(signal.SIGHUP) is before


def test_a_child_gets_sigterm_when_the_thread_that_started_it_ends(tmp_path):
    """The parent-death signal, on real processes: a child started by a process that is then killed -9 exits."""
    marker = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", f"""
import subprocess, sys, time
from harness.lifeline import die_with_parent
code = "import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
child = subprocess.Popen([sys.executable, "-c", code], preexec_fn=die_with_parent(), start_new_session=True)
time.sleep(600)
"""], env=env())
    try:
        child = int(wait_until(lambda: marker.exists() and marker.read_text(), 60, "the child"))
        parent.kill()
        parent.wait()
        wait_until(lambda: not Path(f"/proc/{child}").exists() or
                   Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", 10, "the child to end")
    finally:
        if parent.poll() is None:
            parent.kill()


# ---------------------------------------------------------------------------------------------------------------
# 2. Data files are never code


def _batches(folder: Path, evil: dict | None = None) -> Path:
    """A miniature cifar-10-batches-py (10 images per batch); `evil` replaces some files' content."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        content = {"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), "labels": list(range(10))}
        (folder / name).write_bytes(pickle.dumps(content))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(CIFAR10_CLASSES)}))
    for name, content in (evil or {}).items():
        (folder / name).write_bytes(pickle.dumps(content))
    return folder


class RunsCode:
    """Unpickled by a plain pickle.loads, this runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("as_tar", [False, True])
def test_a_crafted_pickle_is_refused_with_one_line_and_never_run(tmp_path, as_tar):
    marker = tmp_path / "code-was-run"
    assert pickle.loads(pickle.dumps(RunsCode(tmp_path / "check"))) == 0 and (tmp_path / "check").exists()
    batches = _batches(tmp_path / "tv" / "cifar-10-batches-py",
                       {"batches.meta": {"label_names": list(CIFAR10_CLASSES), "x": RunsCode(marker)}})
    data = tmp_path / "tv"
    if as_tar:
        data = tmp_path / "cifar-10-python.tar.gz"
        with tarfile.open(data, "w:gz") as tar:
            tar.add(batches, arcname="cifar-10-batches-py")
    r = run_all("--dry-run", "--data", str(data), "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"))
    line = one_error_line(r)
    assert r.returncode == 2 and f"CIFAR-10 file batches.meta in {data} is refused: it asks for posix.system" in line
    assert not marker.exists()
    assert not list((tmp_path / "c").glob("arrays/*/identity.json"))


def _python2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch as Python 2's cPickle wrote CIFAR-10's (protocol 2): numpy 1's module names, the pixels as a
    byte string (BINSTRING), assembled opcode by opcode."""
    def binstring(b: bytes) -> bytes:
        return b"T" + len(b).to_bytes(4, "little") + b

    shape = b"J" + data.shape[0].to_bytes(4, "little") + b"J" + data.shape[1].to_bytes(4, "little") + b"\x86"
    dtype = (b"cnumpy\ndtype\n" + binstring(b"u1") + b"\x89\x88\x87R"  # dtype('u1', False, True)
             + b"(K\x03" + binstring(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")  # its state
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + binstring(b"b") + b"\x87R"
             + b"(K\x01" + shape + dtype + b"\x89" + binstring(data.tobytes()) + b"tb")
    items = binstring(b"data") + array + binstring(b"labels") + b"]" + b"(" + b"".join(
        b"K" + bytes([y]) for y in labels) + b"e"
    return b"\x80\x02}(" + items + b"u."


def test_python2_batches_as_cifar10_ships_them_are_read(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "tv" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rows = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows[name] = rng.integers(0, 256, (10, 3072), dtype=np.uint8)
        (d / name).write_bytes(_python2_batch(rows[name], list(range(10))))
    names = b"".join(b"T" + len(c).to_bytes(4, "little") + c.encode() for c in CIFAR10_CLASSES)
    (d / "batches.meta").write_bytes(b"\x80\x02}(T\x0b\x00\x00\x00label_names](" + names + b"eu.")
    ds = load_cifar10(tmp_path / "tv", cache_dir=tmp_path / "c", counts={"train": 5, "test": 1})
    x = np.load(ds.data_dir / "train_x.npy")
    row = rows["data_batch_2"][3]  # image 13: batch 2, row 3; stored channel-major
    assert x[13, 0, 0].tolist() == [row[0], row[1024], row[2048]]
    assert ds.train_y[:10].tolist() == list(range(10))


# ---------------------------------------------------------------------------------------------------------------
# 3. Paths from flags and the environment


def test_relative_cache_and_data_in_the_environment_work_for_real_runs(shared_archive, cifar, tmp_path):
    work = tmp_path / "work"
    seed_cache(work / "rel-cache", cifar)
    (work / "cifar.tar.gz").symlink_to(shared_archive)
    r = run_all(*TINY, "--no-warmup", "--steps", "2", "--eval-every", "2", "--out", "res", cwd=work,
                extra_env={"FIXMATCH_BENCH_CACHE": "rel-cache", "FIXMATCH_BENCH_DATA": "cifar.tar.gz"})
    assert r.returncode == 0, r.stderr[-3000:]
    [run_dir] = (work / "res" / "runs").glob("*")
    assert json.loads((run_dir / "result.json").read_text())["steps"] == 2
    assert json.loads((run_dir / "spec.json").read_text())["data_dir"] == str(work / "rel-cache" / "arrays" /
                                                                              cifar.data_dir.name)


def test_tilde_in_cache_out_and_data_is_the_home_folder(shared_archive, cifar, tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    seed_cache(home / "x", cifar)
    (home / "cifar.tar.gz").symlink_to(shared_archive)
    mpl = {"MPLCONFIGDIR": os.environ.get("MPLCONFIGDIR", str(Path.home() / ".config" / "matplotlib"))}
    r = run_all(*TINY, "--no-warmup", "--steps", "2", "--eval-every", "2", "--data", "~/cifar.tar.gz", "--out",
                "~/res", "--cache-dir", "~/x", cwd=work, extra_env={"HOME": str(home), **mpl})
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(work.iterdir()) == []  # no literal ./~ folder
    [run_dir] = (home / "res" / "runs").glob("*")
    assert json.loads((run_dir / "result.json").read_text())["steps"] == 2
    assert json.loads((run_dir / "spec.json").read_text())["data_dir"].startswith(str(home / "x" / "arrays"))
    assert (home / "res" / "RESULTS.md").exists()


def test_relative_data_paths_are_made_absolute_once(tmp_path, monkeypatch):
    _tree(tmp_path / "d" / "tree")
    monkeypatch.chdir(tmp_path / "d")
    ds = load_cifar10("tree", cache_dir="c", counts={"train": 2, "test": 1})
    assert ds.data_dir == tmp_path / "d" / "c" / "arrays" / ds.data_dir.name
    assert json.loads((ds.data_dir / "identity.json").read_text())["source"] == str(tmp_path / "d" / "tree")


# ---------------------------------------------------------------------------------------------------------------
# 4 and 7. Damaged or edited bookkeeping files affect only their own run, and are named


def test_a_corrupt_result_and_spec_are_named_and_the_other_runs_go_on(shared_archive, cifar, tmp_path):
    out = tmp_path / "res"
    args = [*TINY, "--no-warmup", "--steps", "2", "--eval-every", "2", "--data", str(shared_archive), "--out",
            str(out)]
    r = run_all(*args, "--seeds", "0", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    run0, run1 = (next((out / "runs").glob(f"cifar10-*-40-seed{s}-own-*")) for s in (0, 1))
    before = json.loads((run0 / "result.json").read_text())
    (run0 / "result.json").write_text('{"impl": "own", "final_top1": 1')  # cut short
    (run1 / "spec.json").write_text("not json")

    r = run_all("--report-only", "--out", str(out))
    assert r.returncode == 0, r.stderr
    report = (out / "RESULTS.md").read_text()
    assert "DO NOT CHECK OUT" in report and f"result file {run0 / 'result.json'} is not valid JSON" in report
    assert f"run spec {run1 / 'spec.json'} is not valid JSON" in report

    r = run_all(*args, "--seeds", "0", "1", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"result file {run0 / 'result.json'} is not valid JSON" in r.stderr and "kept as result.json.damaged" \
        in r.stderr
    assert f"run spec {run1 / 'spec.json'} is not valid JSON" in r.stderr
    after = json.loads((run0 / "result.json").read_text())  # finished again from its checkpoint: same numbers
    assert after["evals"] == before["evals"] and after["steps"] == 2
    assert (run0 / "result.json.damaged").read_text().startswith('{"impl"') and (run1 / "spec.json.damaged").exists()
    assert json.loads((run1 / "spec.json").read_text())["spec"]["seed"] == 1
    assert json.loads(next((out / "runs").glob("cifar10-*-40-seed2-own-*/result.json")).read_text())["steps"] == 2
    assert "DO NOT CHECK OUT" not in (out / "RESULTS.md").read_text()


def test_an_edited_result_is_flagged_and_excluded(make_run_dir, tmp_path):
    import torch

    from contract.spec import read_spec
    from harness.report import write_report
    from harness.verify import load_run
    from own_impl.train import train

    run_dir = make_run_dir("own", steps=2, eval_every=1)
    spec, files = read_spec(run_dir / "spec.json")
    train(spec, files, run_dir, torch.device("cpu"))
    assert load_run(run_dir)["problems"] == []
    assert f"| `{run_dir.name}` | 40 | 0 |" in flat(write_report(tmp_path).read_text())

    honest = (run_dir / "result.json").read_text()
    result = json.loads(honest)
    result.update(steps=7, split_sha256="deadbeef", final_top1=99.9)
    (run_dir / "result.json").write_text(json.dumps(result))
    problems = load_run(run_dir)["problems"]
    where = run_dir / "result.json"
    assert any(p.startswith(f"{where}: steps 7 is not spec.json's 2") for p in problems)
    assert any(p.startswith(f"{where}: split_sha256 deadbeef is not spec.json's") for p in problems)
    assert any(p.startswith(f"{where}: final_top1 99.9 is not ") and "recomputed from metrics.jsonl" in p
               for p in problems)
    text = flat(write_report(tmp_path).read_text())
    assert "1 RUN(S) WHOSE FILES DO NOT CHECK OUT" in text and "steps 7 is not spec.json's 2" in text
    assert "No finished runs yet" in text and f"| `{run_dir.name}` |" not in text

    (run_dir / "result.json").write_text(honest)  # the result as written, but the split file edited
    payload = json.loads(Path(files.split_file).read_text())
    payload["labeled_indices"][0] += 1
    Path(files.split_file).write_text(json.dumps(payload))
    [problem] = load_run(run_dir)["problems"]
    assert problem.startswith(f"{files.split_file}: its indices hash to ")


def test_report_only_on_a_missing_folder_is_one_line(tmp_path):
    r = run_all("--report-only", "--out", str(tmp_path / "nowhere"))
    assert r.returncode == 2
    assert one_error_line(r) == (f"error: --out {tmp_path / 'nowhere'} does not exist; --report-only rebuilds the "
                                 "report of an existing results folder")
    assert not (tmp_path / "nowhere").exists()


# ---------------------------------------------------------------------------------------------------------------
# 5. Checkpoints: the previous one is kept and read when the latest cannot be


def test_rotation_keeps_the_previous_checkpoint_and_reading_falls_back(tmp_path):
    from contract.checkpoints import CheckpointError, previous_path, read_with_fallback, save_rotating

    path = tmp_path / "checkpoint.pt"
    for step in (1, 2, 3):
        save_rotating(path, lambda tmp: tmp.write_text(json.dumps({"step": step})))
    assert previous_path(path).name == "checkpoint.prev.pt"
    assert json.loads(path.read_text())["step"] == 3 and json.loads(previous_path(path).read_text())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]

    def read(p):
        return json.loads(p.read_text())["step"]

    logged = []
    assert read_with_fallback(path, read, logged.append) == (3, path) and logged == []
    path.write_text('{"step": ')
    assert read_with_fallback(path, read, logged.append) == (2, previous_path(path))
    assert logged == [f"warning: checkpoint {path} cannot be read (JSONDecodeError: Expecting value: line 1 column "
                      f"10 (char 9)); resuming from the previous checkpoint {previous_path(path)}"]
    previous_path(path).write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"checkpoint {path} cannot be read .*nor can the previous one "
                                              r"checkpoint.prev.pt .*delete both to restart this run from step 0"):
        read_with_fallback(path, read, logged.append)


def test_own_run_resumes_from_the_previous_checkpoint_when_the_latest_is_damaged(make_run_dir):
    import torch

    from contract.spec import read_spec
    from own_impl import train as train_mod

    run_dir = make_run_dir("own", steps=4, eval_every=2, checkpoint_every=1)
    spec, files = read_spec(run_dir / "spec.json")
    assert train_mod.train(spec, files, run_dir, torch.device("cpu"), stop_after=3) is None
    latest, prev = run_dir / "checkpoint.pt", run_dir / "checkpoint.prev.pt"
    assert torch.load(prev, weights_only=True)["step"] == 2
    latest.write_bytes(latest.read_bytes()[:1000])  # cut short, as a full disk would
    result = train_mod.train(spec, files, run_dir, torch.device("cpu"))
    log = (run_dir / "log.txt").read_text()
    assert f"warning: checkpoint {latest} cannot be read" in log
    assert f"resuming {spec.name} from {prev} at step 2 of 4" in log
    assert result["steps"] == 4 and [e["step"] for e in result["evals"]] == [2, 4]
    assert [m["step"] for m in read_metrics(run_dir) if m["kind"] == "train"] == [1, 2, 3, 4]


def test_no_readable_checkpoint_names_the_files_and_the_way_out(make_run_dir, capsys):
    from contract.spec import read_spec
    from own_impl import train as train_mod

    run_dir = make_run_dir("own", steps=2, eval_every=2, checkpoint_every=1)
    spec, files = read_spec(run_dir / "spec.json")
    latest, prev = run_dir / "checkpoint.pt", run_dir / "checkpoint.prev.pt"
    latest.write_bytes(b"garbage")
    argv = ["--spec", str(run_dir / "spec.json"), "--run-dir", str(run_dir)]
    assert train_mod.main(argv) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"own_impl.train: error: checkpoint {latest} cannot be read (")
    assert line.endswith(f"and there is no previous checkpoint {prev.name} beside it; delete {latest} to restart "
                         f"this run from step 0")
    latest.unlink()  # the way out
    assert train_mod.main(argv) == 0 and json.loads((run_dir / "result.json").read_text())["steps"] == 2


def test_torchssl_resumes_from_its_previous_checkpoint_when_the_latest_is_damaged(make_run_dir, torchssl_checkout):
    import torch


    run_dir = make_run_dir("torchssl", files={"torchssl_checkout": str(torchssl_checkout), "num_workers": 0},
                           steps=3, eval_every=3, checkpoint_every=1)
    first = run_module("third_party.torchssl.entry", run_dir, "--stop-after", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    latest, prev = run_dir / "torchssl" / "latest_model.pth", run_dir / "torchssl" / "latest_model.prev.pth"
    assert torch.load(latest, weights_only=True)["it"] == 2 and torch.load(prev, weights_only=True)["it"] == 1
    latest.write_bytes(b"\0" * 100)
    second = run_module("third_party.torchssl.entry", run_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"warning: checkpoint {latest} cannot be read" in second.stdout
    assert "at step 1 of 3" in second.stdout
    assert (run_dir / "torchssl" / "latest_model.pth.damaged").read_bytes() == b"\0" * 100
    assert torch.load(latest, weights_only=True)["it"] == 3
    assert [m["step"] for m in read_metrics(run_dir) if m["kind"] == "train"] == [1, 2, 3]
    assert json.loads((run_dir / "result.json").read_text())["steps"] == 3


# ---------------------------------------------------------------------------------------------------------------
# 6. A damaged cache entry is found before any run and rebuilt; bad values are refused up front


def _tree(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(2)
    for split, per in (("train", 2), ("test", 1)):
        for cls in CIFAR10_CLASSES:
            (root / split / cls).mkdir(parents=True)
            for n in range(per):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / cls / f"{n}.png")
    return root


@pytest.mark.parametrize("damage", ["identity-not-json", "identity-edited-sha", "pixels-flipped", "array-truncated",
                                    "array-missing"])
def test_a_damaged_cache_entry_is_named_and_rebuilt(tmp_path, capsys, damage):
    counts = {"train": 2, "test": 1}
    tree = _tree(tmp_path / "tree")
    first = load_cifar10(tree, cache_dir=tmp_path / "c", counts=counts)
    entry, good = first.data_dir, {p.name: p.read_bytes() for p in first.data_dir.iterdir()}
    capsys.readouterr()
    if damage == "identity-not-json":
        (entry / "identity.json").write_text("{")
    elif damage == "identity-edited-sha":
        meta = json.loads((entry / "identity.json").read_text())
        (entry / "identity.json").write_text(json.dumps({**meta, "data_sha256": "0" * 64}))
    elif damage == "pixels-flipped":
        raw = bytearray((entry / "train_x.npy").read_bytes())
        raw[-1] ^= 0xFF
        (entry / "train_x.npy").write_bytes(bytes(raw))
    elif damage == "array-truncated":
        (entry / "test_x.npy").write_bytes((entry / "test_x.npy").read_bytes()[:200])
    else:
        (entry / "train_y.npy").unlink()
    again = load_cifar10(tree, cache_dir=tmp_path / "c", counts=counts)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: cached data {entry} is damaged (") and \
        err[0].endswith(f"rebuilding it from {tree}"), err
    assert again.identity == first.identity
    assert {p.name: p.read_bytes() for p in entry.iterdir()} == good
    load_cifar10(tree, cache_dir=tmp_path / "c", counts=counts)
    assert capsys.readouterr().err == ""  # whole again: no second rebuild


@pytest.mark.parametrize("args, message", [
    (["--seeds", str(2**32)], f"--seeds {2**32} is not accepted; seeds are integers in 0..4294967295"),
    (["--seeds", "0", str(10**30)], f"--seeds {10**30} is not accepted"),
    (["--weight-decay", "inf"], "weight_decay must be a finite number, got inf"),
    (["--lambda-u=-inf"], "lambda_u must be a finite number, got -inf"),
    (["--lr", "nan"], "lr must be a finite number, got nan"),
    (["--ema-decay", "inf"], "ema_decay must be a finite number, got inf"),
])
def test_values_that_would_fail_inside_a_run_are_refused_before_any_work(tmp_path, args, message):
    r = run_all(*args, "--dry-run", "--data", str(tmp_path / "not-read"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and message in one_error_line(r)
    assert not (tmp_path / "o").exists()


def test_a_damaged_split_file_is_drawn_again_and_an_edited_one_refused(cifar, tmp_path, capsys):
    from harness.splits import SplitError, ensure_split

    path, sha = ensure_split(tmp_path, "cifar10", cifar.train_y, 40, 3, cifar.identity.data_sha256)
    whole = path.read_text()
    path.write_text(whole[:100])  # cut short
    assert ensure_split(tmp_path, "cifar10", cifar.train_y, 40, 3, cifar.identity.data_sha256) == (path, sha)
    assert path.read_text() == whole and (path.parent / (path.name + ".damaged")).read_text() == whole[:100]
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"warning: split file {path} is unreadable (JSONDecodeError") and "drawn again" in line
    edited = json.loads(whole)
    edited["labeled_indices"][0] += 1  # readable but not this split: never overwritten
    path.write_text(json.dumps(edited))
    with pytest.raises(SplitError, match=f"split file {path} holds split .* it is never overwritten"):
        ensure_split(tmp_path, "cifar10", cifar.train_y, 40, 3, cifar.identity.data_sha256)


# ---------------------------------------------------------------------------------------------------------------
# The fault suite's list of bad command lines (checks/faults.py): each one line and a non-zero exit, nothing run


def test_every_bad_input_of_the_fault_suite_is_one_line(shared_archive, cifar, tmp_path):
    sys.path.insert(0, str(REPO / "checks"))
    try:
        import faults
    finally:
        sys.path.remove(str(REPO / "checks"))
    suite = faults.Suite(tmp_path, str(shared_archive), random.Random(0), None)
    faults.inputs(suite)
    assert len(suite.rows) >= 30
    failed = [f"{r.fault}: {r.detected} ({r.outcome})" for r in suite.rows if not r.ok]
    assert failed == []
    assert not (tmp_path / "inputs" / "code-was-run").exists()


def test_a_reference_checkpoint_that_cannot_be_written_names_it_and_leaves_nothing(tmp_path):
    """TorchSSL's and USB's own save (torch.save) failing as on a full disk: one OSError naming the checkpoint, the
    temporary file gone, the previous checkpoint untouched."""
    from third_party.adapter import save_atomically

    (tmp_path / "latest_model.pth").write_bytes(b"previous")

    def save(name, folder):  # writes part of the file, then fails as torch does on a full disk
        (Path(folder) / name).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    with pytest.raises(OSError, match="cannot write the checkpoint.*a full disk") as e:
        save_atomically(save, "latest_model.pth", tmp_path, keep_previous=True)
    assert e.value.filename == str(tmp_path / "latest_model.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest_model.pth"]
    assert (tmp_path / "latest_model.pth").read_bytes() == b"previous"


def test_an_edited_statistic_is_recovered_from_the_checkpoint_not_afresh(make_run_dir):
    """result.json edited while metrics.jsonl is intact: the advice is to move result.json away (the run is finished
    again from its checkpoint), not to throw the run away; evaluations lost from metrics.jsonl need a fresh start."""
    from harness.verify import AFRESH, REDO, load_run
    from own_impl.train import train

    run = make_run_dir("own", steps=2, eval_every=2, checkpoint_every=2)
    spec, files = read_spec(run / "spec.json")
    train(spec, files, run, "cpu", compile=False)
    result = json.loads((run / "result.json").read_text())
    result["final_top1"] = 99.9
    (run / "result.json").write_text(json.dumps(result))
    problems = load_run(run)["problems"]
    assert problems and all(REDO in p and AFRESH not in p for p in problems)
    (run / "metrics.jsonl").unlink()
    assert any(AFRESH in p for p in load_run(run)["problems"])
