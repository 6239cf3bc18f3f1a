"""Our `usb` recipe against USB's own code from the pinned checkout: its WideResNet (parameters, initial values,
outputs and gradients), its normalisation (get_cifar's transform), its augmentations pixel for pixel (each RandAugment
op, Cutout, the weak and the strong transform of its data sets, fed the same draws), its sampler (its loaders and
DistSamplerSeedHook over several epochs), MixMatch's guess and unlabelled loss as its code computes them; and a `usb`
recipe run that resumes exactly. The training step itself is held to USB's train() by the identity check
(tests/test_identity_usb.py).

How USB's random calls are fed our draws, per image: as tests/test_augment_torchssl.py feeds TorchSSL's (USB's
RandAugment is TorchSSL's code): random.choices returns the augment_list entries we drew and random.random our
uniforms, np.random.uniform numpy's arithmetic on our uniform; torchvision's flip gets p = 1 or 0 and the crop
instance's get_params our offset.
"""
from __future__ import annotations

import argparse
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from contract.arrays import load_arrays
from contract.spec import RunSpec, read_spec
from own_impl import augment as A
from own_impl import augment_torchssl as T
from own_impl import augment_usb as U
from own_impl import data as data_mod
from own_impl import mixmatch
from own_impl import train as train_mod
from own_impl.model import WideResNet
from own_impl.recipes import RECIPES, usb_epoch_iters
from third_party.usb import patches

from conftest import assert_same_images, copy_run, randomize_batchnorm, to_numpy, to_tensor
from usb_fixtures import usb_modules, usb_wrn_count_by_hand

