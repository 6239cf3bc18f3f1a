"""The harness end to end on the CPU: planning, identical splits, skip, resume after a kill, failure reporting."""
import json
import signal
import subprocess
import sys
import time

import pytest

from contract.results import read_metrics
from harness.plan import plan_runs, preset_values

from conftest import REPO, as_in_a_terminal

TINY = ["--preset", "smoke", "--batch-size", "2", "--uratio", "1", "--eval-subset", "100", "--eval-batch-size", "100",
        "--device", "cpu", "--no-warmup"]


def test_plan_gives_every_implementation_the_same_split(tmp_path):
    splits = {(n, s): (tmp_path / f"{n}-{s}.json", f"{n}{s}".ljust(64, "0")) for n in (40, 250) for s in (0, 1)}
    runs = plan_runs(budgets=[40, 250], seeds=[0, 1], impls=["own", "torchssl"],
                     values=preset_values("smoke", {"steps": 7}), out_dir=tmp_path, data_kind="k",
                     data_sha256="d" * 64, splits=splits)
    assert len(runs) == 8 and len({r.run_dir for r in runs}) == 8
    for r in runs:
        assert r.spec.steps == 7 and r.spec.batch_size == 4  # override and preset value
        assert (r.split_file, r.spec.split_sha256) == splits[(r.spec.n_labels, r.spec.seed)]
    by_pair = {}
    for r in runs:
        by_pair.setdefault((r.spec.n_labels, r.spec.seed), []).append(r.spec)
    for own, theirs in by_pair.values():
        assert (own.impl, own.recipe, theirs.impl, theirs.recipe) == ("own", "paper", "torchssl", "torchssl")
        assert {k: v for k, v in own.to_dict().items() if k not in ("impl", "recipe")} == \
               {k: v for k, v in theirs.to_dict().items() if k not in ("impl", "recipe")}
    # ours once per recipe; TorchSSL once, with its own: ours (TorchSSL recipe) differs from TorchSSL in impl only
    three = plan_runs(budgets=[40], seeds=[0], impls=["own", "torchssl"], recipes=["paper", "torchssl"],
                      values=preset_values("smoke", {}), out_dir=tmp_path, data_kind="k", data_sha256="d" * 64,
                      splits=splits)
    assert [(r.spec.impl, r.spec.recipe) for r in three] == [("own", "paper"), ("own", "torchssl"),
                                                             ("torchssl", "torchssl")]
    diff = lambda a, b: {k for k, v in a.spec.to_dict().items() if b.spec.to_dict()[k] != v}  # noqa: E731
    assert diff(three[1], three[2]) == {"impl"} and diff(three[0], three[1]) == {"recipe"}
    with pytest.raises(ValueError, match="impl 'mixmatch' is not one of"):
        plan_runs(budgets=[40], seeds=[0], impls=["mixmatch"], values=preset_values("smoke", {}), out_dir=tmp_path,
                  data_kind="k", data_sha256="d" * 64, splits=splits)


def _run_all(out, *extra, **kw):
    return subprocess.Popen([sys.executable, "run_all.py", "--impls", "own", "--out", str(out), *TINY, *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=as_in_a_terminal, **kw)


def test_killed_run_resumes_and_finished_runs_are_skipped(shared_archive, cifar, tmp_path):
    out = tmp_path / "res"
    args = ["--budgets", "40", "--steps", "40", "--eval-every", "20", "--checkpoint-every", "5", "--log-every", "1",
            "--data", str(shared_archive)]
    proc = _run_all(out, *args)
    deadline = time.time() + 240
    run_dir = None
    while time.time() < deadline:  # wait until the run has checkpointed past step 5, then interrupt the harness
        dirs = list((out / "runs").glob("*")) if (out / "runs").exists() else []
        if dirs and any(r.get("step", 0) >= 7 for r in read_metrics(dirs[0])):
            run_dir = dirs[0]
            break
        if proc.poll() is not None:
            pytest.fail(f"run_all ended early:\n{proc.stdout.read()}")
        time.sleep(0.5)
    assert run_dir is not None, "the run made no progress in time"
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=180)[0]
    assert proc.returncode == 130, text
    assert not (run_dir / "result.json").exists()
    done_before = max(r["step"] for r in read_metrics(run_dir))
    assert 7 <= done_before < 40

    again = _run_all(out, *args)
    text = again.communicate(timeout=600)[0]
    assert again.returncode == 0, text
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 40
    train_steps = [r["step"] for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert train_steps == list(range(1, 41))  # every step logged exactly once across the two processes
    assert [e["step"] for e in result["evals"]] == [20, 40]
    assert (out / "RESULTS.md").exists()

    mtime = (run_dir / "result.json").stat().st_mtime_ns
    third = _run_all(out, *args)
    text = third.communicate(timeout=300)[0]
    assert third.returncode == 0 and "done already" in text
    assert (run_dir / "result.json").stat().st_mtime_ns == mtime


def test_a_failed_run_is_reported_and_the_others_go_on(cifar, tmp_path, capsys):
    from harness.launch import pending, shared_files
    from harness.runner import LocalScheduler
    from harness.splits import ensure_split

    splits = {(n, 0): ensure_split(tmp_path, "cifar10", cifar.train_y, n, 0, cifar.identity.data_sha256)
              for n in (40, 250)}
    values = preset_values("smoke", {"steps": 2, "eval_every": 2, "batch_size": 2, "uratio": 1, "eval_subset": 100})
    runs = plan_runs(budgets=[40, 250], seeds=[0], impls=["own"], values=values, out_dir=tmp_path,
                     data_kind=cifar.identity.kind, data_sha256=cifar.identity.data_sha256, splits=splits)
    broken = runs[0].split_file
    payload = json.loads(broken.read_text())
    payload["labeled_indices"][0] += 1  # the split file no longer matches its checksum: the run must refuse it
    broken.write_text(json.dumps(payload))
    failed = LocalScheduler(pending(runs), shared_files(cifar.data_dir), ["cpu"]).run()
    assert [r.spec.n_labels for r in failed] == [40]
    assert (runs[1].run_dir / "result.json").exists()
    err = capsys.readouterr()
    assert "FAILED" in err.out + err.err and "corrupt" in err.out + err.err
