"""own_impl.augment_torchssl against TorchSSL's own code from the pinned checkout (its op functions, Cutout, RandAugment
and the strong transform BasicDataset builds), pixel for pixel on real CIFAR-10 images given the same draws; the
draw order and statistics; determinism.

How TorchSSL's random calls are fed our draws, per image: random.choices returns the augment_list entries we drew and
random.random our uniforms, in RandAugment's order; np.random.uniform is replaced by numpy's own arithmetic on our
uniform (test_numpy_uniform_is_numpys holds that arithmetic to numpy itself). For torchvision's flip and crop, the
flip's p is set to 1 or 0 (torch.rand(1) < 1 always holds, < 0 never) and the crop instance's get_params returns
our offset: no torch function is patched, and both transforms still run their own padding, flip and crop code.
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from contract.arrays import load_arrays
from own_impl import augment as A
from own_impl import augment_torchssl as T

from conftest import assert_same_images, to_numpy, to_tensor, torchssl_modules

N_IMAGES = 300          # real training images, spread over all classes
SEED = 12


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tssl(torchssl_checkout):
    """TorchSSL's randaugment, dataset and ssl_dataset modules, from the checkout."""
    names = ("datasets.augmentation.randaugment", "datasets.dataset", "datasets.ssl_dataset")
    with torchssl_modules(torchssl_checkout, *names) as modules:
        yield SimpleNamespace(ra=modules[0], dataset=modules[1], ssl_dataset=modules[2])


@pytest.fixture(scope="module")
def images(cifar) -> np.ndarray:
    """(N_IMAGES, 32, 32, 3) uint8 real training images, every 166th, so every class is in."""
    return np.ascontiguousarray(load_arrays(cifar.data_dir).train_x[::166][:N_IMAGES])


def replay(seed: int, n: int, height: int = 32, width: int = 32) -> SimpleNamespace:
    """The raw draws of sample_torchssl_strong_params in its documented order, from a fresh generator."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 14, (n, 3), generator=g)
    u_magnitude = torch.rand(n, 3, generator=g, dtype=torch.float64)
    u_size = torch.rand(n, generator=g, dtype=torch.float64)
    u_corner = torch.rand(2, n, generator=g, dtype=torch.float64)
    weak = A.sample_weak_params(n, g)
    return SimpleNamespace(k=k, u_magnitude=u_magnitude, u_size=u_size, u_corner=u_corner, weak=weak)


def numpy_uniform(queue: list):
    """A stand-in for np.random.uniform that returns numpy's low + (high - low) * U for the next U of `queue`."""
    def uniform(low=0.0, high=1.0, size=None):
        assert size is None
        return low + (high - low) * queue.pop(0)
    return uniform


def feed_randaugment(monkeypatch, tssl, draws: SimpleNamespace, i: int):
    """Make image i's RandAugment.__call__ draw ours: its 3 ops, 3 magnitude uniforms, the cutout size and corner."""
    drawn = draws.k[i].tolist()
    uniforms = draws.u_magnitude[i].tolist() + [draws.u_size[i].item()]

    def choices(population, k):
        # random.choices picks population[floor(random() * 14)]: our k is that index into augment_list.
        assert k == 3 and [op.__name__ for op, _, _ in population] == [n for n, _, _ in T.TORCHSSL_AUGMENT_LIST]
        return [population[j] for j in drawn]

    monkeypatch.setattr(random, "choices", choices)
    monkeypatch.setattr(random, "random", lambda: uniforms.pop(0))
    monkeypatch.setattr(tssl.ra.np.random, "uniform", numpy_uniform(draws.u_corner[:, i].tolist()))
    return uniforms


# ---------------------------------------------------------------- the tables

def test_augment_list_is_torchssls(tssl):
    theirs = [(op.__name__, low, high) for op, low, high in tssl.ra.augment_list()]
    assert theirs == list(T.TORCHSSL_AUGMENT_LIST)
    assert {name for name, _, _ in theirs} == set(A.OPS)
    assert tssl.ra.RandAugment(3, 5).n == T.TORCHSSL_NUM_OPS == 3
    # The ranges equal the paper recipe's for every op with a magnitude; only the 3 that ignore it differ.
    differ = {name for name, low, high in theirs if A.MAGNITUDE_RANGES[name] != (low, high)}
    assert differ == {"Identity", "AutoContrast", "Equalize"}