CPU = torch.device("cpu")
N_IMAGES = 200  # real training images, every 250th: all classes
USB_RECIPE = RECIPES["usb"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def usb(usb_checkout):
    """USB's network, data-set, augmentation, sampler, hook and criterion modules, from the checkout."""
    names = ("semilearn.nets.wrn.wrn", "semilearn.datasets.cv_datasets.cifar",
             "semilearn.datasets.augmentation.randaugment", "semilearn.core.utils.build",
             "semilearn.core.hooks.sampler_seed", "semilearn.core.criterions.consistency",
             "semilearn.datasets.samplers.sampler")
    with usb_modules(usb_checkout, *names) as modules:
        yield SimpleNamespace(**dict(zip(("wrn", "cifar", "ra", "build", "sampler_seed", "consistency", "sampler"),
                                         modules)))


@pytest.fixture(scope="module")
def images(cifar) -> np.ndarray:
    return np.ascontiguousarray(load_arrays(cifar.data_dir).train_x[::250][:N_IMAGES])


# ---------------------------------------------------------------- the network

def usb_name_to_ours(name: str) -> str:
    from identity.torchssl_side import ours_name

    return ours_name(name)


def usb_pair(usb, seed: int, depth: int = 28, widen: int = 2) -> tuple[nn.Module, WideResNet]:
    """USB's WideResNet (as its wrn_28_2 builds it) and ours as the `usb` recipe builds it, each after
    torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    theirs = usb.wrn.WideResNet(first_stride=1, num_classes=10, depth=depth, widen_factor=widen)
    torch.manual_seed(seed)
    ours = WideResNet(10, depth, widen, wiring=USB_RECIPE.wiring, conv_bias_init=USB_RECIPE.conv_bias_init,
                      block_conv_bias=USB_RECIPE.block_conv_bias, block_bn_eps=USB_RECIPE.block_bn_eps)
    return theirs, ours


def test_usb_network_same_parameters_and_initial_values(usb):
    """1,467,626 parameters at WRN-28-2 (counted by hand), the same tensors in the same order, and the same seed
    gives the same values, bit for bit (construction and init in USB's order)."""
    theirs, ours = usb_pair(usb, seed=3)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == \
        usb_wrn_count_by_hand(28, 2, 10) == 1_467_626
    mapped = {usb_name_to_ours(k): v for k, v in theirs.state_dict().items()}
    assert list(mapped) == list(ours.state_dict())
    assert [k for k, v in ours.state_dict().items() if not torch.equal(v, mapped[k])] == []
    convs = {n: m for n, m in ours.named_modules() if isinstance(m, nn.Conv2d)}
    assert [n for n, m in convs.items() if m.bias is not None] == ["conv"]  # the stem's only
    assert convs["conv"].bias.abs().max() > 0  # PyTorch's default init, as USB leaves it
    bns = {n: m.eps for n, m in ours.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert bns.pop("bn") == 1e-3 and set(bns.values()) == {1e-5} and len(bns) == 24
    theirs_eps = {usb_name_to_ours(n + ".weight")[:-7]: m.eps for n, m in theirs.named_modules()
                  if isinstance(m, nn.BatchNorm2d)}
    assert theirs_eps == {**bns, "bn": 1e-3}
    # USB's weight-decay selection (nets/utils.py param_groups_weight_decay) is ours: conv and linear weights
    decayed = {usb_name_to_ours(n) for n, p in theirs.named_parameters()
               if not (p.ndim <= 1 or n.endswith(".bias") or n in theirs.no_weight_decay())}
    ours_decayed = {n for n, p in ours.named_parameters()
                    if any(p is q for q in train_mod.param_groups(ours, 5e-4)[0]["params"])}
    assert decayed == ours_decayed


@pytest.mark.parametrize("widen", [1, 2])
def test_usb_network_same_outputs_and_gradients(usb, images, widen):
    """USB's state dict (BatchNorm affine values and running statistics made non-trivial, so a misplaced tensor or
    eps shows) loaded into ours: equal logits in train and eval mode, equal gradients for every parameter (None for
    the same bn1s), equal running statistics after the training pass. WRN-10-w: group 1 widens at w = 2, not at 1."""
    theirs, ours = usb_pair(usb, seed=4, depth=10, widen=widen)
    randomize_batchnorm(theirs, seed=5, var_scale=1e-3, var_shift=1e-5)  # variances near eps: eps matters
    ours.load_state_dict({usb_name_to_ours(k): v for k, v in theirs.state_dict().items()})
    x = data_mod.normalize(to_tensor(images[:16]), False, data_mod.normalization_table(CPU, USB_RECIPE.normalization))
    y = torch.arange(16) % 10
    logits = [theirs.train()(x)["logits"], ours.train()(x)]
    for out in logits:
        nn.functional.cross_entropy(out, y).backward()
    assert torch.equal(logits[0], logits[1])
    grads = {usb_name_to_ours(n): p.grad for n, p in theirs.named_parameters()}
    assert sorted(n for n, p in ours.named_parameters() if p.grad is None) == sorted(
        n for n, grad in grads.items() if grad is None)
    assert [n for n, p in ours.named_parameters() if p.grad is not None and not torch.equal(p.grad, grads[n])] == []
    theirs_buffers = {usb_name_to_ours(k): v for k, v in theirs.named_buffers()}
    assert [k for k, v in ours.named_buffers() if not torch.equal(v, theirs_buffers[k])] == []
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), theirs.eval()(x)["logits"])
        # the eps is live: TorchSSL's 1e-3 in the blocks gives other logits
        other = WideResNet(10, 10, widen, wiring="torchssl", block_conv_bias=False)
        other.load_state_dict(ours.state_dict())
        assert not torch.equal(other.eval()(x), ours(x))


def test_build_follows_the_usb_recipe():
    spec = RunSpec(impl="own", recipe="usb", n_labels=40, seed=0, data_kind="k", data_sha256="-", split_sha256="-",
                   bn_momentum=0.03)
    torch.manual_seed(0)
    model, _, _ = train_mod.build(spec, CPU)
    assert sum(p.numel() for p in model.parameters()) == 1_467_626
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.momentum == 0.03 for m in bns) and sorted({m.eps for m in bns}) == [1e-5, 1e-3]
    assert sum(b.conv1_sees_raw_input for b in model.modules() if hasattr(b, "conv1_sees_raw_input")) == 2


# ---------------------------------------------------------------- normalisation and augmentation

def usb_datasets(usb, images):
    """USB's get_cifar (its transforms, BasicDataset) on `images` (our_arrays, our_split patches): (labelled,
    unlabelled, evaluation) data sets, labelled = every image."""
    labels = np.arange(len(images)) % 10
    patches.use_our_data(usb.cifar, "cifar10", (images, labels), (images, labels), np.arange(len(images)))
    args = argparse.Namespace(img_size=32, crop_ratio=0.875, ulb_num_labels=None, lb_imb_ratio=1, ulb_imb_ratio=1)
    return usb.cifar.get_cifar(args, "fixmatch", "cifar10", len(images), 10, data_dir="/nowhere")


