"""own_impl.train on the real data with tiny batches: the run folder it writes, resume, stops and errors."""
import functools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from contract.results import RESULT_KEYS, read_metrics
from contract.runtime import NonFiniteLoss
from contract.spec import read_spec
from own_impl import algorithms as algorithms_mod
from own_impl import train as train_mod

from conftest import REPO, copy_run, run_module

CPU = torch.device("cpu")
run_cli = functools.partial(run_module, "own_impl.train")  # run_cli(run_dir, *extra, timeout=300)


def test_three_steps_write_the_whole_run_folder(make_run_dir):
    run = make_run_dir("own")  # steps=3, B=2, mu=2, eval on 100 test images, log every step
    spec, _ = read_spec(run / "spec.json")
    r = run_cli(run)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in run.iterdir()} == {"spec.json", "metrics.jsonl", "result.json", "log.txt",
                                              "checkpoint.pt", ".lock"}
    records = read_metrics(run)
    train = [m for m in records if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3]
    assert set(train[0]) == {"kind", "step", "window_steps", "lr", "loss", "loss_x", "loss_u", "mask_rate",
                             "pseudo_acc", "optimizer_steps", "images_per_s", "data_frac", "train_seconds"}
    assert [m["optimizer_steps"] for m in train] == [1, 1, 1]  # counted by the optimizer's own hook
    assert train[0]["lr"] == spec.lr  # step k=0 runs at the base rate
    assert all(0.0 <= m["mask_rate"] <= 1.0 and 0.0 <= m["data_frac"] <= 1.0 for m in train)
    assert 0 < train[0]["train_seconds"] < train[1]["train_seconds"] < train[2]["train_seconds"]
    evals = [m for m in records if m["kind"] == "eval"]
    assert [(m["step"], set(m)) for m in evals] == [(3, {"kind", "step", "top1", "top5", "loss"})]
    assert 0 <= evals[0]["top1"] <= evals[0]["top5"] <= 100 and evals[0]["top1"] % 1 == 0  # 100 images

    result = json.loads((run / "result.json").read_text())
    assert set(RESULT_KEYS) <= set(result)
    assert result["impl"] == "own" and result["steps"] == 3 and result["spec_hash"] == spec.hash()
    assert result["recipe"] == "paper" and result["optimizer_steps"] == 3 and result["resumed_at"] == []
    assert result["median_window"] == 1
    assert result["param_count"] == 1_469_642
    assert result["data_sha256"] == spec.data_sha256 and result["split_sha256"] == spec.split_sha256
    assert result["evals"] == evals and result["final_top1"] == evals[0]["top1"]
    assert result["device"] == "cpu" and result["torch_version"] == torch.__version__
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["spec_hash"] == spec.hash()

    again = run_cli(run)  # result.json with this spec hash: done, nothing rerun
    assert again.returncode == 0 and "is done" in again.stdout
    assert json.loads((run / "result.json").read_text()) == result


def test_interrupted_and_resumed_run_equals_straight_run(make_run_dir, tmp_path):
    # 6 steps straight, against 3 steps + stop + resume + 3 steps; batches span label epochs (40 labels, B=2 ->
    # 20 steps per epoch) so the samplers' positions must come back too, and the augmentation generator.
    straight = make_run_dir("own", steps=6, eval_every=3, checkpoint_every=3, log_every=1)
    spec, files = read_spec(straight / "spec.json")
    resumed = copy_run(straight, tmp_path / "resumed")
    train_mod.train(spec, files, straight, CPU)
    assert train_mod.train(spec, files, resumed, CPU, stop_after=3) is None
    assert torch.load(resumed / "checkpoint.pt", weights_only=True)["step"] == 3
    # a killed session may have logged past its checkpoint: resume must drop that line, not duplicate step 4
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "train", "step": 4, "loss": -1.0}) + "\n")
    train_mod.train(spec, files, resumed, CPU)

    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    moms_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    moms_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(moms_a, moms_b, strict=True))

    keep = ("kind", "step", "lr", "loss", "loss_x", "loss_u", "mask_rate", "pseudo_acc", "top1", "top5")
    strip = lambda rs: [{k: r[k] for k in keep if k in r} for r in rs  # noqa: E731 (timings differ)
                        if r["kind"] != "resume"]
    assert strip(read_metrics(resumed)) == strip(read_metrics(straight))
    assert [r["step"] for r in read_metrics(resumed) if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (straight, resumed))
    assert ra["evals"] == rb["evals"] and [e["step"] for e in ra["evals"]] == [3, 6]
    assert (ra["resumed_at"], rb["resumed_at"]) == ([], [3])
    assert ra["optimizer_steps"] == rb["optimizer_steps"] == 6  # across both processes


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(make_run_dir, monkeypatch):
    run = make_run_dir("own", steps=5, checkpoint_every=1, log_every=2, eval_every=5)
    spec, files = read_spec(run / "spec.json")
    calls = []
    real_loss = algorithms_mod.fixmatch_loss

    def loss_turning_nan_at_step_3(*args, **kwargs):
        calls.append(1)
        loss, stats = real_loss(*args, **kwargs)
        if len(calls) >= 3:
            loss, stats["loss"] = loss * float("nan"), stats["loss"] * float("nan")
        return loss, stats

    monkeypatch.setattr(algorithms_mod, "fixmatch_loss", loss_turning_nan_at_step_3)
    with pytest.raises(NonFiniteLoss, match="non-finite loss between steps 3 and 3.*step 2"):
        train_mod.train(spec, files, run, CPU)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (run / "result.json").exists()


def test_bad_input_is_one_line_on_stderr(make_run_dir, tmp_path, capsys):
    run = make_run_dir("own")
    payload = json.loads((run / "spec.json").read_text())
    payload["split_file"] = str(tmp_path / "no-such-split.json")
    (run / "spec.json").write_text(json.dumps(payload))
    assert train_mod.main(["--spec", str(run / "spec.json"), "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"own_impl.train: error: split file {tmp_path / 'no-such-split.json'} does not exist"]
    if not torch.cuda.is_available():
        assert train_mod.main(["--spec", str(run / "spec.json"), "--run-dir", str(run), "--device", "cuda"]) == 1
        assert capsys.readouterr().err == ("own_impl.train: error: device 'cuda' requested but CUDA is not "
                                           "available here\n")


def test_sigterm_writes_a_checkpoint_and_exits_143(make_run_dir):
    run = make_run_dir("own", steps=10_000, log_every=1, checkpoint_every=10_000, eval_every=10_000,
                       files={"compile": False})  # about signals, not compiling: start stepping at once
    proc = subprocess.Popen([sys.executable, "-m", "own_impl.train", "--spec", str(run / "spec.json"),
                             "--run-dir", str(run)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 120
        while not any(m["kind"] == "train" for m in read_metrics(run)):
            assert proc.poll() is None and time.time() < deadline, "the run never logged a step"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM after step" in err and "Traceback" not in err
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert 1 <= ckpt["step"] < 10_000
    assert max(m["step"] for m in read_metrics(run)) == ckpt["step"]  # the signal is read between steps
    assert not (run / "result.json").exists()


def test_a_busy_run_folder_is_refused(make_run_dir):
    """Two processes never write one run folder: the second is refused in one line while the first holds it."""
    from contract.runtime import run_lock

    run = make_run_dir("own")
    with run_lock(run):
        r = run_cli(run)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"own_impl.train: error: run folder {run} is in use by another process; "
                                             "wait for it or stop it"]
    assert not (run / "result.json").exists()
