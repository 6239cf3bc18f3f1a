"""Tests of own_impl.ctaugment: every op against the per-image port of the official PIL ops (tests/ctaugment_ref.py) on
real CIFAR-10 images at every bin, the blends and filters against PIL itself, the rate rules against values worked out
by hand and against the port of the official bookkeeping, the policy distributions within statistical bounds, and
determinism, state and devices.

Tolerance: exact equality everywhere (pixels, float32 rates), except the proximity's float32 sum of 10 terms, whose
order NumPy and torch may choose differently (one float32 ulp).
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from own_impl import augment as A
from own_impl import ctaugment as C

import augment_ref
import ctaugment_ref as R
from conftest import archive_images, assert_same_images, to_numpy, to_tensor

pytestmark = pytest.mark.usefixtures("one_thread")

PER_CLASS = 2   # real images per class: 20 in all


@pytest.fixture(scope="module")
def real_images(shared_archive) -> np.ndarray:
    return archive_images(shared_archive, PER_CLASS)


@pytest.fixture(scope="module")
def images(real_images) -> np.ndarray:
    """Real images, then two that reach AutoContrast's and Equalize's special branches (one level; two levels)."""
    constant = np.full((1, 32, 32, 3), 77, np.uint8)
    two_levels = np.where(np.indices((32, 32)).sum(0) % 3 == 0, 40, 200).astype(np.uint8)
    return np.concatenate([real_images, constant, np.repeat(two_levels[None, :, :, None], 3, 3)])


def reference(batch: np.ndarray, policy: C.CTAPolicy) -> np.ndarray:
    """The official ops, image by image and slot by slot, at the policy's levels and cutout centres."""
    out = []
    for i, img in enumerate(batch):
        pil = Image.fromarray(img)
        for d in range(policy.op_index.shape[1]):
            name = C.OPS[policy.op_index[i, d]]
            at = (int(policy.cutout_cx[i, d]), int(policy.cutout_cy[i, d]))
            pil = R.apply_op(pil, name, policy.level[i, d].tolist(), at)
        out.append(np.asarray(pil))
    return np.stack(out)


def one_op_policy(name: str, levels: torch.Tensor, seed: int = 0) -> C.CTAPolicy:
    """A depth-1 policy: op `name` at levels (N, MAX_PARAMS) float64, cutout centres random."""
    n = len(levels)
    op = torch.full((n, 1), C.OP_INDEX[name])
    level = levels[:, None]
    g = torch.Generator().manual_seed(seed)
    cy, cx = torch.randint(0, 32, (2, n, 1), generator=g)
    credited = (level * C._bin_counts(torch.device("cpu"))[op] * 0.999).long()
    return C.CTAPolicy(op, level, credited, C._op_arguments(op, level, 32, 32), cy, cx)


# ---------------------------------------------------------------- the official table

def test_op_table_is_the_official_one():
    # libml/ctaugment.py:104-219, in registration order; cta/lib/train.py:26-28 for depth, decay and threshold.
    assert C.OPS == ("autocontrast", "blur", "brightness", "color", "contrast", "cutout", "equalize", "invert",
                     "identity", "posterize", "rescale", "rotate", "sharpness", "shear_x", "shear_y", "smooth",
                     "solarize", "translate_x", "translate_y")
    assert C.BINS == R.BINS
    assert [name for name, bins in C.BINS.items() if bins != (17,)] == ["identity", "posterize", "rescale"]
    assert (C.BINS["identity"], C.BINS["posterize"], C.BINS["rescale"]) == ((), (8,), (17, 6))
    assert (C.DEPTH, C.DECAY, C.THRESHOLD, C.CUTOUT_FILL) == (2, 0.99, 0.80, 127)
    cta = C.CTAugment()
    assert cta.rate_table() == {name: [[1.0] * n for n in bins] for name, bins in R.BINS.items()}
    assert cta.rates.dtype == torch.float32 and cta.rates.shape == (19, 2, 17)


# ---------------------------------------------------------------- every op against the official PIL code

def bin_levels(n_bins: int, rng: np.random.Generator, extra: int) -> np.ndarray:
    """Start, middle and end of every bin, levels that are tiny or 1, and `extra` uniform ones."""
    grid = [(b + r) / n_bins for b in range(n_bins) for r in (0.0, 0.5, 1 - 1e-9)]
    special = [1e-9, 3e-8, 2.0 ** -17, 1e-4, 0.25, 0.75, 1.0]   # rotate: (2 level - 1) 45 = -22.5, 22.5 (ties)
    return np.array(grid + special + list(rng.random(extra)))