def test_normalisation_is_usbs_transform(usb, images):
    """get_cifar's evaluation transform (Resize(32), ToTensor, Normalize with ImageNet's mean and std) on real
    images, and on every pixel level, against our table lookup: bit for bit."""
    _, _, evaluation = usb_datasets(usb, images)
    table = data_mod.normalization_table(CPU, USB_RECIPE.normalization)
    ours = data_mod.normalize(to_tensor(images), False, table)
    theirs = torch.stack([evaluation[i]["x_lb"] for i in range(len(images))])
    assert torch.equal(ours, theirs)
    assert (usb.cifar.mean["cifar10"], usb.cifar.std["cifar10"]) == (list(data_mod.IMAGENET_MEAN),
                                                                      list(data_mod.IMAGENET_STD))
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    from torchvision import transforms

    pil = transforms.ToPILImage()(levels[0])
    want = transforms.Normalize(usb.cifar.mean["cifar10"], usb.cifar.std["cifar10"])(transforms.ToTensor()(pil))
    assert torch.equal(data_mod.normalize(levels, False, table)[0], want)
    # our CIFAR-10 table (paper and torchssl recipes) is another normalisation
    assert not torch.equal(data_mod.normalization_table(CPU), table)


def crop_at(top: int, left: int):
    """A stand-in for RandomCrop.get_params: the crop of the padded 40x40 image at (top, left)."""
    def get_params(img, size):
        assert img.size == (40, 40), "RandomCrop pads by 4 before it crops"
        return top, left, *size
    return get_params


def set_crop_and_flip(transform, weak: A.WeakParams, i: int) -> None:
    """USB's Resize, RandomCrop, RandomHorizontalFlip (the first three steps of each of its transforms) made to draw
    image i's crop offset and flip."""
    resize, crop, flip = transform.transforms[:3]
    assert (type(resize).__name__, type(crop).__name__, type(flip).__name__) == (
        "Resize", "RandomCrop", "RandomHorizontalFlip")
    assert (crop.padding, crop.padding_mode, flip.p in (0.0, 0.5, 1.0)) == (4, "reflect", True)
    crop.get_params = crop_at(4 + weak.dy[i].item(), 4 + weak.dx[i].item())
    flip.p = 1.0 if weak.flip[i] else 0.0


def test_weak_transform_is_usbs_crop_then_flip(usb, images):
    """The labelled data set's weak view (Resize, RandomCrop, RandomHorizontalFlip, ToTensor, Normalize) against
    crop_then_flip and our normalisation, given the same offsets and flips: bit for bit."""
    labelled, _, _ = usb_datasets(usb, images)
    weak = A.sample_weak_params(len(images), torch.Generator().manual_seed(7))
    table = data_mod.normalization_table(CPU, USB_RECIPE.normalization)
    ours = data_mod.normalize(U.crop_then_flip(to_tensor(images), weak), False, table)
    for i in range(len(images)):
        set_crop_and_flip(labelled.transform, weak, i)
        assert torch.equal(labelled[i]["x_lb"], ours[i]), i
    # and it is not flip-then-crop: the same draws give other pixels where a flipped image is shifted sideways
    moved = weak.flip & (weak.dx != 0)
    assert moved.any() and not torch.equal(A.flip_and_shift(to_tensor(images), weak)[moved],
                                           U.crop_then_flip(to_tensor(images), weak)[moved])


def test_randaugment_is_torchssls_code(usb):
    """USB's augment_list is TorchSSL's (names, order, ranges), RandAugment(3, 5) draws 3 ops, its Cutout size is
    U * 0.5 of the width: what augment_torchssl reproduces."""
    assert [(op.__name__, low, high) for op, low, high in usb.ra.augment_list()] == list(T.TORCHSSL_AUGMENT_LIST)
    assert U.USB_AUGMENT_LIST == T.TORCHSSL_AUGMENT_LIST
    ra = usb.ra.RandAugment(3, 5)
    assert ra.n == U.USB_NUM_OPS == 3 and ra.augment_list[0][0] is usb.ra.AutoContrast


@pytest.mark.parametrize("name", [name for name, _, _ in T.TORCHSSL_AUGMENT_LIST])
def test_op_matches_usbs_function(usb, images, name):
    """USB's op function per image against apply_op on the batch, at drawn magnitudes and both ends of the range."""
    from PIL import Image

    op, low, high = next(entry for entry in usb.ra.augment_list() if entry[0].__name__ == name)
    x = images[:48]
    u = torch.rand(len(x), generator=torch.Generator().manual_seed(1), dtype=torch.float64).tolist()
    magnitudes = [low + float(high - low) * v for v in u[:-2]] + [float(low), float(high)]
    got = A.apply_op(to_tensor(x), torch.full((len(x),), A.OP_INDEX[name]), torch.tensor(magnitudes))
    want = np.stack([np.asarray(op(Image.fromarray(img), m)) for img, m in zip(x, magnitudes)])
    assert_same_images(to_numpy(got), want, name)


