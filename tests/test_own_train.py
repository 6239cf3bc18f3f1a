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
from own_impl import device as device_mod
from own_impl import fixmatch
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
                                              "checkpoint.pt", ".lock", "tensorboard"}
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
    # a killed process may have logged past its checkpoint: resume must drop that line, not duplicate step 4
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
    real_loss = fixmatch.fixmatch_loss

    def loss_turning_nan_at_step_3(*args, **kwargs):
        calls.append(1)
        loss, stats = real_loss(*args, **kwargs)
        if len(calls) >= 3:
            loss, stats["loss"] = loss * float("nan"), stats["loss"] * float("nan")
        return loss, stats

    monkeypatch.setattr(fixmatch, "fixmatch_loss", loss_turning_nan_at_step_3)
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


class StopBeforeData(Exception):
    """Raised in place of loading the data, once the device has been set up."""


@pytest.mark.parametrize("asked", ["cuda", torch.device("cuda"), "cuda:1"], ids=["name", "device", "indexed"])
def test_a_bare_cuda_device_reaches_set_device_with_its_index(make_run_dir, monkeypatch, asked):
    """`cuda` without an index (as the CUDA tests pass it) becomes the current device's index before
    torch.cuda.set_device, which refuses an index-less device. CUDA itself is stood in for, so this runs anywhere."""
    from torch.cuda._utils import _get_device_index

    with pytest.raises(ValueError, match="specified index"):  # what set_device would say to a bare device
        _get_device_index(torch.device("cuda"))
    run = make_run_dir("own")
    spec, files = read_spec(run / "spec.json")
    set_to = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: set_to.append(_get_device_index(d)))
    for flag in ("benchmark", "allow_tf32"):  # use_device sets them: put them back afterwards
        monkeypatch.setattr(torch.backends.cudnn, flag, getattr(torch.backends.cudnn, flag))
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", torch.backends.cuda.matmul.allow_tf32)

    def stop(*args):
        raise StopBeforeData

    monkeypatch.setattr(train_mod, "load_device_data", stop)
    with pytest.raises(StopBeforeData):
        train_mod.train(spec, files, run, asked)
    assert set_to == [1 if str(asked) == "cuda:1" else 3]


def test_cuda_rng_state_of_one_or_every_gpu_is_restored_for_the_runs_gpu(monkeypatch):
    """A checkpoint's rng["cuda"] holds the run's GPU state, or (earlier versions) a list with one per visible GPU:
    either resumes, with as many GPUs visible as there are now."""
    states = [torch.full((8,), i, dtype=torch.uint8) for i in range(3)]
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((int(state[0]), device)))
    cuda = lambda i: torch.device("cuda", i)  # noqa: E731
    device_mod.restore_cuda_rng(states, cuda(1))     # the list: the entry of the run's GPU
    device_mod.restore_cuda_rng(states, cuda(5))     # a GPU the list has no entry for: nothing to restore
    device_mod.restore_cuda_rng(states[2], cuda(0))  # one state: the run's own, whatever its index was
    device_mod.restore_cuda_rng(None, cuda(0))       # a CPU run's checkpoint
    device_mod.restore_cuda_rng(states, CPU)         # resumed on the CPU
    assert restored == [(1, cuda(1)), (2, cuda(0))]


def test_a_checkpoint_with_every_gpus_rng_state_resumes(make_run_dir, tmp_path):
    """A checkpoint holding a list of CUDA generator states (as earlier versions wrote them) resumes to the run an
    uninterrupted one gives."""
    straight = make_run_dir("own", steps=2, eval_every=2, checkpoint_every=1, log_every=1)
    spec, files = read_spec(straight / "spec.json")
    resumed = copy_run(straight, tmp_path / "resumed")
    train_mod.train(spec, files, straight, CPU)
    assert train_mod.train(spec, files, resumed, CPU, stop_after=1) is None
    ckpt = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert ckpt["rng"]["cuda"] is None  # a CPU run saves no CUDA state
    ckpt["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8) for _ in range(2)]
    torch.save(ckpt, resumed / "checkpoint.pt")
    train_mod.train(spec, files, resumed, CPU)
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (straight, resumed))
    assert a["step"] == b["step"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_result_records_the_tf32_switches_the_precision_set(make_run_dir, monkeypatch):
    """fp32 means full fp32: the run turns TF32 off (cuDNN's default is on) and result.json says so; tf32 turns it on.
    (The switches are CUDA's; the CPU computes in fp32 either way, so the run itself is the same.)"""
    for flag in (torch.backends.cudnn, torch.backends.cuda.matmul):
        monkeypatch.setattr(flag, "allow_tf32", True)
    run = make_run_dir("own", steps=1, eval_every=1, checkpoint_every=1)
    spec, files = read_spec(run / "spec.json")
    result = train_mod.train(spec, files, run, CPU)
    assert (result["tf32_conv"], result["tf32_matmul"]) == (False, False)
    assert json.loads((run / "result.json").read_text())["tf32_conv"] is False
    run = make_run_dir("own", steps=1, eval_every=1, checkpoint_every=1, precision="tf32")
    spec, files = read_spec(run / "spec.json")
    result = train_mod.train(spec, files, run, CPU)
    assert (result["tf32_conv"], result["tf32_matmul"], result["precision"]) == (True, True, "tf32")


def test_an_unasked_compile_from_spec_json_falls_back(make_run_dir, monkeypatch):
    """spec.json with compile: true, compile_binding: false (what benchmarks write when the user asked nothing): a
    compile that fails runs eager and the run finishes; with compile_binding: true the failure is the run's."""
    from own_impl import compile as compile_mod

    def fail(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compile_mod, "warm_up_loss", fail)
    monkeypatch.setattr(compile_mod, "warm_up_augment", fail)
    run = make_run_dir("own", steps=1, eval_every=1, checkpoint_every=1, depth=10, widen_factor=1,
                       files={"compile": True, "compile_binding": False})
    assert train_mod.main(["--spec", str(run / "spec.json"), "--run-dir", str(run)]) == 0
    result = json.loads((run / "result.json").read_text())
    assert (result["compiled"], result["augmentation_compiled"], result["steps"]) == (False, False, 1)
    assert "torch.compile of forward + loss + backward failed (RuntimeError: no C++ compiler)" in \
        (run / "log.txt").read_text()
    binding = make_run_dir("own", seed=1, steps=1, eval_every=1, checkpoint_every=1, depth=10, widen_factor=1,
                           files={"compile": True, "compile_binding": True})
    assert train_mod.main(["--spec", str(binding / "spec.json"), "--run-dir", str(binding)]) == 1
    assert not (binding / "result.json").exists()