@pytest.mark.parametrize("name", C.OPS)
def test_op_matches_the_official_op_at_every_bin(images, name):
    """Each op on real images, at the start, middle and end of each of its bins and at random levels, each image
    of the batch with its own level: pixel for pixel the official PIL op."""
    rng = np.random.default_rng(C.OP_INDEX[name])
    if name == "rescale":   # every (scale bin, method bin) pair, crops whose box lands on k + 0.5, random pairs
        scale = np.concatenate([bin_levels(17, rng, 0), (np.arange(8) + 0.5) / 8])   # round half to even
        pairs = [(s, (m + rng.random()) / 6) for s in scale for m in range(6)] + list(rng.random((40, 2)))
        levels = torch.tensor(np.array(pairs), dtype=torch.float64)
    else:
        first = bin_levels(C.BINS[name][0], rng, 20) if C.BINS[name] else np.zeros(len(images))
        levels = torch.zeros(len(first), C.MAX_PARAMS, dtype=torch.float64)
        levels[:, 0] = torch.from_numpy(first)
    batch = images[np.arange(len(levels)) % len(images)]
    policy = one_op_policy(name, levels)
    got = to_numpy(C.apply_policy(to_tensor(batch), policy))
    assert_same_images(got, reference(batch, policy), name)


def test_mixed_policies_in_one_batch_match_the_official_ops(images):
    """Training and probe draws, two slots, a different op per image and slot: the per-image selection is right."""
    cta = C.CTAugment()
    g = torch.Generator().manual_seed(1)
    batch = np.tile(images, (3, 1, 1, 1))
    for probe in (False, True):
        policy = cta.draw(len(batch), 32, 32, g, probe=probe)
        got = to_numpy(C.apply_policy(to_tensor(batch), policy))
        assert_same_images(got, reference(batch, policy), f"policy probe={probe}")


def test_strong_view_is_weak_then_policy_then_cutout(real_images):
    """apply_strong == the official order run per image: flip-and-shift, the CTA ops, the cutout op at level 1."""
    cta = C.CTAugment()
    params = C.sample_strong_params(cta, len(real_images), 32, 32, torch.Generator().manual_seed(2))
    got = to_numpy(C.apply_strong(to_tensor(real_images), params))
    weak = params.weak
    shifted = np.stack([augment_ref.flip_and_shift(img, bool(weak.flip[i]), int(weak.dy[i]), int(weak.dx[i]))
                        for i, img in enumerate(real_images)])
    want = [R.cutout(Image.fromarray(img), 1.0, int(params.cutout.cx[i]), int(params.cutout.cy[i]))
            for i, img in enumerate(reference(shifted, params.policy))]
    assert_same_images(got, np.stack([np.asarray(img) for img in want]), "apply_strong")


# ---------------------------------------------------------------- the new primitives against PIL and by hand

def _adversarial_alphas() -> np.ndarray:
    """float32 alphas next to where alpha * (in2 - in1) is exactly half the float32 gap below in1: where the blend
    of in1 with a darker in2 flips between in1 and in1 - 1. Also 2^-27 (the tiny-alpha cut) and its neighbours."""
    found = []
    for in1 in (255, 129, 3):
        e = int(np.floor(np.log2(in1)))
        half_gap = (2.0 ** (e - 23) if in1 != 2 ** e else 2.0 ** (e - 24)) / 2
        for d in (1, 2, 3, in1 // 2, in1):
            a = np.float32(half_gap / d)
            found += [np.nextafter(a, np.float32(0)), a, np.nextafter(a, np.float32(1))]
    cut = np.float32(2.0 ** -27)
    found += [np.nextafter(cut, np.float32(0)), cut, np.nextafter(cut, np.float32(1))]
    return np.array(found, np.float32)


def test_level_blend_is_pils_for_every_pair_of_levels_even_at_tiny_alphas():
    """Image.blend(im1, im2, alpha) for all 65,536 (im1, im2) pairs, against PIL itself, at alphas a CTA level can
    take, tiny ones included: a level below 2^-17 still changes pixels (in1 - tiny truncates to in1 - 1), and
    augment._pil_blend, exact above 2^-17, gets some of these wrong."""
    im1 = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 256, 1)
    im2 = im1.T.copy()
    t1, t2 = torch.from_numpy(im1), torch.from_numpy(im2)
    rng = np.random.default_rng(0)
    alphas = np.concatenate([_adversarial_alphas(), [0.0, 1.0, 1e-9, 1e-6, 2.0 ** -17, 0.5],
                             rng.random(10)]).astype(np.float32)
    narrow_differs = tiny_changes = 0
    for alpha in alphas:
        pil = np.asarray(Image.blend(Image.fromarray(im1, "L"), Image.fromarray(im2, "L"), float(alpha)))
        got = C._blend_any_level(t1, t2, torch.tensor(float(alpha), dtype=torch.float64)).numpy()
        assert np.array_equal(got, pil), float(alpha)
        narrow_differs += int((A._pil_blend(t1, t2, torch.tensor(alpha)).numpy() != pil).sum())
        tiny_changes += int(alpha < 2.0 ** -17 and (pil != im1).any())
    assert narrow_differs > 0 and tiny_changes > 0