def replay_usb(seed: int, n: int) -> SimpleNamespace:
    """The raw draws of sample_usb_strong_params in its documented order, from a fresh generator."""
    g = torch.Generator().manual_seed(seed)
    weak = A.sample_weak_params(n, g)
    k = torch.randint(0, 14, (n, 3), generator=g)
    u_magnitude = torch.rand(n, 3, generator=g, dtype=torch.float64)
    u_size = torch.rand(n, generator=g, dtype=torch.float64)
    u_corner = torch.rand(2, n, generator=g, dtype=torch.float64)
    return SimpleNamespace(weak=weak, k=k, u_magnitude=u_magnitude, u_size=u_size, u_corner=u_corner)


def feed_randaugment(monkeypatch, ra_module, draws: SimpleNamespace, i: int) -> list:
    """Image i's RandAugment.__call__ draws ours: its 3 ops, 3 magnitude uniforms, the cutout size and corner."""
    drawn = draws.k[i].tolist()
    uniforms = draws.u_magnitude[i].tolist() + [draws.u_size[i].item()]
    corner = draws.u_corner[:, i].tolist()

    def choices(population, k):
        assert k == 3 and [op.__name__ for op, _, _ in population] == [n for n, _, _ in T.TORCHSSL_AUGMENT_LIST]
        return [population[j] for j in drawn]

    def uniform(low=0.0, high=1.0, size=None):
        return low + (high - low) * corner.pop(0)

    monkeypatch.setattr(random, "choices", choices)
    monkeypatch.setattr(random, "random", lambda: uniforms.pop(0))
    monkeypatch.setattr(ra_module.np.random, "uniform", uniform)
    return uniforms


def test_strong_transform_is_usbs(usb, images, monkeypatch):
    """The unlabelled data set's strong view (Resize, RandomCrop, RandomHorizontalFlip, RandAugment(3, 5) with its
    Cutout, ToTensor, Normalize) against apply_usb_strong and our normalisation, given the same draws: bit for bit;
    every draw consumed. Its weak view is crop_then_flip's too."""
    _, unlabelled, _ = usb_datasets(usb, images)
    n = len(images)
    assert [type(t).__name__ for t in unlabelled.strong_transform.transforms] == [
        "Resize", "RandomCrop", "RandomHorizontalFlip", "RandAugment", "ToTensor", "Normalize"]
    p = U.sample_usb_strong_params(n, 32, 32, torch.Generator().manual_seed(11))
    draws = replay_usb(11, n)
    assert all(torch.equal(a, b) for a, b in zip(p.weak, draws.weak))
    table = data_mod.normalization_table(CPU, USB_RECIPE.normalization)
    strong = data_mod.normalize(U.apply_usb_strong(to_tensor(images), p), False, table)
    weak = data_mod.normalize(U.crop_then_flip(to_tensor(images), p.weak), False, table)
    for i in range(n):
        left = feed_randaugment(monkeypatch, usb.ra, draws, i)
        set_crop_and_flip(unlabelled.transform, p.weak, i)
        set_crop_and_flip(unlabelled.strong_transform, p.weak, i)
        item = unlabelled[i]
        assert left == []  # 3 magnitudes and the cutout size
        assert torch.equal(item["x_ulb_w"], weak[i]) and torch.equal(item["x_ulb_s"], strong[i]), i
    # RandAugment runs after the crop and flip: TorchSSL's order on the same draws gives other pixels
    torchssl_order = T.apply_torchssl_strong(to_tensor(images), T.TorchSSLStrongParams(
        p.randaugment, p.cutout, p.weak._replace(dx=torch.where(p.weak.flip, -p.weak.dx, p.weak.dx))))
    assert not torch.equal(torchssl_order, U.apply_usb_strong(to_tensor(images), p))


# ---------------------------------------------------------------- sampling