def test_numpy_uniform_is_numpys():
    """CutoutAbs's np.random.uniform(32) takes 32 as `low` (high = 1.0): x0 = 32 - 31 U, in (1, 32], exactly."""
    state = np.random.RandomState(4)   # the legacy generator behind np.random.uniform
    want = np.array([state.uniform(32) for _ in range(10_000)])   # called as CutoutAbs calls it
    u = np.random.RandomState(4).random_sample(10_000)              # the same state's standard uniforms
    assert np.array_equal(T.numpy_uniform(32, torch.from_numpy(u)).numpy(), want)
    assert 1 < want.min() < 1.01 and 31.99 < want.max() <= 32


# ---------------------------------------------------------------- each piece against TorchSSL's functions

@pytest.mark.parametrize("name", [name for name, _, _ in T.TORCHSSL_AUGMENT_LIST])
def test_op_matches_torchssls_function(tssl, images, name):
    """TorchSSL's op function per image against apply_op on the batch, at min + (max - min) * U for drawn U and at
    both ends of its range."""
    op, low, high = next(entry for entry in tssl.ra.augment_list() if entry[0].__name__ == name)
    x = images[:64]
    u = torch.rand(len(x), generator=torch.Generator().manual_seed(1), dtype=torch.float64).tolist()
    magnitudes = [low + float(high - low) * v for v in u[:-2]] + [float(low), float(high)]
    got = A.apply_op(to_tensor(x), torch.full((len(x),), A.OP_INDEX[name]), torch.tensor(magnitudes))
    want = np.stack([np.asarray(op(Image.fromarray(img), m)) for img, m in zip(x, magnitudes)])
    assert_same_images(to_numpy(got), want, name)