def test_blur_and_smooth_filters_are_pils(real_images):
    """The filtered images themselves (level-blend targets), on real images and on sizes at and below the kernel."""
    for img in list(real_images[:4]) + [real_images[0, :5, :7], real_images[0, :4, :4], real_images[0, :2, :9]]:
        x = to_tensor(img[None])
        for filt, ours in ((ImageFilter.BLUR, C._blur), (ImageFilter.SMOOTH, A._smooth)):
            want = np.asarray(Image.fromarray(img).filter(filt))
            assert np.array_equal(to_numpy(ours(x).to(torch.uint8))[0], want), (filt, img.shape)


def test_blur_by_hand():
    """One 160 pixel on black, 9x9: BLUR's ring (16 ones / 16, centre 3x3 zero) puts round(160 / 16) = 10 on the
    pixels 2 away (Chebyshev), 0 on the dot itself; the 2-pixel border is copied. Level 0.5 blends: 5 and 80."""
    dot = torch.zeros(1, 3, 9, 9, dtype=torch.uint8)
    dot[:, :, 4, 4] = 160
    rows, cols = np.indices((9, 9))
    ring = (np.maximum(abs(rows - 4), abs(cols - 4)) == 2) & (rows >= 2) & (rows < 7) & (cols >= 2) & (cols < 7)
    want = torch.from_numpy(ring * 5).to(torch.uint8)
    want[4, 4] = 80
    policy = one_op_policy("blur", torch.tensor([[0.5, 0.0]], dtype=torch.float64))
    out = C.apply_policy(dot, policy)
    assert torch.equal(out[0, 1], want) and torch.equal(out[0, 0], out[0, 2])


def test_rescale_at_the_largest_crop_doubles_pixels_by_hand():
    """Scale level 1: crop [8, 24) of 32, resized x2. NEAREST reads source floor((x + 0.5) / 2) + 8; BOX's support
    at x2 covers one source pixel: both double every pixel of the centre crop. Level 0: no crop, no change."""
    x = (torch.arange(32 * 32).reshape(1, 1, 32, 32) % 251).to(torch.uint8).repeat(2, 3, 1, 1)
    doubled = x[..., 8:24, 8:24].repeat_interleave(2, 2).repeat_interleave(2, 3)
    for method in ("nearest", "box"):
        m = C.RESCALE_METHODS.index(method)
        levels = torch.tensor([[1.0, (m + 0.5) / 6], [0.0, (m + 0.5) / 6]], dtype=torch.float64)
        out = C.apply_policy(x, one_op_policy("rescale", levels))
        assert torch.equal(out[0], doubled[0]) and torch.equal(out[1], x[1]), method


def test_translations_never_move_a_pixel(real_images):
    """The official translate is (2 level - 1) * 0.3 PIXELS; PIL's nearest source column floor(x + 0.5 + delta) is
    x for |delta| <= 0.3. So both ops are the identity at every level (and so is the official code)."""
    x = to_tensor(real_images)
    for name in ("translate_x", "translate_y"):
        levels = torch.zeros(len(x), 2, dtype=torch.float64)
        levels[:, 0] = torch.linspace(0, 1, len(x), dtype=torch.float64)
        assert torch.equal(C.apply_policy(x, one_op_policy(name, levels)), x)


