"""Our MixMatch step and run (own_impl/mixmatch.py through own_impl.train): its batch, its forward against
TorchSSL's procedure, a run folder on the real data, resume, and the compiled step."""
import copy
import functools
import json

import numpy as np
import pytest
import torch

from contract.results import RESULT_KEYS, read_metrics
from contract.spec import RunSpec, read_spec
from harness.plan import ALGORITHM_DEFAULTS
from own_impl import augment as A
from own_impl import compile as compile_mod
from own_impl import data as data_mod
from own_impl import train as train_mod
from own_impl import mixmatch
from own_impl.mixmatch import draw_mixup_params
from own_impl.recipes import RECIPES

from conftest import copy_run, run_module, torchssl_modules

CPU = torch.device("cpu")
MIXMATCH = {"algorithm": "mixmatch", **ALGORITHM_DEFAULTS["mixmatch"]}  # uratio 1, lambda_u 100, T 0.5, ...
TINY = {"depth": 10, "widen_factor": 1}  # WRN-10-1: the code paths of WRN-28-2, quicker
run_cli = functools.partial(run_module, "own_impl.train")


def tiny_spec(**overrides) -> RunSpec:
    values = dict(impl="own", n_labels=40, seed=0, data_kind="synthetic", data_sha256="-", split_sha256="-",
                  batch_size=4, steps=10, **{**MIXMATCH, "uratio": 2}, **TINY)
    return RunSpec(**{**values, **overrides})


def tiny_data() -> data_mod.DeviceData:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (64,), generator=g)
    return data_mod.DeviceData(images, labels, np.arange(40), images[:0], labels[:0], "-")


@pytest.mark.parametrize("recipe", ["paper", "torchssl"])
def test_batch_holds_two_independent_weak_views_and_the_mixup_draws(recipe):
    """x = normalize([weak(x_b); weak(u_b); weak(u_b)]) from one generator, then lam and perm from the same one;
    lambda_u ramped by hand: steps 10, ramp_up 0.4 -> 0 at step 0, 100 * 3/4 at step 3, 100 from step 4 on."""
    spec = tiny_spec(recipe=recipe)
    data = tiny_data()
    samplers, reference = (data_mod.Samplers.seeded(0, data, with_replacement=recipe == "torchssl")
                           for _ in range(2))
    for step, ramped in ((0, 0.0), (3, 75.0), (4, 100.0)):
        x, y_x, y_u, lam, perm, lambda_u = mixmatch.make_batch(data, samplers, spec, step)
        idx_x, idx_u = reference.labelled.next(4), reference.unlabelled.next(8)
        images = data.train_x[torch.cat([idx_x, idx_u, idx_u])]
        weak = A.weak_augment(images, reference.augment)
        want_lam, want_perm = draw_mixup_params(20, 0.5, reference.augment, per="example" if recipe == "paper"
                                                else "batch")
        table = data_mod.normalization_table(x.device, RECIPES[recipe].normalization)
        assert torch.equal(x, data_mod.normalize(weak, False, table))
        assert torch.equal(y_x, data.train_y[idx_x]) and torch.equal(y_u, data.train_y[idx_u])
        assert torch.equal(lam, want_lam) and torch.equal(perm, want_perm)
        assert lambda_u.dim() == 0 and lambda_u.item() == ramped
        assert not torch.equal(x[4:12], x[12:])  # the two views of u_b differ (flips and shifts drawn apart)
        assert (lam.unique().numel() == 1) == (recipe == "torchssl")  # one lambda per batch, or per example


