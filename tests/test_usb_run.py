"""USB's FixMatch and MixMatch through our entry, on the CPU, on the real data: files in our schema, our split and
pixels, exactly the spec's steps, resume to exactly the budget, a clean checkout, and no stand-in ever used."""
from __future__ import annotations

import functools
import json
import math

import pytest

from contract.results import read_metrics
from contract.spec import ALGORITHM_DEFAULTS

from conftest import run_module
from usb_fixtures import ENTRY, usb_checkpoint, usb_result_on_our_split

entry = functools.partial(run_module, ENTRY)  # entry(run_dir, *extra)
MIXMATCH = {"algorithm": "mixmatch", **ALGORITHM_DEFAULTS["mixmatch"]}


def usb_run_dir(make_run_dir, usb_checkout, **overrides):
    return make_run_dir("usb", recipe="usb", files={"usb_checkout": str(usb_checkout), "num_workers": 0},
                        **overrides)


def cosine_lr(step: int, steps: int) -> float:
    """USB's get_cosine_schedule_with_warmup without warm-up, worked out by hand: lr * cos(7 pi k / (16 K)) at step
    k + 1."""
    return 0.03 * math.cos(7 * math.pi * (step - 1) / (16 * steps))


def test_three_step_fixmatch_run_writes_our_schema(make_run_dir, usb_checkout):
    run_dir = usb_run_dir(make_run_dir, usb_checkout)
    spec, result = usb_result_on_our_split(run_dir)
    assert (result["algorithm"], result["impl"], result["recipe"]) == ("fixmatch", "usb", "usb")
    assert result["steps"] == result["optimizer_steps"] == 3 and result["resumed_at"] == []
    assert result["eval_images"] == 100 and result["tf32_conv"] is False
    names = [p["name"] for p in result["patches"]]
    assert {"cpu_device_shim", "observe_fixmatch", "resume_mid_epoch", "import_stand_ins"} <= set(names)
    assert "amp_bf16" not in names and all(p["why"] for p in result["patches"])
    args = result["usb_args"]
    assert (args["num_train_iter"], args["epoch"], args["p_cutoff"], args["net"]) == (3, 1, 0.95, "wrn_28_2")
    assert result["usb_config"] == "config/classic_cv/fixmatch/fixmatch_cifar10_40_0.yaml"
    assert result["usb_config_overrides"]["batch_size"] == {"usb_config": 64, "used": 2}
    assert "ImageNet" in result["impl_settings"]["normalization"]

    metrics = read_metrics(run_dir)
    train = [r for r in metrics if r["kind"] == "train"]
    evals = [r for r in metrics if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3] and [r["step"] for r in evals] == [3]
    assert result["evals"] == evals and result["final_top1"] == evals[-1]["top1"]
    for r in train:
        assert r["lr"] == pytest.approx(cosine_lr(r["step"], 3), rel=1e-9)
        assert r["loss"] == pytest.approx(r["loss_x"] + spec.lambda_u * r["loss_u"], rel=1e-5)
        assert 0.0 <= r["mask_rate"] <= 1.0 and r["images_per_s"] > 0
    assert 0.0 <= evals[0]["top1"] <= evals[0]["top5"] <= 100.0
    assert evals[0]["top1"] == pytest.approx(round(evals[0]["top1"]))  # 100 images: a whole percentage

    ckpt = usb_checkpoint(run_dir)  # exactly spec.steps optimizer and scheduler steps, not one more
    assert ckpt["it"] == 3 and ckpt["scheduler"]["last_epoch"] == 3
    again = entry(run_dir)  # done: recognized from result.json, nothing rerun
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert read_metrics(run_dir) == metrics