def test_cutout_op_sides_by_hand():
    """side = 1 + int(level * 32 * 0.499): level 1 -> 16 (the final Cutout), 0.5 -> 8, 0 -> 1 (half 0: empty)."""
    x = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
    levels = torch.tensor([[1.0, 0], [0.5, 0], [0.0, 0]], dtype=torch.float64)
    policy = one_op_policy("cutout", levels)._replace(cutout_cy=torch.tensor([[16], [0], [5]]),
                                                        cutout_cx=torch.tensor([[20], [31], [5]]))
    out = C.apply_policy(x, policy)
    want = torch.zeros_like(x)
    want[0, :, 8:24, 12:28] = 127
    want[1, :, 0:4, 27:32] = 127    # rows [-4, 4) and columns [27, 35), clipped
    assert torch.equal(out, want)
    p = A.CutoutParams(torch.tensor([16, 0, 5]), torch.tensor([20, 31, 5]))
    assert torch.equal(C.final_cutout(x, p)[0], want[0])


def test_op_arguments_by_hand():
    """The level -> argument maps of libml/ctaugment.py, at a few levels worked out by hand."""
    cases = {  # op: [(level, argument)]
        "brightness": [(0.0, 0.1), (0.5, 1.05)], "posterize": [(0.0, 1), (0.99, 8), (0.5, 4)],
        "rotate": [(0.0, -45), (0.5, 0), (1.0, 45), (0.75, 22), (0.25, -22)],  # 22.5: half to even
        "shear_x": [(0.0, -0.3), (1.0, 0.3)], "solarize": [(0.0, 0), (0.5, 127), (0.99999, 255)],
        "cutout": [(0.0, 1), (1.0, 16)], "rescale": [(1.0, 0.25)], "blur": [(0.3, 0.3)],
    }
    for name, pairs in cases.items():
        op = torch.full((len(pairs), 1), C.OP_INDEX[name])
        level = torch.tensor([[[v, 0.0]] for v, _ in pairs], dtype=torch.float64)
        got = C._op_arguments(op, level, 32, 32)[:, 0, 0]
        assert got.tolist() == pytest.approx([a for _, a in pairs], abs=1e-12), name
    methods = torch.tensor([[[0.0, m]] for m in (0.0, 0.16, 0.17, 0.99)], dtype=torch.float64)
    got = C._op_arguments(torch.full((4, 1), C.OP_INDEX["rescale"]), methods, 32, 32)[:, 0, 1]
    assert got.tolist() == [0, 0, 1, 5]   # int(m * 5.99): 0.16 * 5.99 = 0.958, 0.17 * 5.99 = 1.018


# ---------------------------------------------------------------- rates: probabilities and update

def test_probabilities_are_the_official_rate_to_p():
    """By hand for one parameter, then equal (float32 bits) to the official rate_to_p on rates near the threshold."""
    cta = C.CTAugment()
    rot = C.OP_INDEX["rotate"]
    cta.rates[rot, 0] = torch.tensor([1.0, 0.5, 0.9, 0.79, 0.8] + [0.0] * 12)
    p = cta.probabilities()[rot, 0]
    # (r + 0.01) / 1.01: 1.0 -> 1, 0.9 -> 0.901, 0.8 -> 0.802 (kept), 0.79 -> 0.792 < 0.8 (dropped)
    assert p[:5].tolist() == pytest.approx([1.0, 0.0, 0.91 / 1.01, 0.0, 0.81 / 1.01], rel=1e-6)
    assert p[5:].eq(0).all()
    # On the threshold: fl32(0.79f + 0.01f) is 0.8f exactly, which `p < 0.8f` keeps; the float32 below it is dropped.
    edge = np.float32(0.79)
    cta.rates[rot, 0, :3] = torch.tensor([0.99, edge, np.nextafter(edge, np.float32(0))])
    assert cta.probabilities()[rot, 0, :3].tolist() == [1.0, np.float32(0.8), 0.0]
    rng = np.random.default_rng(0)
    rates = rng.choice([1.0, 0.79, 0.798, 0.7979, 0.8, 0.5, 0.1], (19, 2, 17)).astype(np.float32)
    rates += rng.normal(0, 1e-4, rates.shape).astype(np.float32)
    cta.rates = torch.from_numpy(rates) * cta.valid
    got = cta.probabilities().numpy()
    for k, name in enumerate(C.OPS):
        for i, n in enumerate(C.BINS[name]):
            want = R.rate_to_p(rates[k, i, :n].copy(), 0.99, 0.8)
            assert np.array_equal(got[k, i, :n], want), name
    assert not got[~cta.valid.numpy()].any()                                # padding and identity: 0