def usb_loader_batches(usb, pool_sizes: tuple[int, int], batch_sizes: tuple[int, int], steps: int,
                       epochs: int) -> list[tuple[list, list]]:
    """USB's loaders (get_data_loader with its RandomSampler name, DistributedSampler) iterated as
    AlgorithmBase.train() iterates them, DistSamplerSeedHook setting each epoch: (labelled, unlabelled) indices
    into each data set, per step."""
    args = argparse.Namespace(epoch=epochs, num_train_iter=steps, net="wrn_28_2")
    loader = {name: usb.build.get_data_loader(args, torch.utils.data.TensorDataset(torch.arange(size)), b,
                                              num_workers=0, data_sampler="RandomSampler", num_iters=steps,
                                              num_epochs=epochs)
              for name, size, b in zip(("train_lb", "train_ulb"), pool_sizes, batch_sizes)}
    alg = argparse.Namespace(loader_dict=loader, epoch=0)
    hook = usb.sampler_seed.DistSamplerSeedHook()
    out, it = [], 0
    for epoch in range(epochs):
        alg.epoch = epoch
        hook.before_train_epoch(alg)
        for lb, ulb in zip(loader["train_lb"], loader["train_ulb"]):
            if it >= steps:
                break
            out.append((lb[0].tolist(), ulb[0].tolist()))
            it += 1
    return out


def test_sampler_draws_usbs_order(usb):
    """Three USB epochs of 4 steps (B 3 from a labelled pool of 10: more than one pass per epoch; 7 from 37): our
    EpochSeededSampler gives USB's indices, batch by batch, mapped through each pool."""
    theirs = usb_loader_batches(usb, (10, 37), (3, 7), steps=12, epochs=3)
    assert len(theirs) == 12 and theirs[0] != theirs[4]
    labelled_pool, unlabelled_pool = np.arange(100, 110), np.arange(37) * 2
    lab = data_mod.EpochSeededSampler(labelled_pool, epoch_iters=4)
    unl = data_mod.EpochSeededSampler(unlabelled_pool, epoch_iters=4)
    for lb, ulb in theirs:
        assert lab.next(3).tolist() == labelled_pool[lb].tolist()
        assert unl.next(7).tolist() == unlabelled_pool[ulb].tolist()


def test_sampler_resumes_and_ignores_the_seed():
    pool = np.arange(50, 63)
    a = data_mod.EpochSeededSampler(pool, epoch_iters=5)
    first = [a.next(4) for _ in range(7)]  # into the second epoch
    state = a.state_dict()
    rest = [a.next(4) for _ in range(6)]
    b = data_mod.EpochSeededSampler(pool, epoch_iters=5)
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(rest, [b.next(4) for _ in range(6)]))
    within = torch.cat(first[:5])  # one epoch: 20 indices from 13, each at most twice (one pass and part of one)
    assert set(within.tolist()) == set(pool.tolist()) and max(np.bincount(within.numpy())) <= 2
    data = data_mod.DeviceData(torch.zeros(40, 3, 32, 32, dtype=torch.uint8), torch.zeros(40, dtype=torch.int64),
                               np.arange(0, 40, 4), torch.zeros(0), torch.zeros(0), "-")
    specs = [RunSpec(impl="own", recipe="usb", n_labels=10, seed=s, data_kind="k", data_sha256="-",
                     split_sha256="-", steps=3000) for s in (0, 1)]
    s0, s1 = (USB_RECIPE.samplers(spec, data) for spec in specs)
    assert s0.labelled.epoch_iters == usb_epoch_iters(3000) == 1000  # 3000 steps: three USB epochs of 1000
    assert torch.equal(s0.labelled.next(4), s1.labelled.next(4))  # USB: every seed, one data order
    assert torch.equal(s0.unlabelled.next(8), s1.unlabelled.next(8))
    assert not torch.equal(torch.rand(5, generator=s0.augment), torch.rand(5, generator=s1.augment))


@pytest.mark.parametrize("steps", [1, 12, 500, 1024, 2048, 3000, 2 ** 20, 1000003])
def test_epochs_are_the_adapters(steps):
    """What an epoch is: the iterations per epoch the USB adapter sets up (third_party/usb/entry.py)."""
    from third_party.usb.entry import epoch_iters

    assert usb_epoch_iters(steps) == epoch_iters(steps)


# ---------------------------------------------------------------- MixMatch's step where USB's differs

