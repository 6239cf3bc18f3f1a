"""TorchSSL's MixMatch through our entry, on the CPU, on the real data: our schema, our split, exactly the spec's
steps, its ramped lambda_u observed, checkpoints below its 1,000,000-step save guard, and resume."""
from __future__ import annotations

import functools
import json
import math

import pytest

from contract.results import read_metrics
from harness.plan import ALGORITHM_DEFAULTS
from third_party.torchssl import checkout as co

from conftest import run_module, torchssl_checkpoint as checkpoint, torchssl_result_on_our_split

entry = functools.partial(run_module, "third_party.torchssl.entry")  # entry(run_dir, *extra)
MIXMATCH = {"algorithm": "mixmatch", **ALGORITHM_DEFAULTS["mixmatch"]}


def test_three_step_run_writes_our_schema_on_our_split(make_run_dir, torchssl_checkout):
    run_dir = make_run_dir("torchssl", files={"torchssl_checkout": str(torchssl_checkout), "num_workers": 0},
                           **MIXMATCH)  # steps=3, B=2, mu=1, alpha 0.5, T 0.5, lambda_u 100 ramped over 1.2 steps
    spec, result = torchssl_result_on_our_split(run_dir)
    assert (result["algorithm"], result["impl"], result["recipe"]) == ("mixmatch", "torchssl", "torchssl")
    assert result["steps"] == result["optimizer_steps"] == 3 and result["resumed_at"] == []
    args = result["torchssl_args"]
    assert (args["alpha"], args["T"], args["ramp_up"], args["ulb_loss_ratio"]) == (0.5, 0.5, 0.4, 100.0)
    assert "p_cutoff" not in args and "hard_label" not in args
    patches = {p["name"]: p for p in result["patches"]}
    assert {"observe_mixmatch", "checkpoint_below_1m_steps", "cpu_device_shim"} <= set(patches)
    assert "observe_losses" not in patches and "amp_bf16" not in patches
    assert patches["spec_schedule"]["target"] == "MixMatch.num_eval_iter (subclass property)"
    assert patches["entry_replaces_main"]["target"] == "mixmatch.py main() / main_worker()"
    assert "one lambda" in result["impl_settings"]["mixup_lambda"].lower()

    metrics = read_metrics(run_dir)
    train = [r for r in metrics if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["step"] for r in metrics if r["kind"] == "eval"] == [3]
    assert set(train[0]) >= {"loss", "loss_x", "loss_u", "lambda_u", "guess_acc", "mix_lambda"}
    assert "mask_rate" not in train[0]
    # TorchSSL's ramp, worked out by hand: 100 * clip(it / (0.4 * 3), 0, 1) at it = 0, 1, 2
    assert [r["lambda_u"] for r in train] == pytest.approx([0.0, 100 / 1.2, 100.0], rel=1e-6)
    for r in train:
        assert r["lr"] == pytest.approx(0.03 * math.cos(7 * math.pi * (r["step"] - 1) / (16 * 3)), rel=1e-9)
        assert r["loss"] == pytest.approx(r["loss_x"] + r["lambda_u"] * r["loss_u"], rel=1e-5)
        assert 0.5 <= r["mix_lambda"] <= 1.0 and r["guess_acc"] in (0.0, 0.5, 1.0)

    ckpt = checkpoint(run_dir)  # written below TorchSSL's 1,000,000-step guard; exactly spec.steps steps
    assert ckpt["it"] == 3 and ckpt["scheduler"]["last_epoch"] == 3
    assert set(ckpt) == {"model", "optimizer", "scheduler", "it", "ema_model"}  # its save_model's dict
    assert co.problems(torchssl_checkout) == []  # nothing was written into the checkout


def test_interrupted_run_resumes_to_exactly_the_budget(make_run_dir, torchssl_checkout):
    # bf16: its GradScaler off and autocast bound in models.mixmatch.mixmatch (patch amp_bf16)
    run_dir = make_run_dir("torchssl", files={"torchssl_checkout": str(torchssl_checkout), "num_workers": 0},
                           steps=4, eval_every=2, checkpoint_every=2, precision="bf16", **MIXMATCH)
    first = entry(run_dir, "--stop-after", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (run_dir / "result.json").exists() and checkpoint(run_dir)["it"] == 2

    second = entry(run_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming" in second.stdout and "at step 2 of 4" in second.stdout
    metrics = read_metrics(run_dir)
    train = [r for r in metrics if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in metrics if r["kind"] == "eval"] == [2, 4]
    # the resumed process ramps from the checkpoint's step: 100 * min(it / 1.6, 1) at it = 0..3
    assert [r["lambda_u"] for r in train] == pytest.approx([0.0, 62.5, 100.0, 100.0], rel=1e-6)
    ckpt = checkpoint(run_dir)
    assert ckpt["it"] == 4 and ckpt["scheduler"]["last_epoch"] == 4
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == result["optimizer_steps"] == 4 and result["resumed_at"] == [2]
    patches = {p["name"]: p for p in result["patches"]}
    assert patches["amp_bf16"]["target"] == "models.mixmatch.mixmatch.autocast, models.mixmatch.mixmatch.GradScaler"