def test_update_by_hand():
    """rate = rate * 0.99 + proximity * 0.01 in float64, stored as float32, once per hit, in image order."""
    cta = C.CTAugment()
    rot, res, ide = C.OP_INDEX["rotate"], C.OP_INDEX["rescale"], C.OP_INDEX["identity"]
    op = torch.tensor([[rot, res], [ide, rot]])
    # rotate level 0.5 -> bin int(0.5 * 17 * 0.999) = 8; rescale (0, 0.99) -> bins 0 and int(0.99 * 6 * 0.999) = 5
    level = torch.tensor([[[0.5, 0.0], [0.0, 0.99]], [[0.0, 0.0], [0.5, 0.0]]], dtype=torch.float64)
    policy = C.CTAPolicy(op, level, (level * C._bin_counts(torch.device("cpu"))[op] * 0.999).long(),
                         torch.zeros_like(level), torch.zeros_like(op), torch.zeros_like(op))
    assert policy.bin.tolist() == [[[8, 0], [0, 5]], [[0, 0], [8, 0]]]
    cta.update_rates(policy, torch.tensor([0.5, 0.2], dtype=torch.float64))
    first = np.float32(1.0 * 0.99 + 0.5 * (1 - 0.99))                      # 0.995
    second = np.float32(float(first) * 0.99 + 0.2 * (1 - 0.99))            # 0.98705, from the stored float32
    table = cta.rate_table()
    assert table["rotate"][0][8] == second and table["rotate"][0][:8] == [1.0] * 8
    assert table["rescale"][0][0] == first and table["rescale"][1][5] == first
    changed = (cta.rates != C.CTAugment().rates).sum().item()
    assert changed == 3                                                     # identity and padding untouched


def test_update_is_the_official_sequence_when_images_share_bins():
    """64 probe draws folded onto 3 ops, so bins are hit many times in one batch: equal, bit for bit, to the
    official per-image loop; a closed form rounding once per bin (what a vectorised update would do) is not."""
    cta = C.CTAugment()
    g = torch.Generator().manual_seed(3)
    policy = cta.draw(64, 32, 32, g, probe=True)
    few = torch.tensor([C.OP_INDEX[k] for k in ("posterize", "rescale", "identity")])
    op = few[policy.op_index % 3]
    has = C._bin_counts(torch.device("cpu"))[op] > 0
    level = torch.where(has, policy.level, 0.0)
    credited = torch.where(has, (level * C._bin_counts(torch.device("cpu"))[op] * 0.999).long(), 0)
    policy = policy._replace(op_index=op, level=level, bin=credited)
    prox = torch.rand(64, generator=g, dtype=torch.float64)
    for _ in range(3):                       # three steps, so rates below 1 are updated again
        cta.update_rates(policy, prox)
    rates = {name: tuple(np.ones(n, np.float32) for n in bins) for name, bins in R.BINS.items()}
    for _ in range(3):
        for i in range(64):
            official = [(C.OPS[op[i, d]], level[i, d, :len(R.BINS[C.OPS[op[i, d]]])].tolist()) for d in range(2)]
            R.update_rates(rates, official, prox[i].item(), 0.99)
    assert cta.rate_table() == {name: [r.tolist() for r in rs] for name, rs in rates.items()}
    # the same hits with one rounding per bin: sum over hits of prox * 0.01 * 0.99^(later hits), from 1 * 0.99^hits
    hits = {}
    for _ in range(3):
        for i in range(64):
            for d in range(2):
                for p in range(int(has[i, d].sum())):
                    hits.setdefault((int(op[i, d]), p, int(credited[i, d, p])), []).append(prox[i].item())
    closed = {key: np.float32(0.99 ** len(v) + sum(x * 0.01 * 0.99 ** (len(v) - 1 - j) for j, x in enumerate(v)))
              for key, v in hits.items()}
    assert max(len(v) for v in hits.values()) >= 10
    assert any(cta.rates[key].item() != value for key, value in closed.items())