def test_three_step_mixmatch_run_writes_our_schema(make_run_dir, usb_checkout):
    run_dir = usb_run_dir(make_run_dir, usb_checkout, **MIXMATCH)  # B=2, mu=1, lambda_u 100 ramped over 1.2 steps
    spec, result = usb_result_on_our_split(run_dir)
    assert (result["algorithm"], result["steps"], result["optimizer_steps"]) == ("mixmatch", 3, 3)
    args = result["usb_args"]
    assert (args["mixup_alpha"], args["T"], args["unsup_warm_up"], args["ulb_loss_ratio"], args["uratio"]) == (
        0.5, 0.5, 0.4, 100.0, 1)
    names = {p["name"] for p in result["patches"]}
    assert "observe_mixmatch" in names and "observe_fixmatch" not in names
    assert "NOT interleaved" in result["impl_settings"]["batchnorm_of_the_mixed_batch"]

    train = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3] and "mask_rate" not in train[0]
    # USB's ramp, worked out by hand: 100 * clip(it / (0.4 * 3), 0, 1) at it = 0, 1, 2
    assert [r["lambda_u"] for r in train] == pytest.approx([0.0, 100 / 1.2, 100.0], rel=1e-6)
    for r in train:
        assert r["lr"] == pytest.approx(cosine_lr(r["step"], 3), rel=1e-9)
        assert r["loss"] == pytest.approx(r["loss_x"] + r["lambda_u"] * r["loss_u"], rel=1e-5)
        assert 0.5 <= r["mix_lambda"] <= 1.0 and r["guess_acc"] in (0.0, 0.5, 1.0)
    assert usb_checkpoint(run_dir)["it"] == 3


def test_interrupted_run_resumes_to_exactly_the_budget(make_run_dir, usb_checkout):
    """Stopped after step 3 of 4, inside USB's one epoch: USB's own load_model would start at the next epoch, which
    does not exist, and take no step (patch resume_mid_epoch). Also: threshold 0 (every pseudo-label accepted, so
    mask_rate is exactly 1), bf16 (patch amp_bf16), BatchNorm momentum 0.5 (patch bn_momentum), no Nesterov
    (patch nesterov_as_spec)."""
    run_dir = usb_run_dir(make_run_dir, usb_checkout, steps=4, eval_every=2, checkpoint_every=2, threshold=0.0,
                          precision="bf16", bn_momentum=0.5, nesterov=False)
    first = entry(run_dir, "--stop-after", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (run_dir / "result.json").exists() and usb_checkpoint(run_dir)["it"] == 3

    second = entry(run_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "at step 3 of 4 (USB epoch 0, 3 of its 4 batches done)" in second.stdout
    metrics = read_metrics(run_dir)
    assert [r["step"] for r in metrics if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in metrics if r["kind"] == "eval"] == [2, 4]
    assert all(r["mask_rate"] == 1.0 and r["loss_u"] > 0 for r in metrics if r["kind"] == "train")
    ckpt = usb_checkpoint(run_dir)
    assert ckpt["it"] == 4 and ckpt["scheduler"]["last_epoch"] == 4
    assert all(g["nesterov"] is False for g in ckpt["optimizer"]["param_groups"])
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == result["optimizer_steps"] == 4 and result["resumed_at"] == [3]
    assert {"amp_bf16", "bn_momentum", "nesterov_as_spec"} <= {p["name"] for p in result["patches"]}
    assert result["usb_checkout_clean"] is True and result["usb_stand_ins_used"] == []
    # At momentum 0.001, four steps move a running mean by at most 0.4% of the batch means; at 0.5 it follows them
    assert ckpt["model"]["block1.layer.0.bn1.running_mean"].abs().max() > 0.02


def test_mixmatch_resumes_from_the_previous_checkpoint_when_the_latest_is_damaged(make_run_dir,
                                                                                  usb_checkout):
    """Checkpoints after steps 2 and 3 (the stop); the latest is then damaged: the resume reads resume.prev.pth,
    redoes step 3 and still ends at exactly step 4."""
    run_dir = usb_run_dir(make_run_dir, usb_checkout, steps=4, eval_every=2, checkpoint_every=2, **MIXMATCH)
    first = entry(run_dir, "--stop-after", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    latest = run_dir / "usb" / "resume.pth"
    assert usb_checkpoint(run_dir)["it"] == 3
    latest.write_bytes(b"\0" * 100)

    second = entry(run_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from the previous checkpoint" in second.stdout
    assert "at step 2 of 4 (USB epoch 0, 2 of its 4 batches done)" in second.stdout
    assert (run_dir / "usb" / "resume.pth.damaged").read_bytes() == b"\0" * 100
    train = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    # the resumed process ramps from the checkpoint's step: 100 * min(it / 1.6, 1) at it = 0..3
    assert [r["lambda_u"] for r in train] == pytest.approx([0.0, 62.5, 100.0, 100.0], rel=1e-6)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == result["optimizer_steps"] == 4 and result["resumed_at"] == [2]
    assert usb_checkpoint(run_dir)["it"] == 4 and result["usb_stand_ins_used"] == []
