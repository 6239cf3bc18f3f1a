"""Our implementation with TorchSSL's recipe: batches drawn with replacement, TorchSSL's strong augmentation before
the flip and crop, TorchSSL's network wiring and bias init, BatchNorm momentum from the spec; resumable exactly."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from contract.spec import RunSpec, read_spec
from own_impl import augment as A
from own_impl import augment_torchssl as T
from own_impl import data as data_mod
from own_impl import fixmatch
from own_impl import train as train_mod
from own_impl.recipes import RECIPES

from conftest import copy_run

CPU = torch.device("cpu")


def test_replacement_sampler_draws_with_replacement_and_resumes():
    pool = np.arange(10, 20)
    a = data_mod.ReplacementSampler(pool, seed=3)
    draws = torch.cat([a.next(7) for _ in range(20)])  # 140 draws from 10 indices
    assert set(draws.tolist()) == set(pool.tolist())
    assert max(np.bincount(draws[:14].numpy())) > 1  # 14 draws from 10: a repeat within two batches
    b = data_mod.ReplacementSampler(pool, seed=3)
    state = b.state_dict()
    x = b.next(50)
    c = data_mod.ReplacementSampler(pool, seed=99)
    c.load_state_dict(state)
    assert torch.equal(c.next(50), x)  # the generator state is all there is to restore
    # as torch's RandomSampler(replacement=True) draws: uniform indices into the pool, from its generator
    g = torch.Generator().manual_seed(3)
    assert torch.equal(data_mod.ReplacementSampler(pool, 3).next(5), torch.as_tensor(pool)[torch.randint(10, (5,),
                                                                                                       generator=g)])


def test_make_batch_with_the_torchssl_recipe_draws_and_applies_torchssls_augmentation():
    spec = RunSpec(impl="own", recipe="torchssl", n_labels=40, seed=0, data_kind="synthetic", data_sha256="-",
                   split_sha256="-", batch_size=2, uratio=3)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (64,), generator=g)
    data = data_mod.DeviceData(images, labels, np.arange(40), images[:0], labels[:0], "-")
    samplers = data_mod.Samplers(data_mod.ReplacementSampler(data.labelled, 1),
                                 data_mod.ReplacementSampler(np.arange(64), 2), torch.Generator().manual_seed(3))
    x, y_x, y_u = fixmatch.make_batch(data, samplers, spec)
    lab, unl = data_mod.ReplacementSampler(data.labelled, 1), data_mod.ReplacementSampler(np.arange(64), 2)
    gen = torch.Generator().manual_seed(3)
    idx_x, idx_u = lab.next(2), unl.next(6)
    weak = A.weak_augment(images[torch.cat([idx_x, idx_u])], gen)
    strong = T.torchssl_strong_augment(images[idx_u], gen)  # RandAugment(3, 5) and Cutout, then flip and crop
    table = data_mod.normalization_table(torch.device("cpu"), "cifar10-torchvision")  # TorchSSL's arithmetic
    assert torch.equal(x, data_mod.normalize(torch.cat([weak, strong]), False, table))
    assert torch.equal(y_x, labels[idx_x]) and torch.equal(y_u, labels[idx_u])


@pytest.mark.parametrize("recipe", ["paper", "torchssl"])
def test_build_follows_the_recipe_and_the_spec_bn_momentum(recipe):
    spec = RunSpec(impl="own", recipe=recipe, n_labels=40, seed=0, data_kind="k", data_sha256="-", split_sha256="-",
                   bn_momentum=0.03)
    torch.manual_seed(0)
    model, ema, _ = train_mod.build(spec, CPU)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 25 and all(m.momentum == 0.03 for m in bns)
    raw = [b.conv1_sees_raw_input for b in model.modules() if hasattr(b, "conv1_sees_raw_input")]
    assert sum(raw) == (2 if recipe == "torchssl" else 0)  # first block of groups 2 and 3
    biases = torch.cat([m.bias for m in model.modules() if isinstance(m, torch.nn.Conv2d)])
    assert bool(biases.any()) == (RECIPES[recipe].conv_bias_init == "pytorch")


def test_a_torchssl_recipe_run_resumes_exactly(make_run_dir, tmp_path):
    straight = make_run_dir("own", recipe="torchssl", steps=4, eval_every=2, checkpoint_every=2, log_every=1,
                            depth=10, widen_factor=1)
    spec, files = read_spec(straight / "spec.json")
    resumed = copy_run(straight, tmp_path / "resumed")
    result = train_mod.train(spec, files, straight, CPU)
    assert train_mod.train(spec, files, resumed, CPU, stop_after=2) is None
    again = train_mod.train(spec, files, resumed, CPU)
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert result["evals"] == again["evals"] and again["resumed_at"] == [2]
    settings = json.loads((straight / "result.json").read_text())["impl_settings"]
    assert settings["labelled_sampling"] == "with replacement"
    assert "BEFORE the flip and crop" in settings["strong_augmentation"]


def test_the_recipe_fields_keep_paper_and_torchssl_as_they_were():
    """The fields the `usb` recipe added leave the other recipes' behaviour as before: flip then shift, CIFAR-10's
    mean and std (the torchssl recipe in TorchSSL's arithmetic), conv biases and eps 1e-3 in every block, MixMatch
    interleaved with the guess renormalised and L_U one mean; sampling as before."""
    for name in ("paper", "torchssl", "paper-cta"):
        r = RECIPES[name]
        assert r.weak_augment is A.flip_and_shift
        assert r.normalization == ("cifar10-torchvision" if name == "torchssl" else "cifar10")
        assert (r.block_conv_bias, r.block_bn_eps) == (True, 1e-3)
        assert (r.mixmatch_interleave, r.mixmatch_renormalise_guess, r.mixmatch_loss_u_mean) == (True, True,
                                                                                                  "elements")
        assert r.with_replacement == (name == "torchssl")
    usb = RECIPES["usb"]
    assert (usb.sampling, usb.normalization, usb.block_conv_bias, usb.mixmatch_interleave) == (
        "usb-epochs", "imagenet-torchvision", False, False)
    with pytest.raises(ValueError, match="sampling"):
        dataclasses.replace(usb, sampling="shuffled")


def test_torchssl_recipe_normalises_as_torchssls_transform(torchssl_checkout):
    """The `torchssl` recipe's table is ToTensor + Normalize with TorchSSL's own constants (datasets/ssl_dataset.py),
    at every pixel level, bit for bit; the paper's scale-and-shift table is one ulp away at some levels."""
    from torchvision import transforms

    from conftest import torchssl_modules

    with torchssl_modules(torchssl_checkout, "datasets.ssl_dataset") as (ssl_dataset,):
        mean, std = ssl_dataset.mean["cifar10"], ssl_dataset.std["cifar10"]
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    want = transforms.Normalize(mean, std)(transforms.ToTensor()(transforms.ToPILImage()(levels[0])))
    table = data_mod.normalization_table(torch.device("cpu"), RECIPES["torchssl"].normalization)
    assert torch.equal(data_mod.normalize(levels, False, table)[0], want)
    paper = data_mod.normalize(levels, False, data_mod.normalization_table(torch.device("cpu")))[0]
    assert not torch.equal(paper, want) and torch.allclose(paper, want, rtol=0, atol=1e-6)