def test_proximity_is_the_official_one_and_equals_the_label_probability():
    # by hand: softmax (0.7, 0.2, 0.1), label 0: 1 - 0.5 (0.3 + 0.2 + 0.1) = 0.7 = p[label]
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1]]))
    assert C.proximity(logits, torch.tensor([0, 2])).tolist() == pytest.approx([0.7, 0.1], abs=1e-7)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(32, 10, generator=g) * 3
    labels = torch.randint(0, 10, (32,), generator=g)
    got = C.proximity(logits, labels)
    assert got.dtype == torch.float64 and got.shape == (32,)
    probs = torch.softmax(logits, 1).numpy()
    want = np.array([R.proximity(probs[i], int(labels[i])) for i in range(32)])
    assert np.abs(got.numpy() - want).max() <= 2 ** -23                   # one float32 ulp of the sum, halved
    assert np.abs(got.numpy() - probs[np.arange(32), labels.numpy()]).max() < 1e-6


# ---------------------------------------------------------------- policy distributions

CHI2_1E6 = {2: 27.6, 5: 35.9, 7: 39.9, 16: 55.9, 18: 59.6, 31: 83.6}   # chi-square quantile 1 - 1e-6 by dof


def chi_square(counts: np.ndarray, expected: np.ndarray) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


def test_probe_draws_uniform_ops_and_levels_and_the_official_credited_bins():
    """Ops uniform over 19 per slot, levels uniform on [0, 1); credited bin int(level n 0.999): bins 0..n-2 have
    probability 1 / (0.999 n) each, the last bin the remaining 1 - (n - 1) / (0.999 n) (for n = 17, 0.0579)."""
    n = 60_000
    p = C.CTAugment().draw(n, 32, 32, torch.Generator().manual_seed(5), probe=True)
    assert p.op_index.shape == (n, 2) and p.level.shape == p.bin.shape == p.arg.shape == (n, 2, 2)
    for slot in range(2):
        counts = np.bincount(p.op_index[:, slot].numpy(), minlength=19)
        assert chi_square(counts, np.full(19, n / 19)) < CHI2_1E6[18]
    for name, param, n_bins in (("rotate", 0, 17), ("posterize", 0, 8), ("rescale", 1, 6)):
        on = p.op_index == C.OP_INDEX[name]
        level, credited = p.level[..., param][on].numpy(), p.bin[..., param][on].numpy()
        assert chi_square(np.bincount((level * 32).astype(int), minlength=32), np.full(32, len(level) / 32)) \
            < CHI2_1E6[31]
        prob = np.full(n_bins, 1 / (0.999 * n_bins))
        prob[-1] = 1 - (n_bins - 1) / (0.999 * n_bins)
        counts = np.bincount(credited, minlength=n_bins)
        assert len(counts) == n_bins and chi_square(counts, prob * len(credited)) < CHI2_1E6[n_bins - 1], name
    n_bins = C._bin_counts(torch.device("cpu"))[p.op_index]
    assert torch.equal(p.bin, torch.where(n_bins > 0, (p.level * n_bins * 0.999).long(), 0))
    assert (p.bin != (p.level * n_bins).long()).sum() > 100              # the 0.999 moves ~1% down a bin
    identity = p.op_index == C.OP_INDEX["identity"]
    assert not p.level[identity].any() and not p.bin[identity].any()
    assert not p.level[..., 1][p.op_index != C.OP_INDEX["rescale"]].any()


def test_training_draws_bins_in_proportion_to_thresholded_rates():
    """Rates set by hand: bins drawn with probability p / sum p, p = (rate + 0.01) / max zeroed below 0.8, and
    the level uniform within the drawn bin."""
    cta = C.CTAugment()
    rot, res = C.OP_INDEX["rotate"], C.OP_INDEX["rescale"]
    cta.rates[rot, 0] = torch.tensor([1.0, 0.5, 0.9, 0.79, 0.8] + [0.3] * 12)
    cta.rates[res, 1, :6] = torch.tensor([0.2, 1.0, 0.2, 0.2, 0.2, 1.0])
    n = 120_000
    p = cta.draw(n, 32, 32, torch.Generator().manual_seed(6))
    for op, param, n_bins, weights in ((rot, 0, 17, [1.0, 0, 0.91 / 1.01, 0, 0.81 / 1.01] + [0] * 12),
                                       (res, 1, 6, [0, 1, 0, 0, 0, 1]),
                                       (C.OP_INDEX["blur"], 0, 17, [1] * 17)):
        level = p.level[..., param][p.op_index == op].numpy()
        drawn = np.floor(level * n_bins).astype(int)                  # the bin the level was drawn in
        counts = np.bincount(drawn, minlength=n_bins)
        weights = np.array(weights, float)
        assert len(counts) == n_bins and not counts[weights == 0].any()
        keep = weights > 0
        expected = weights[keep] / weights.sum() * len(level)
        assert chi_square(counts[keep], expected) < CHI2_1E6.get(keep.sum() - 1, CHI2_1E6[16])
        within = level * n_bins - drawn                                 # uniform on [0, 1) inside the bin
        assert chi_square(np.bincount((within * 8).astype(int), minlength=8), np.full(8, len(level) / 8)) \
            < CHI2_1E6[7]


