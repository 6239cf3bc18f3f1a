"""TorchSSL's FixMatch through our entry, on the CPU, on the real data: files in our schema, exact steps, resume."""
from __future__ import annotations

import functools
import json
import math

import pytest

from contract.results import read_metrics
from third_party.torchssl import checkout as co

from conftest import run_module, torchssl_checkpoint as checkpoint, torchssl_result_on_our_split

entry = functools.partial(run_module, "third_party.torchssl.entry")  # entry(run_dir, *extra)


def test_three_step_run_writes_our_schema(make_run_dir, torchssl_checkout):
    run_dir = make_run_dir("torchssl", files={"torchssl_checkout": str(torchssl_checkout), "num_workers": 0})
    spec, result = torchssl_result_on_our_split(run_dir)
    assert result["impl"] == "torchssl" and result["steps"] == 3 and result["eval_images"] == 100
    assert result["recipe"] == "torchssl" and result["optimizer_steps"] == 3 and result["resumed_at"] == []
    names = [p["name"] for p in result["patches"]]
    assert "cpu_device_shim" in names and "amp_bf16" not in names and all(p["why"] for p in result["patches"])
    # fp32 is full fp32: the entry turned off the TF32 that cuDNN allows by default (patch precision_as_spec)
    assert "precision_as_spec" in names and (result["tf32_conv"], result["tf32_matmul"]) == (False, False)
    assert result["steps_per_second"] > 0 and result["wall_seconds"] >= result["train_seconds"] > 0

    metrics = read_metrics(run_dir)
    train = [r for r in metrics if r["kind"] == "train"]
    evals = [r for r in metrics if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3] and [r["step"] for r in evals] == [3]
    assert result["evals"] == evals and result["final_top1"] == evals[-1]["top1"]
    for r in train:  # TorchSSL's cosine schedule, worked out by hand: lr * cos(7 pi k / (16 K)) at step k+1
        assert r["lr"] == pytest.approx(0.03 * math.cos(7 * math.pi * (r["step"] - 1) / (16 * 3)), rel=1e-9)
        assert r["loss"] == pytest.approx(r["loss_x"] + spec.lambda_u * r["loss_u"], rel=1e-6)
        assert 0.0 <= r["mask_rate"] <= 1.0 and r["images_per_s"] > 0
    assert 0.0 <= evals[0]["top1"] <= evals[0]["top5"] <= 100.0
    # 100 images: a whole percentage, up to TorchSSL's float arithmetic (0.07 * 100 is 7.000000000000001)
    assert evals[0]["top1"] == pytest.approx(round(evals[0]["top1"]))

    ckpt = checkpoint(run_dir)  # exactly spec.steps optimizer and scheduler steps, not one more
    assert ckpt["it"] == 3 and ckpt["scheduler"]["last_epoch"] == 3
    assert co.problems(torchssl_checkout) == []  # nothing was written into the checkout

    again = entry(run_dir)  # done: recognized from result.json, nothing rerun
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert read_metrics(run_dir) == metrics


def test_interrupted_run_resumes_to_exactly_the_budget(make_run_dir, torchssl_checkout):
    # threshold 0: every pseudo-label is accepted, so mask_rate (the ACCEPTED fraction) must be exactly 1.
    # bf16 with its GradScaler off (patch amp_bf16), and BatchNorm momentum 0.5 (patch bn_momentum).
    run_dir = make_run_dir("torchssl", files={"torchssl_checkout": str(torchssl_checkout), "num_workers": 0},
                           steps=4, eval_every=2, checkpoint_every=2, threshold=0.0, precision="bf16",
                           bn_momentum=0.5)
    first = entry(run_dir, "--stop-after", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (run_dir / "result.json").exists() and checkpoint(run_dir)["it"] == 3

    second = entry(run_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming" in second.stdout and "at step 3 of 4" in second.stdout
    metrics = read_metrics(run_dir)
    assert [r["step"] for r in metrics if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in metrics if r["kind"] == "eval"] == [2, 4]
    assert all(r["mask_rate"] == 1.0 and r["loss_u"] > 0 for r in metrics if r["kind"] == "train")
    ckpt = checkpoint(run_dir)
    assert ckpt["it"] == 4 and ckpt["scheduler"]["last_epoch"] == 4
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 4 and result["optimizer_steps"] == 4 and result["resumed_at"] == [3]
    assert {"amp_bf16", "bn_momentum"} <= {p["name"] for p in result["patches"]}
    # At momentum 0.001, four steps move a running mean by at most 0.4% of the batch means (a few 1e-3 here);
    # at 0.5 it follows them: the patch reached TorchSSL's network.
    first_bn = ckpt["model"]["block1.layer.0.bn1.running_mean"]
    assert first_bn.abs().max() > 0.02