def cutout_cases(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(side, x0, y0) float64: drawn ones, then edges: no cutout, tiny, integral and just-below-integral sides, the
    corner at exactly W (U = 0), near 1, and a square reaching past the bottom-right corner."""
    p = T.sample_torchssl_strong_params(n - 8, 32, 32, torch.Generator().manual_seed(2)).cutout
    below = float(np.nextafter(5.0, 0.0))
    side = torch.tensor([0.0, 1e-9, 5.0, below, 15.999, 8.0, 4.25, 16 * float(np.nextafter(1.0, 0.0))])
    x0 = torch.tensor([10.5, 32.0, 7.0, 7.0, 1.0 + 1e-12, 32.0, 29.9, 20.0])
    y0 = torch.tensor([3.2, 31.99, 12.5, 8.0, 31.0, 1.5, 30.7, 28.0])
    return (torch.cat([p.side, side.double()]), torch.cat([p.x0, x0.double()]), torch.cat([p.y0, y0.double()]))


def test_cutout_matches_torchssls_cutout(tssl, images, monkeypatch):
    """TorchSSL's Cutout(img, v) with np.random.uniform returning our corner, against torchssl_cutout."""
    side, x0, y0 = cutout_cases(len(images))
    got = T.torchssl_cutout(to_tensor(images), T.TorchSSLCutoutParams(side, x0, y0))
    want = []
    for i, img in enumerate(images):
        corner = {32: [x0[i].item(), y0[i].item()]}   # CutoutAbs asks for uniform(w), then uniform(h): both 32
        monkeypatch.setattr(tssl.ra.np.random, "uniform", lambda low, c=corner: c[low].pop(0))
        want.append(np.asarray(tssl.ra.Cutout(Image.fromarray(img), side[i].item() / 32)))
    assert_same_images(to_numpy(got), np.stack(want), "cutout")


def test_randaugment_call_matches_torchssls(tssl, images, monkeypatch):
    """RandAugment(3, 5).__call__ (3 ops, then Cutout) fed our draws, against the first two stages here."""
    n = len(images)
    p = T.sample_torchssl_strong_params(n, 32, 32, torch.Generator().manual_seed(SEED))
    draws = replay(SEED, n)
    got = T.torchssl_cutout(T.torchssl_randaugment(to_tensor(images), p.randaugment), p.cutout)
    randaugment = tssl.ra.RandAugment(3, 5)
    want = []
    for i, img in enumerate(images):
        left = feed_randaugment(monkeypatch, tssl, draws, i)
        want.append(np.asarray(randaugment(Image.fromarray(img))))
        assert left == []   # every uniform consumed: 3 magnitudes and the cutout size
    assert_same_images(to_numpy(got), np.stack(want), "RandAugment(3, 5)")


def test_whole_strong_transform_matches_basicdatasets(tssl, images, monkeypatch):
    """BasicDataset(is_ulb=True) on our images, with SSL_Dataset's training transform: its strong view (item [2], a
    normalized float tensor) against ToTensor + Normalize of apply_torchssl_strong's pixels, bit for bit."""
    n = len(images)
    transform = tssl.ssl_dataset.get_transform(tssl.ssl_dataset.mean["cifar10"], tssl.ssl_dataset.std["cifar10"],
                                               32, train=True)
    dataset = tssl.dataset.BasicDataset("fixmatch", images, np.zeros(n, np.int64), 10, transform, is_ulb=True)
    steps = dataset.strong_transform.transforms
    assert [type(t).__name__ for t in steps] == ["RandAugment", "RandomHorizontalFlip", "RandomCrop", "ToTensor",
                                                  "Normalize"]
    flip, crop = steps[1], steps[2]
    assert (flip.p, tuple(crop.size), crop.padding, crop.padding_mode) == (0.5, (32, 32), 4, "reflect")
    p = T.sample_torchssl_strong_params(n, 32, 32, torch.Generator().manual_seed(SEED + 1))
    draws = replay(SEED + 1, n)
    ours = to_numpy(T.apply_torchssl_strong(to_tensor(images), p))
    to_normalized = steps[3:]
    for i in range(n):
        feed_randaugment(monkeypatch, tssl, draws, i)
        flip.p = 1.0 if draws.weak.flip[i] else 0.0
        top, left = 4 + draws.weak.dy[i].item(), 4 + draws.weak.dx[i].item()
        crop.get_params = crop_at(top, left)
        theirs = dataset[i][2]
        want = to_normalized[1](to_normalized[0](Image.fromarray(ours[i])))
        assert torch.equal(theirs, want), f"image {i}: {(theirs != want).any(0).sum().item()} pixels differ"


def crop_at(top: int, left: int):
    """A stand-in for RandomCrop.get_params: the crop of the padded 40x40 image at (top, left)."""
    def get_params(img, size):
        assert img.size == (40, 40), "RandomCrop pads by 4 before it crops"
        return top, left, *size
    return get_params


# ---------------------------------------------------------------- values worked out by hand

def test_every_one_of_the_three_ops_is_applied_by_hand():
    """Three TranslateX by 0.1 (3.2 px: PIL reads column floor(x + 0.5 + 3.2) = x + 3) move the image 9 px left."""
    x = (torch.arange(32 * 32).reshape(1, 1, 32, 32) % 251).to(torch.uint8).repeat(2, 3, 1, 1)
    no_shift, no_cutout, corner = torch.zeros(2, dtype=torch.int64), torch.zeros(2).double(), torch.full((2,), 9.0)
    p = T.TorchSSLStrongParams(
        T.TorchSSLRandAugmentParams(torch.full((2, 3), A.OP_INDEX["TranslateX"]), torch.full((2, 3), 0.1).double()),
        T.TorchSSLCutoutParams(no_cutout, corner.double(), corner.double()),
        A.WeakParams(torch.zeros(2, dtype=torch.bool), no_shift, no_shift))
    out = T.apply_torchssl_strong(x, p)
    want = torch.zeros_like(x)
    want[..., :23] = x[..., 9:]
    assert torch.equal(out, want)


def test_cutout_by_hand():
    """side 5.5, x0 = 10.9: int(10.9 - 2.75) = 8, int(8 + 5.5) = 13, columns 8..13; y0 = 3.0: int(0.25) = 0, rows
    0..5. side 4, x0 = y0 = 32.0 (U = 0): start int(30) = 30, end min(32, 34) = 32, so columns and rows 30..31.
    side 0: nothing. side 0.5 at (31.99, 10.0): int(31.74) = 31, int(31.5) = 31; int(9.75) = 9, int(9.5) = 9."""
    x = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    p = T.TorchSSLCutoutParams(torch.tensor([5.5, 4.0, 0.0, 0.5], dtype=torch.float64),
                               torch.tensor([10.9, 32.0, 20.0, 31.99], dtype=torch.float64),
                               torch.tensor([3.0, 32.0, 20.0, 10.0], dtype=torch.float64))
    out = T.torchssl_cutout(x, p)
    fill = torch.tensor(T.CUTOUT_FILL, dtype=torch.uint8)[:, None, None]
    want = torch.zeros_like(x)
    want[0, :, 0:6, 8:14] = fill
    want[1, :, 30:32, 30:32] = fill
    want[3, :, 9:10, 31:32] = fill
    assert T.CUTOUT_FILL == (125, 123, 114)
    assert torch.equal(out, want)


# ---------------------------------------------------------------- draws

def test_draw_order_and_arithmetic_are_documented_ones():
    """Params from the generator equal TorchSSL's formulas in Python floats on the replayed raw draws."""
    n = 500
    p = T.sample_torchssl_strong_params(n, 32, 24, torch.Generator().manual_seed(5))
    d = replay(5, n, height=32, width=24)
    for i in range(n):
        for slot in range(3):
            name, low, high = T.TORCHSSL_AUGMENT_LIST[d.k[i, slot].item()]
            assert p.randaugment.op_index[i, slot] == A.OP_INDEX[name]
            assert p.randaugment.magnitude[i, slot].item() == low + float(high - low) * d.u_magnitude[i, slot].item()
        assert p.cutout.side[i].item() == d.u_size[i].item() * 0.5 * 24
        assert p.cutout.x0[i].item() == 24 + (1.0 - 24) * d.u_corner[0, i].item()
        assert p.cutout.y0[i].item() == 32 + (1.0 - 32) * d.u_corner[1, i].item()
    assert all(torch.equal(a, b) for a, b in zip(p.weak, d.weak))


# Chi-square quantiles at 1 - 1e-6 by degrees of freedom: a correct sampler fails about once in a million seeds.
CHI2_1E6 = {8: 42.7, 13: 52.7, 31: 83.6}


def chi_square(counts: torch.Tensor) -> float:
    expected = counts.sum().item() / len(counts)
    return ((counts.double() - expected) ** 2 / expected).sum().item()


def test_draw_statistics():
    n = 200_000
    p = T.sample_torchssl_strong_params(n, 32, 32, torch.Generator().manual_seed(6))
    ra, cut = p.randaugment, p.cutout
    assert ra.op_index.shape == ra.magnitude.shape == (n, 3) and set(ra._fields) == {"op_index", "magnitude"}
    for slot in range(3):   # each slot uniform over the 14 ops
        assert chi_square(torch.bincount(ra.op_index[:, slot], minlength=14)) < CHI2_1E6[13]
    same = (ra.op_index[:, 0] == ra.op_index[:, 1]).double().mean().item()   # with replacement: 1/14
    assert abs(same - 1 / 14) < 5 * (1 / 14 * 13 / 14 / n) ** 0.5
    for name, low, high in T.TORCHSSL_AUGMENT_LIST:
        u = (ra.magnitude[ra.op_index == A.OP_INDEX[name]] - low) / (high - low)
        assert 0 <= u.min() < 1e-3 and 1 - 1e-3 < u.max() < 1, name
        assert chi_square(torch.bincount((u * 32).long(), minlength=32)) < CHI2_1E6[31], name
    assert 0 <= cut.side.min() < 1e-3 and 16 - 1e-3 < cut.side.max() < 16   # side = U * 0.5 * 32 px
    assert chi_square(torch.bincount((cut.side * 2).long(), minlength=32)) < CHI2_1E6[31]
    for corner in (cut.x0, cut.y0):   # np.random.uniform(32): (1, 32]
        assert 1 < corner.min() < 1 + 1e-3 and 32 - 1e-3 < corner.max() <= 32
        assert chi_square(torch.bincount(((corner - 1) * 32 / 31).long().clamp(max=31), minlength=32)) < CHI2_1E6[31]
    assert abs(p.weak.flip.double().mean().item() - 0.5) < 5 * (0.25 / n) ** 0.5
    for shift in (p.weak.dy, p.weak.dx):
        assert chi_square(torch.bincount(shift + 4, minlength=9)) < CHI2_1E6[8]


def leaves(p: T.TorchSSLStrongParams) -> list[torch.Tensor]:
    return [t for part in p for t in part]


def test_sampler_is_deterministic_and_input_untouched(images):
    x = to_tensor(images[:64])
    a, b, c = (T.sample_torchssl_strong_params(64, 32, 32, torch.Generator().manual_seed(s)) for s in (7, 7, 8))
    assert all(torch.equal(s, t) for s, t in zip(leaves(a), leaves(b)))
    assert not any(torch.equal(s, t) for s, t in zip(leaves(a), leaves(c)))
    out = T.torchssl_strong_augment(x, torch.Generator().manual_seed(7))
    assert torch.equal(out, T.apply_torchssl_strong(x, a)) and out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(x, to_tensor(images[:64]))


def test_apply_is_one_graph_without_random_numbers(images):
    """Dynamo traces apply_torchssl_strong as one graph (fullgraph: no break, so no host read inside), and it draws
    nothing: the global random state is the same after it."""
    torch.compiler.reset()
    x = to_tensor(images[:32])
    p = T.sample_torchssl_strong_params(32, 32, 32, torch.Generator().manual_seed(9))
    compiled = torch.compile(T.apply_torchssl_strong, backend="eager", fullgraph=True, dynamic=False)
    state = torch.get_rng_state()
    assert torch.equal(compiled(x, p), T.apply_torchssl_strong(x, p))
    assert torch.equal(torch.get_rng_state(), state)
    torch.compiler.reset()
