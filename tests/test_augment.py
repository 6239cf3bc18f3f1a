"""Tests of own_impl.augment: batched ops against the per-image PIL reference on real CIFAR-10 images, against values
worked out by hand, and the distributions of the random parameters.

Tolerance: every op is held to EXACT equality with PIL, geometric ones included. A generic float resampler
(grid_sample, or any float formula for source coordinates) could not promise that: a nearest-neighbour source is the
floor of a coordinate, and coordinates of pixel centres land on integers for many angles and shears, where the last
bit of float arithmetic decides the pixel. augment.py instead reproduces PIL's own arithmetic (16.16 fixed point for
rotations and shears, a float64 floor for translations, integer histograms, and the float64 AutoContrast table and
float32 blends emulated in integers, so that no compiler's fused multiply-add changes them), so the only source
of disagreement left is a coordinate within ~1e-11 of a rounding tie in the fixed-point coefficients, which no
magnitude used here comes near. Equality was measured on 6,000 real images x 14 ops before being required here.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from own_impl import augment as A

import augment_ref as R
from conftest import archive_images, assert_same_images, cuda_param, to_numpy, to_tensor

PER_CLASS = 4   # real images per CIFAR-10 class: 40 in all


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def real_images(shared_archive) -> np.ndarray:
    return archive_images(shared_archive, PER_CLASS)


def _edge_images() -> np.ndarray:
    """Hand-made images that reach the histogram ops' special branches, which real photos rarely do."""
    rng = np.random.default_rng(0)
    constant = np.full((32, 32, 3), 77, np.uint8)                      # one level: both LUTs are the identity
    checker = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)  # levels 0 and 255 only
    checker = np.repeat(checker[:, :, None], 3, 2)
    step_zero = np.full((32, 32, 3), 200, np.uint8)                    # Equalize's step = 124 // 255 = 0
    step_zero.reshape(-1, 3)[:124] = rng.integers(0, 200, (124, 3))
    mixed = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)         # one channel constant, one two-level
    mixed[:, :, 0] = 9
    mixed[:, :, 1] = np.where(rng.random((32, 32)) < 0.3, 40, 90)
    return np.stack([constant, checker, step_zero, mixed])


@pytest.fixture(scope="module")
def images(real_images) -> np.ndarray:
    return np.concatenate([real_images, _edge_images()])


# ---------------------------------------------------------------- every op against PIL

# FixMatch paper, appendix D, Table 12 (as TorchSSL's augment_list), in augment_ref's units: written out here
# rather than read from augment.py so that a changed range there fails.
PAPER_RANGES = {
    "Identity": None, "AutoContrast": None, "Equalize": None,
    "Rotate": (-30, 30), "Solarize": (0, 256), "Posterize": (4, 8),
    "Color": (0.05, 0.95), "Contrast": (0.05, 0.95), "Brightness": (0.05, 0.95), "Sharpness": (0.05, 0.95),
    "ShearX": (-0.3, 0.3), "ShearY": (-0.3, 0.3), "TranslateX": (-0.3, 0.3), "TranslateY": (-0.3, 0.3),
}


def test_op_table_is_the_papers():
    assert len(A.OPS) == 14 and set(A.OPS) == set(R.OPS) == set(PAPER_RANGES)
    for name, paper in PAPER_RANGES.items():
        assert A.MAGNITUDE_RANGES[name] == (paper or (0.0, 0.0)), name
    assert (A.RA_NUM_OPS, A.RA_OP_PROB, A.CUTOUT_SIZE, A.WEAK_SHIFT) == (2, 0.5, 16, 4)