# ---------------------------------------------------------------- determinism and state

def test_same_seed_same_draws_and_the_generator_advance_is_fixed(real_images):
    fresh, trained = C.CTAugment(), C.CTAugment()
    trained.rates = trained.rates * torch.rand(trained.rates.shape, generator=torch.Generator().manual_seed(0))
    states = []
    for cta, probe in ((fresh, False), (fresh, True), (trained, False), (trained, True)):
        g = torch.Generator().manual_seed(7)
        a = cta.draw(50, 32, 32, g, probe=probe)
        states.append(g.get_state())
        b = cta.draw(50, 32, 32, torch.Generator().manual_seed(7), probe=probe)
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert all(torch.equal(states[0], s) for s in states[1:])   # whatever the rates or the mode
    c = fresh.draw(50, 32, 32, torch.Generator().manual_seed(8))
    assert not torch.equal(a.op_index, c.op_index)
    x = to_tensor(real_images)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    one = C.apply_strong(x, C.sample_strong_params(fresh, len(x), 32, 32, g1))
    two = C.apply_strong(torch.zeros_like(x), C.sample_strong_params(trained, len(x), 32, 32, g2))
    assert torch.equal(g1.get_state(), g2.get_state()) and one.dtype == torch.uint8 and one.shape == two.shape == x.shape
    assert torch.equal(x, to_tensor(real_images))                # input not modified in place


def test_state_dict_round_trip_and_readable_tables():
    cta = C.CTAugment()
    policy = cta.draw(64, 32, 32, torch.Generator().manual_seed(10), probe=True)
    cta.update_rates(policy, torch.linspace(0, 1, 64, dtype=torch.float64))
    buffer = io.BytesIO()
    torch.save(cta.state_dict(), buffer)
    buffer.seek(0)
    loaded = C.CTAugment()
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(loaded.rates, cta.rates) and loaded.rate_table() == cta.rate_table()
    a = cta.draw(32, 32, 32, torch.Generator().manual_seed(11))
    b = loaded.draw(32, 32, 32, torch.Generator().manual_seed(11))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    table = cta.rate_table()
    assert [len(table[name]) for name in C.OPS] == [len(R.BINS[name]) for name in C.OPS]
    assert table["rescale"][1] == cta.rates[C.OP_INDEX["rescale"], 1, :6].tolist()
    # stats() is the official log (libml/ctaugment.py:86-89) of rate_to_p, ops sorted by name
    rates = {name: [np.array(r, np.float32) for r in table[name]] for name in C.OPS}
    want = "\n".join("%-16s    %s" % (k, " / ".join(" ".join("%.2f" % x for x in R.rate_to_p(r, 0.99, 0.8))
                                                   for r in rates[k])) for k in sorted(C.OPS))
    assert cta.stats() == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(images):
    """The same draws, pixels and rates on the GPU as on the CPU (a CUDA generator draws other numbers, so the
    CPU draw is moved there)."""
    cpu, gpu = C.CTAugment(), C.CTAugment(device="cuda")
    x = to_tensor(np.tile(images, (4, 1, 1, 1)))
    policy = cpu.draw(len(x), 32, 32, torch.Generator().manual_seed(12), probe=True)
    on_gpu = C.CTAPolicy(*(t.cuda() for t in policy))
    assert torch.equal(C.apply_policy(x.cuda(), on_gpu).cpu(), C.apply_policy(x, policy))
    prox = torch.rand(len(x), dtype=torch.float64)
    cpu.update_rates(policy, prox)
    gpu.update_rates(on_gpu, prox.cuda())
    assert torch.equal(gpu.rates.cpu(), cpu.rates)
    drawn = gpu.draw(len(x), 32, 32, torch.Generator(device="cuda").manual_seed(0))
    assert drawn.level.is_cuda and C.apply_policy(x.cuda(), drawn).is_cuda