def test_mixmatch_guess_and_unlabelled_loss_are_usbs(usb):
    """USB's guess: (softmax(l1) + softmax(l2)) / 2, NOT renormalised, ** (1 / T), / its sum (mixmatch.py:67-71);
    its L_U: consistency_loss(name='mse') (consistency.py:27-40). Ours with the usb recipe's choices: bit for bit."""
    g = torch.Generator().manual_seed(3)
    l1, l2, logits_u = (torch.randn(64, 10, generator=g) * 3 for _ in range(3))
    avg = (torch.softmax(l1, dim=-1) + torch.softmax(l2, dim=-1)) / 2
    sharp = avg ** (1 / 0.5)
    want = sharp / sharp.sum(dim=-1, keepdim=True)
    got = mixmatch.guess_labels([l1, l2], 0.5, renormalise=USB_RECIPE.mixmatch_renormalise_guess)
    assert torch.equal(got, want)
    assert not torch.equal(mixmatch.guess_labels([l1, l2], 0.5), want)  # renormalised: other last bits
    targets = torch.softmax(torch.randn(64, 10, generator=g), dim=-1)
    lx, tx = torch.randn(4, 10, generator=g), torch.softmax(torch.randn(4, 10, generator=g), dim=-1)
    _, stats = mixmatch.mixmatch_loss(lx, tx, logits_u, targets, 1.0, USB_RECIPE.mixmatch_loss_u_mean)
    assert torch.equal(stats["loss_u"], usb.consistency.consistency_loss(logits_u, targets, name="mse"))
    _, elements = mixmatch.mixmatch_loss(lx, tx, logits_u, targets, 1.0)
    assert torch.isclose(elements["loss_u"], stats["loss_u"], rtol=1e-6)  # the same mean, rounded otherwise
    assert mixmatch.keep_order([torch.ones(1), torch.zeros(1)], 1)[0].item() == 1.0


# ---------------------------------------------------------------- a run

def test_a_usb_recipe_run_resumes_exactly_and_says_what_it_did(make_run_dir, tmp_path):
    """FixMatch with the usb recipe: a run stopped after step 2 and resumed (its epoch-seeded samplers inside an
    epoch: 4 steps are one USB epoch) ends with the weights of one run straight through; its result lists USB's
    rows."""
    straight = make_run_dir("own", recipe="usb", steps=4, eval_every=2, checkpoint_every=2, log_every=1,
                            depth=10, widen_factor=1)
    spec, files = read_spec(straight / "spec.json")
    resumed = copy_run(straight, tmp_path / "resumed")
    result = train_mod.train(spec, files, straight, CPU, compile=False)
    assert train_mod.train(spec, files, resumed, CPU, stop_after=2, compile=False) is None
    again = train_mod.train(spec, files, resumed, CPU, compile=False)
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert result["evals"] == again["evals"] and again["resumed_at"] == [2]
    assert a["rng"]["labelled"]["epoch"] == 1 and a["rng"]["labelled"]["pos"] == 4 * spec.batch_size
    settings = json.loads((straight / "result.json").read_text())["impl_settings"]
    assert "ImageNet" in settings["normalization"] and "crop, then flip" in settings["weak_augmentation"]
    assert "THEN RandAugment" in settings["strong_augmentation"] and "epoch index" in settings["labelled_sampling"]
    assert result["param_count"] == usb_wrn_count_by_hand(10, 1, 10)


def test_the_recipe_rows_are_usbs_where_ours_does_what_usb_does():
    """The report sets our rows beside USB's (third_party/usb/entry.py) by key and marks rows whose words differ:
    where ours does what USB does, the words are USB's; where the pipeline differs (batched on the device, our own
    generators) or USB's row is looser than its code (L_U's reduction), they differ and say how."""
    from third_party.usb.entry import IMPL_SETTINGS, USB_ALGORITHMS

    for algorithm in ("fixmatch", "mixmatch"):
        ours = {**train_mod.IMPL_SETTINGS, **train_mod.ALGORITHMS[algorithm].SETTINGS,
                **USB_RECIPE.settings_for(algorithm)}
        theirs = {**IMPL_SETTINGS, **USB_ALGORITHMS[algorithm].settings}
        same = {k for k in ours.keys() & theirs.keys() if ours[k] == theirs[k]}
        expected = {"labelled_sampling", "unlabelled_sampling", "normalization", "wrn_first_block_of_groups_2_3",
                    "wrn_conv_bias", "wrn_batchnorm_eps", "evaluated_model"}
        if algorithm == "fixmatch":
            expected |= {"strong_augmentation"}
        else:
            expected |= {"label_guessing", "batchnorm_of_the_mixed_batch", "mixup_pairing", "lambda_u_ramp_up"}
        assert expected <= same, expected - same
    assert USB_RECIPE.settings_for("mixmatch")["label_guess_renormalised"].startswith("no:")