def torchssl_reference_step(model, x, y_x, lam, perm, lambda_u, T, num_classes, Bn_Controller, interleave):
    """The loss of one MixMatch step as TorchSSL's MixMatch.train() computes it (models/mixmatch/mixmatch.py),
    with its Bn_Controller and its interleave, on our model and our drawn numbers; lambda' per row."""
    b = y_x.shape[0]
    bn = Bn_Controller()
    with torch.no_grad():
        bn.freeze_bn(model)
        views = [model(v) for v in x[b:].chunk(2)]
        bn.unfreeze_bn(model)
        avg = (torch.softmax(views[0], dim=1) + torch.softmax(views[1], dim=1)) / 2
        avg = avg / avg.sum(dim=-1, keepdim=True)
        sharp = avg ** (1 / T)
        sharp = sharp / sharp.sum(dim=-1, keepdim=True)
        labels = torch.cat([torch.nn.functional.one_hot(y_x, num_classes).float(), sharp, sharp])
        w = torch.maximum(lam, 1 - lam)[:, None]
        mixed_x = w[:, :, None, None] * x + (1 - w[:, :, None, None]) * x[perm]
        mixed_y = w * labels + (1 - w) * labels[perm]
        mixed_x = interleave(list(torch.split(mixed_x, b)), b)
    logits = [model(mixed_x[0])]
    bn.freeze_bn(model)
    for chunk in mixed_x[1:]:
        logits.append(model(chunk))
    logits = interleave(logits, b)
    bn.unfreeze_bn(model)
    sup = torch.sum(-mixed_y[:b] * torch.log_softmax(logits[0], dim=-1), dim=1).mean()
    unsup = torch.nn.functional.mse_loss(torch.softmax(torch.cat(logits[1:]), dim=-1), mixed_y[b:])
    return sup + lambda_u * unsup