@pytest.mark.parametrize("name", A.OPS)
def test_op_matches_pil_on_real_images(images, name):
    """Each image at 7 evenly spaced magnitudes (both ends of the range included) and 1 random one, all in one
    batch, so each image of the batch also carries its own magnitude."""
    low, high = A.MAGNITUDE_RANGES[name]
    n = len(images)
    grid = torch.linspace(low, high, 7, dtype=torch.float64)
    random = low + (high - low) * torch.rand(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    magnitude = torch.cat([grid.repeat_interleave(n), random])
    batch = np.tile(images, (8, 1, 1, 1))
    got = to_numpy(A.apply_op(to_tensor(batch), torch.full((len(batch),), A.OP_INDEX[name]), magnitude))
    want = np.stack([np.asarray(R.apply_op(Image.fromarray(img), name, m.item()))
                     for img, m in zip(batch, magnitude)])
    assert_same_images(got, want, name)


def test_mixed_ops_and_masks_in_one_batch_match_pil(images):
    """Two RA slots with a different op, magnitude and on/off per image: the per-image selection is right."""
    n = 4 * len(images)
    batch = np.tile(images, (4, 1, 1, 1))
    params = A.sample_randaugment_params(n, torch.Generator().manual_seed(5))
    got = to_numpy(A.randaugment(to_tensor(batch), params))
    want = []
    for i, img in enumerate(batch):
        pil = Image.fromarray(img)
        for slot in range(A.RA_NUM_OPS):
            if params.apply[i, slot]:
                pil = R.apply_op(pil, A.OPS[params.op_index[i, slot]], params.magnitude[i, slot].item())
        want.append(np.asarray(pil))
    assert_same_images(got, np.stack(want), "randaugment")


def test_strong_augment_is_weak_then_randaugment_then_cutout(real_images):
    """strong_augment == the reference pipeline run per image with the parameters drawn from the same seed."""
    n = len(real_images)
    got = to_numpy(A.strong_augment(to_tensor(real_images), torch.Generator().manual_seed(11)))
    g = torch.Generator().manual_seed(11)   # draws in strong_augment's order: weak, RandAugment, cutout
    weak = A.sample_weak_params(n, g)
    ra = A.sample_randaugment_params(n, g)
    cut = A.sample_cutout_params(n, 32, 32, g)
    want = []
    for i, img in enumerate(real_images):
        pil = Image.fromarray(R.flip_and_shift(img, bool(weak.flip[i]), int(weak.dy[i]), int(weak.dx[i])))
        for slot in range(A.RA_NUM_OPS):
            if ra.apply[i, slot]:
                pil = R.apply_op(pil, A.OPS[ra.op_index[i, slot]], ra.magnitude[i, slot].item())
        want.append(np.asarray(R.cutout(pil, int(cut.cy[i]), int(cut.cx[i]))))
    assert_same_images(got, np.stack(want), "strong_augment")


# ---------------------------------------------------------------- values worked out by hand

def one_op(name: str, x: torch.Tensor, magnitude: float) -> torch.Tensor:
    n = x.shape[0]
    return A.apply_op(x, torch.full((n,), A.OP_INDEX[name]), torch.full((n,), magnitude, dtype=torch.float64))


def row_image(values) -> torch.Tensor:
    """(1, 3, 1, len(values)) uint8 with the same values in every channel."""
    return torch.tensor(values, dtype=torch.uint8).reshape(1, 1, 1, -1).repeat(1, 3, 1, 1)


def test_identity_and_masked_out_images_are_untouched(real_images):
    x = to_tensor(real_images)
    assert torch.equal(one_op("Identity", x, 0.0), x)
    n = len(x)
    off = A.apply_op(x, torch.full((n,), A.OP_INDEX["Rotate"]), torch.full((n,), 20.0, dtype=torch.float64),
                     mask=torch.zeros(n, dtype=torch.bool))
    assert torch.equal(off, x)


def test_solarize_by_hand():
    x = row_image([0, 100, 127, 128, 200, 255])
    assert one_op("Solarize", x, 128.0)[0, 0, 0].tolist() == [0, 100, 127, 127, 55, 0]     # v >= 128 -> 255 - v
    assert one_op("Solarize", x, 128.5)[0, 0, 0].tolist() == [0, 100, 127, 128, 55, 0]     # 128 < 128.5 stays
    assert one_op("Solarize", x, 256.0)[0, 0, 0].tolist() == [0, 100, 127, 128, 200, 255]  # nothing inverted


def test_posterize_by_hand():
    x = row_image([0, 15, 16, 100, 255])
    assert one_op("Posterize", x, 4.9)[0, 0, 0].tolist() == [0, 0, 16, 96, 240]    # int(4.9) = 4 bits: v & 0xF0
    assert one_op("Posterize", x, 7.0)[0, 0, 0].tolist() == [0, 14, 16, 100, 254]  # 7 bits: v & 0xFE


def test_autocontrast_and_equalize_by_hand():
    x = row_image([50, 100, 150, 100])
    # scale = 255 / (150 - 50) = 2.55; 100 -> int(127.5) = 127
    assert one_op("AutoContrast", x, 0.0)[0, 0, 0].tolist() == [0, 127, 255, 127]
    # 512 pixels at 10, 512 at 20: step = (1024 - 512) // 255 = 2; lut[10] = (1 + 0) // 2 = 0,
    # lut[20] = (1 + 512) // 2 = 256, clipped to 255.
    y = torch.tensor([10, 20], dtype=torch.uint8).repeat(512).reshape(1, 1, 32, 32).repeat(1, 3, 1, 1)
    assert one_op("Equalize", y, 0.0).unique().tolist() == [0, 255]
    assert torch.equal(one_op("Equalize", y, 0.0) == 0, y == 10)


def test_blend_ops_by_hand():
    red = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    red[:, 0] = 255
    # L = (19595 * 255 + 32768) >> 16 = 76; Color 0.5: R = int(76 + 0.5 * 179) = 165, G = B = int(76 - 38) = 38
    assert one_op("Color", red, 0.5)[0, :, 0, 0].tolist() == [165, 38, 38]
    assert one_op("Color", red, 0.0)[0, :, 0, 0].tolist() == [76, 76, 76]
    # Brightness 0.5 blends with black: int(0.5 * 101) = 50
    assert one_op("Brightness", row_image([101, 255]), 0.5)[0, 0, 0].tolist() == [50, 127]
    # Contrast: half 0, half 200 gray -> mean L 100; 0.5: 0 -> 50, 200 -> 150
    half = torch.tensor([0, 200], dtype=torch.uint8).repeat_interleave(8).reshape(1, 1, 4, 4).repeat(1, 3, 1, 1)
    assert one_op("Contrast", half, 0.5)[0, 0].unique().tolist() == [50, 150]
    # Sharpness: one 130 pixel on black. Smoothed: centre round(5 * 130 / 13) = 50, its 8 neighbours
    # round(130 / 13) = 10. Factor 0.5: centre 50 + 0.5 * (130 - 50) = 90, neighbours 10 - 0.5 * 10 = 5.
    dot = torch.zeros(1, 3, 5, 5, dtype=torch.uint8)
    dot[:, :, 2, 2] = 130
    want = torch.zeros(5, 5, dtype=torch.uint8)
    want[1:4, 1:4] = 5
    want[2, 2] = 90
    assert torch.equal(one_op("Sharpness", dot, 0.5)[0, 1], want)


def test_geometric_ops_by_hand():
    x = torch.arange(32 * 32, dtype=torch.int64).reshape(1, 1, 32, 32).repeat(1, 3, 1, 1)
    x = (x % 251).to(torch.uint8)   # distinct neighbours, so any misplaced pixel shows
    # TranslateX 0.3: PIL maps output x to input floor(x + 0.5 + 9.6) = x + 10; the last 10 columns are filled 0.
    want = torch.zeros_like(x)
    want[..., :22] = x[..., 10:]
    assert torch.equal(one_op("TranslateX", x, 0.3), want)
    want = torch.zeros_like(x)
    want[..., 6:, :] = x[..., :26, :]   # -0.2 * 32 = -6.4: floor(y + 0.5 - 6.4) = y - 6
    assert torch.equal(one_op("TranslateY", x, -0.2), want)
    # Rotations by quarter turns, counter-clockwise as PIL's, equal torch.rot90 / flips.
    assert torch.equal(one_op("Rotate", x, 90.0), torch.rot90(x, 1, (2, 3)))
    assert torch.equal(one_op("Rotate", x, -90.0), torch.rot90(x, -1, (2, 3)))
    assert torch.equal(one_op("Rotate", x, 180.0), x.flip(2, 3))
    # ShearX 0.25: output pixel (x, y) reads input column floor((x + 0.5) + 0.25 (y + 0.5)) = x + floor(0.625 + y / 4)
    # of row y (all dyadic, so PIL's 16.16 fixed point is exact here).
    want = torch.zeros_like(x)
    for y in range(32):
        shift = int(np.floor(0.625 + y / 4))
        want[..., y, :32 - shift] = x[..., y, shift:]
    assert torch.equal(one_op("ShearX", x, 0.25), want)


def test_flip_and_shift_by_hand():
    x = torch.arange(3 * 4 * 5, dtype=torch.uint8).reshape(1, 3, 4, 5)
    no = torch.zeros(1, dtype=torch.int64)
    flip = torch.ones(1, dtype=torch.bool)
    assert torch.equal(A.flip_and_shift(x, A.WeakParams(flip, no, no)), x.flip(3))
    # shift right by 2 with reflection: columns [2, 1, 0, 1, 2] of row r
    shifted = A.flip_and_shift(x, A.WeakParams(~flip, no, torch.tensor([-2])))
    assert torch.equal(shifted, x[..., [2, 1, 0, 1, 2]])
    # flipped columns are [4, 3, 2, 1, 0]; shift down by 1 -> rows [1, 0, 1, 2]
    both = A.flip_and_shift(x, A.WeakParams(flip, torch.tensor([-1]), no))
    assert torch.equal(both, x.flip(3)[..., [1, 0, 1, 2], :])


def test_cutout_by_hand():
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    out = A.cutout(x, A.CutoutParams(torch.tensor([0, 16]), torch.tensor([0, 20])))
    want = torch.zeros_like(x)
    want[0, :, :8, :8] = 127        # centre (0, 0): rows and columns [-8, 8) clipped to [0, 8)
    want[1, :, 8:24, 12:28] = 127   # centre (16, 20): rows [8, 24), columns [12, 28)
    assert torch.equal(out, want)


# ---------------------------------------------------------------- PIL's rounding, exactly, whatever the compiler

def test_autocontrast_table_is_pils_for_every_lowest_and_highest_level():
    """Every (lo, hi) pair: the integer emulation gives Python's float64 int(i * scale + offset) at all 256 levels,
    and PIL's own autocontrast at the levels an image with that range holds. Python's rounding turns the top
    level into 254 for thousands of pairs: an exact formula such as (i - lo) * 255 // (hi - lo) would not do."""
    pairs = [(lo, hi) for lo in range(256) for hi in range(lo, 256)]
    lo, hi = (torch.tensor(v) for v in zip(*pairs))
    hist = torch.zeros(len(pairs), 1, 256, dtype=torch.int64)
    hist[torch.arange(len(pairs)), 0, lo] = 1
    hist[torch.arange(len(pairs)), 0, hi] += 1
    got = A._autocontrast_lut(hist)[:, 0].numpy()                          # (P, 256)

    levels = np.arange(256, dtype=np.float64)
    span = (hi - lo).numpy()[:, None].astype(np.float64)
    scale = 255.0 / np.maximum(span, 1)                                     # numpy rounds each op as Python does
    offset = -lo.numpy()[:, None] * scale
    python = np.clip(np.trunc(levels * scale + offset), 0, 255)
    python = np.where(span == 0, levels, python).astype(np.int64)           # hi <= lo: PIL leaves the image
    assert np.array_equal(got, python)
    exact = np.clip((levels - lo.numpy()[:, None]) * 255 // np.maximum(span, 1), 0, 255)
    assert (python != np.where(span == 0, levels, exact)).sum() > 10_000   # the rounding the emulation keeps

    for k in range(0, len(pairs), 7):                                       # PIL itself, a seventh of the pairs
        a, b = pairs[k]
        ramp = np.arange(a, b + 1, dtype=np.uint8)[None]                    # every level from lo to hi
        pil = np.asarray(ImageOps.autocontrast(Image.fromarray(ramp, "L")))[0]
        assert np.array_equal(pil, got[k, a:b + 1]), (a, b)


def _blend_alphas() -> np.ndarray:
    """float32 factors in the RandAugment range: a grid, random ones, and those next to k / d for small d, where
    the rounding of the product decides the truncated result."""
    near = np.array([k / d for d in range(2, 41) for k in range(1, d) if 0.05 <= k / d <= 0.95], np.float32)
    near = np.concatenate([near, np.nextafter(near, np.float32(0)), np.nextafter(near, np.float32(1))])
    rng = np.random.default_rng(0)
    picked = rng.choice(near, 150, replace=False)
    return np.concatenate([np.linspace(0.05, 0.95, 7), rng.uniform(0.05, 0.95, 40), picked]).astype(np.float32)


def test_blend_is_pils_for_every_pair_of_levels():
    """Image.blend(im1, im2, alpha) for all 65,536 (im1, im2) pairs at each factor, against PIL itself; a fused
    multiply-add (the exact in1 + alpha * (in2 - in1), rounded once) differs from PIL for some of them."""
    im1 = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 256, 1)       # (256, 256): row i holds level i
    im2 = im1.T.copy()                                                      # column j holds level j
    t1, t2 = torch.from_numpy(im1), torch.from_numpy(im2)
    fused_differs = 0
    for alpha in _blend_alphas():
        pil = np.asarray(Image.blend(Image.fromarray(im1, "L"), Image.fromarray(im2, "L"), float(alpha)))
        got = A._pil_blend(t1, t2, torch.tensor(alpha)).numpy()
        assert np.array_equal(got, pil), float(alpha)
        d = im2.astype(np.float64) - im1
        fused = np.trunc((im1 + np.float64(alpha) * d).astype(np.float32))  # exact in float64, one rounding
        fused_differs += int((np.clip(fused, 0, 255) != pil).sum())
    assert fused_differs > 0


def _compilers_contract() -> bool:
    """Whether inductor's C++ code, built with -ffp-contract=fast, fuses a * b + c into one FMA on this machine
    (it does where the CPU has FMA): a * b loses 2^-60 when rounded; the fused form keeps it."""
    a = torch.full((64,), 1.0 + 2.0**-30, dtype=torch.float64)
    c = torch.full((64,), -1.0, dtype=torch.float64)
    torch.compiler.reset()
    try:
        with torch._inductor.config.patch({"cpp.enable_floating_point_contract_flag": "fast"}):
            fused = torch.compile(lambda a, b, c: a * b + c, dynamic=False)(a, a, c)
    except AttributeError:  # a torch without the setting
        return False
    finally:
        torch.compiler.reset()
    return not torch.equal(fused, a * a + c)


# ---------------------------------------------------------------- weak augment and cutout on real images

def test_weak_augment_is_a_reflect_padded_crop_of_a_flip(real_images):
    x = to_tensor(real_images)
    out = A.weak_augment(x, torch.Generator().manual_seed(2))
    assert out.shape == x.shape and out.dtype == torch.uint8 and out.device == x.device
    p = A.sample_weak_params(len(x), torch.Generator().manual_seed(2))
    want = np.stack([R.flip_and_shift(img, bool(p.flip[i]), int(p.dy[i]), int(p.dx[i]))
                     for i, img in enumerate(real_images)])
    assert_same_images(to_numpy(out), want, "weak_augment")


def test_cutout_changes_exactly_one_clipped_square(real_images):
    x = to_tensor(real_images)
    x[x == 127] = 128   # so that every 127 in the output comes from the cutout
    n = len(x)
    params = A.sample_cutout_params(n, 32, 32, torch.Generator().manual_seed(4))
    out = A.cutout(x, params)
    want = np.stack([np.asarray(R.cutout(Image.fromarray(img), int(params.cy[i]), int(params.cx[i])))
                     for i, img in enumerate(to_numpy(x))])
    assert_same_images(to_numpy(out), want, "cutout")
    for i in range(n):
        filled = (out[i] == 127).all(0)                                 # (H, W)
        assert torch.equal(out[i][:, ~filled], x[i][:, ~filled])      # nothing else changed
        rows, cols = filled.any(1).nonzero()[:, 0], filled.any(0).nonzero()[:, 0]
        assert torch.equal(filled, filled.any(1)[:, None] & filled.any(0)[None, :])  # one rectangle
        assert rows.max() - rows.min() + 1 == len(rows) and cols.max() - cols.min() + 1 == len(cols)
        for lo, hi, size in ((rows.min(), rows.max(), len(rows)), (cols.min(), cols.max(), len(cols))):
            assert 8 <= size <= 16 and (size == 16 or lo == 0 or hi == 31)  # 16, unless clipped at a border


# ---------------------------------------------------------------- distributions

# Bounds at about p = 1e-6 for a correct sampler; all seeds are fixed, so the tests are deterministic.
CHI2_1E6 = {8: 42.7, 13: 52.7, 31: 83.6}   # chi-square quantile 1 - 1e-6 by degrees of freedom


def chi_square(counts: torch.Tensor) -> float:
    expected = counts.sum().item() / len(counts)
    return ((counts.double() - expected) ** 2 / expected).sum().item()


def test_randaugment_sampling_distribution():
    n = 100_000
    p = A.sample_randaugment_params(n, torch.Generator().manual_seed(7))
    assert p.op_index.shape == p.apply.shape == p.magnitude.shape == (n, A.RA_NUM_OPS)
    for slot in range(A.RA_NUM_OPS):
        counts = torch.bincount(p.op_index[:, slot], minlength=14)
        assert len(counts) == 14 and chi_square(counts) < CHI2_1E6[13], counts
    # drawn WITH replacement and independently: both slots hold the same op for 1/14 of the images
    same = (p.op_index[:, 0] == p.op_index[:, 1]).double().mean().item()
    assert abs(same - 1 / 14) < 5 * (1 / 14 * 13 / 14 / n) ** 0.5
    rate = p.apply.double().mean().item()
    assert abs(rate - 0.5) < 5 * (0.25 / (2 * n)) ** 0.5
    for k, name in enumerate(A.OPS):
        if PAPER_RANGES[name] is None:
            continue
        low, high = PAPER_RANGES[name]
        u = (p.magnitude[p.op_index == k] - low) / (high - low)   # uniform on [0, 1]: 32 equal bins, ends reached
        assert u.min() >= 0 and u.max() <= 1
        assert chi_square(torch.bincount((u * 32).long().clamp(max=31), minlength=32)) < CHI2_1E6[31]
        assert u.min() < 1e-3 and u.max() > 1 - 1e-3


def test_weak_and_cutout_sampling_distribution():
    n = 100_000
    g = torch.Generator().manual_seed(8)
    w = A.sample_weak_params(n, g)
    assert abs(w.flip.double().mean().item() - 0.5) < 5 * (0.25 / n) ** 0.5
    for shift in (w.dy, w.dx):
        assert shift.min() == -A.WEAK_SHIFT and shift.max() == A.WEAK_SHIFT
        assert chi_square(torch.bincount(shift + A.WEAK_SHIFT)) < CHI2_1E6[8]
    c = A.sample_cutout_params(n, 32, 32, g)
    for centre in (c.cy, c.cx):
        assert centre.min() == 0 and centre.max() == 31
        assert chi_square(torch.bincount(centre)) < CHI2_1E6[31]


# ---------------------------------------------------------------- determinism and devices

def test_same_seed_same_output(real_images):
    x = to_tensor(real_images)
    a = A.strong_augment(x, torch.Generator().manual_seed(21))
    b = A.strong_augment(x, torch.Generator().manual_seed(21))
    c = A.strong_augment(x, torch.Generator().manual_seed(22))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(x, to_tensor(real_images))   # input not modified in place


@pytest.mark.parametrize("device", ["cpu", "cpu-fma", cuda_param()])
def test_compiled_augmentation_changes_no_pixel(images, device):
    """torch.compile, as own_impl.train compiles the augmentation (one graph, static shapes), gives the eager CPU
    ops' pixels exactly: every op at 7 grid magnitudes and a random one per image, all ops in one batch, then the
    whole strong augmentation with drawn parameters. cpu-fma: the C++ code built to fuse every multiply-add it can
    into an FMA, as Triton does on CUDA, so that what CUDA would see is checked here too."""
    contract = device == "cpu-fma"
    if contract:
        if not _compilers_contract():
            pytest.skip("inductor's C++ code does not fuse multiply-adds on this machine (no FMA, or no such "
                        "setting in this torch)")
        device = "cpu"
    torch.compiler.reset()
    n = len(images)
    ops, magnitudes = [], []
    for k, name in enumerate(A.OPS):
        low, high = A.MAGNITUDE_RANGES[name]
        random = low + (high - low) * torch.rand(n, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        magnitudes.append(torch.cat([torch.linspace(low, high, 7, dtype=torch.float64).repeat_interleave(n), random]))
        ops.append(torch.full((8 * n,), k))
    x = to_tensor(np.tile(images, (8 * len(A.OPS), 1, 1, 1)))
    op_index, magnitude = torch.cat(ops), torch.cat(magnitudes)
    strong = x[:4 * n]
    params = A.sample_strong_params(len(strong), 32, 32, torch.Generator().manual_seed(8))
    on_device = type(params)(*(type(p)(*(t.to(device) for t in p)) for p in params))
    fma = torch._inductor.config.patch({"cpp.enable_floating_point_contract_flag": "fast"}) if contract else \
        contextlib.nullcontext()
    with fma:
        compiled = torch.compile(A.apply_op, dynamic=False, fullgraph=True)
        got = compiled(x.to(device), op_index.to(device), magnitude.to(device)).cpu()
        got_strong = torch.compile(A.apply_strong, dynamic=False, fullgraph=True)(strong.to(device), on_device).cpu()
    for compiled_pixels, eager_pixels in ((got, A.apply_op(x, op_index, magnitude)),
                                          (got_strong, A.apply_strong(strong, params))):
        differ = compiled_pixels != eager_pixels
        assert not differ.any(), f"{int(differ.sum())} values differ in {int(differ.any(3).any(2).any(1).sum())} images"
    torch.compiler.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(images):
    """Same arithmetic on the GPU: each op bit-identical to the CPU result; strong_augment runs with a CUDA
    generator and stays on the device."""
    x = to_tensor(np.tile(images, (4, 1, 1, 1)))
    n = len(x)
    p = A.sample_randaugment_params(n, torch.Generator().manual_seed(9))
    for slot in range(A.RA_NUM_OPS):
        cpu = A.apply_op(x, p.op_index[:, slot], p.magnitude[:, slot])
        gpu = A.apply_op(x.cuda(), p.op_index[:, slot].cuda(), p.magnitude[:, slot].cuda())
        assert torch.equal(gpu.cpu(), cpu)
    out = A.strong_augment(x.cuda(), torch.Generator(device="cuda").manual_seed(0))
    assert out.is_cuda and out.dtype == torch.uint8 and out.shape == x.shape