def test_forward_loss_equals_torchssls_procedure(torchssl_checkout, one_thread):
    """Loss, every gradient and every BatchNorm buffer after one step of ours equal those of TorchSSL's procedure
    (its Bn_Controller and interleave, imported from the checkout): interleaved passes of B rows, the running
    statistics moved by the first pass only, guesses leaving them untouched."""
    spec = tiny_spec()
    torch.manual_seed(0)
    model, _, _ = train_mod.build(spec, CPU)
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20, 3, 32, 32, generator=g)
    y_x, y_u = torch.randint(0, 10, (4,), generator=g), torch.randint(0, 10, (8,), generator=g)
    lam, perm = draw_mixup_params(20, 0.5, g)
    loss, stats = mixmatch.forward_loss(model, x, y_x, y_u, lam, perm, torch.tensor(30.0), spec)
    loss.backward()
    with torchssl_modules(torchssl_checkout, "train_utils", "models.mixmatch.mixmatch") as (tu, mm):
        interleave = functools.partial(mm.MixMatch.interleave, mm.MixMatch.__new__(mm.MixMatch))
        want = torchssl_reference_step(twin, x, y_x, lam, perm, 30.0, 0.5, 10, tu.Bn_Controller, interleave)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert stats["loss"] == loss.detach() and stats["lambda_u"] == 30.0
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    for (name, buf), other in zip(model.named_buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(buf, other, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    # one update per step, as for FixMatch: num_batches_tracked counts 1 (guesses and passes 2, 3 left no trace)
    assert all(b.item() == 1 for n, b in model.named_buffers() if n.endswith("num_batches_tracked"))


def test_three_steps_write_the_whole_run_folder(make_run_dir):
    run = make_run_dir("own", **MIXMATCH)  # steps=3, B=2, mu=1, ramp over 0.4 * 3 = 1.2 steps
    spec, _ = read_spec(run / "spec.json")
    r = run_cli(run)
    assert r.returncode == 0, r.stderr
    records = read_metrics(run)
    train = [m for m in records if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3]
    assert set(train[0]) == {"kind", "step", "window_steps", "lr", "loss", "loss_x", "loss_u", "lambda_u",
                             "guess_acc", "mix_lambda", "optimizer_steps", "images_per_s", "data_frac",
                             "train_seconds"}
    # lambda_u(t) = 100 * min(t / 1.2, 1) at t = 0, 1, 2 steps done: 0, 83.33, 100 (float32)
    assert [m["lambda_u"] for m in train] == pytest.approx([0.0, 100 / 1.2, 100.0], rel=1e-6)
    for m in train:
        assert m["loss"] == pytest.approx(m["loss_x"] + m["lambda_u"] * m["loss_u"], rel=1e-5)
        assert 0.5 <= m["mix_lambda"] <= 1.0 and m["guess_acc"] in (0.0, 0.5, 1.0)  # mu B = 2 guesses
    assert [m["optimizer_steps"] for m in train] == [1, 1, 1]
    evals = [m for m in records if m["kind"] == "eval"]
    assert [m["step"] for m in evals] == [3]

    result = json.loads((run / "result.json").read_text())
    assert set(RESULT_KEYS) <= set(result)
    assert (result["algorithm"], result["impl"], result["recipe"]) == ("mixmatch", "own", "paper")
    assert result["steps"] == result["optimizer_steps"] == 3 and result["spec_hash"] == spec.hash()
    assert result["data_sha256"] == spec.data_sha256 and result["split_sha256"] == spec.split_sha256
    assert result["param_count"] == 1_469_642 and result["evals"] == evals
    settings = result["impl_settings"]
    assert "per example" in settings["mixup_lambda"] and "interleaved" in settings["batchnorm_of_the_mixed_batch"]
    assert "strong_augmentation" not in settings  # MixMatch has none
    assert spec.name.startswith("cifar10-mixmatch-40-seed0-own-paper-")


@pytest.mark.parametrize("recipe", ["paper", "torchssl"])
def test_interrupted_and_resumed_run_equals_straight_run(make_run_dir, tmp_path, recipe):
    # 40 labels, B=2: 20 steps per labelled pass; the samplers' positions, the generator (augmentation and MixUp)
    # and the ramp must all come back
    straight = make_run_dir("own", steps=6, eval_every=3, checkpoint_every=3, log_every=1, recipe=recipe,
                            **MIXMATCH, **TINY)
    spec, files = read_spec(straight / "spec.json")
    resumed = copy_run(straight, tmp_path / "resumed")
    train_mod.train(spec, files, straight, CPU)
    assert train_mod.train(spec, files, resumed, CPU, stop_after=3) is None
    train_mod.train(spec, files, resumed, CPU)
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    keep = ("kind", "step", "lr", "loss", "loss_x", "loss_u", "lambda_u", "guess_acc", "mix_lambda", "top1")
    strip = lambda rs: [{k: r[k] for k in keep if k in r} for r in rs if r["kind"] != "resume"]  # noqa: E731
    assert strip(read_metrics(resumed)) == strip(read_metrics(straight))
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (straight, resumed))
    assert ra["evals"] == rb["evals"] and (ra["resumed_at"], rb["resumed_at"]) == ([], [3])


def test_compiled_step_matches_the_eager_step(one_thread):
    """MixMatch compiles as FixMatch does (its augmenter and forward_loss, warmed up on its stand-ins, leaving the
    model as it was); two compiled steps equal two eager ones within float tolerance."""
    torch.compiler.reset()
    spec = tiny_spec(batch_size=2, uratio=1)  # 2 guessing passes and 3 mixed ones: the fewest MixMatch has
    algorithm = mixmatch
    data = tiny_data()
    out = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model, ema, optimizer = train_mod.build(spec, CPU)
        loss_fn = compile_mod.make_loss_fn(algorithm.forward_loss, model, spec, compiled)
        augment_fn = compile_mod.make_augment_fn(mixmatch, spec.recipe, compiled)
        if compiled:
            before = {k: v.clone() for k, v in model.state_dict().items()}
            compile_mod.warm_up_loss(mixmatch, model, loss_fn, spec, torch.Size((3, 32, 32)))
            compile_mod.warm_up_augment(mixmatch, augment_fn, spec, torch.Size((3, 32, 32)), CPU)
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        samplers = data_mod.Samplers.seeded(0, data)
        stats = [train_mod.train_step(model, ema, optimizer, loss_fn,
                                      algorithm.make_batch(data, samplers, spec, k, augment_fn), 0.03)
                 for k in range(2)]
        out[compiled] = stats, model.state_dict()
    torch.compiler.reset()
    (eager_stats, eager_state), (comp_stats, comp_state) = out[False], out[True]
    for e, c in zip(eager_stats, comp_stats):
        assert e.keys() == c.keys() == set(algorithm.STATISTICS)
        for k in e:
            torch.testing.assert_close(c[k], e[k], rtol=1e-4, atol=1e-5)
    for k in eager_state:
        torch.testing.assert_close(comp_state[k], eager_state[k], rtol=1e-4, atol=1e-5)
