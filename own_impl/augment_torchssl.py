"""TorchSSL's FixMatch strong augmentation (the `torchssl` recipe), batched on uint8 tensors, no per-image loop.

What TorchSSL does to the strong view of an unlabelled CIFAR-10 image, in order (files are TorchSSL's at the pinned
commit; ra = datasets/augmentation/randaugment.py):

| # | TorchSSL                                                                          | where                        |
|---|-----------------------------------------------------------------------------------|------------------------------|
| 0 | strong = deepcopy(weak transform) with RandAugment(3, 5) inserted at index 0, so  | datasets/dataset.py,         |
|   | RandAugment, its Cutout included, runs BEFORE the flip and crop                   | BasicDataset.__init__        |
| 1 | ops = random.choices(augment_list(), k=3): 3 of 14 WITH replacement, in           | ra, RandAugment.__call__     |
|   | augment_list's order (TORCHSSL_AUGMENT_LIST here; not the order of OPS)           |                              |
| 2 | every drawn op applied (no coin flip), at val = min + (max - min) * U[0, 1) in    | ra, RandAugment.__call__     |
|   | its augment_list range; the 5 (m) is unused                                       |                              |
| 3 | Cutout(img, v = U[0, 1) * 0.5): unchanged if v <= 0, else side v * W px           | ra, Cutout                   |
| 4 | x0 = np.random.uniform(W), y0 = np.random.uniform(H): W is numpy's `low` and      | ra, CutoutAbs                |
|   | `high` stays 1.0, so x0 = W + (1 - W) U lies in (1, W], not in [0, W)             |                              |
| 5 | x0 = int(max(0, x0 - v/2)), x1 = min(W, x0 + v), the same for y;                  | ra, CutoutAbs                |
|   | ImageDraw.rectangle((x0, y0, x1, y1), fill=(125, 123, 114))                       |                              |
| 6 | RandomHorizontalFlip() (p = 0.5)                                                  | datasets/ssl_dataset.py,     |
| 7 | RandomCrop(32, padding=4, padding_mode='reflect')                                 | get_transform(train=True)    |
| 8 | ToTensor, Normalize(CIFAR-10 mean, std)                                           | get_transform(train=True)    |

Here: steps 1-2 are TorchSSLRandAugmentParams and own_impl.augment.apply_op; 3-5 TorchSSLCutoutParams and
torchssl_cutout; 6-7 own_impl.augment's WeakParams and flip_and_shift; 8 is own_impl.train.normalize's.

PIL's rectangle (Pillow's _draw_rectangle and ImagingDrawRectangle; checked on the installed Pillow) casts each
coordinate to int, i.e. truncates, and fills rows y0..int(y1) and columns x0..int(x1), both ends INCLUDED, clipped
to the image: a cutout of side 5.5 at x0 = 8 fills columns 8..13 (6 px); any v > 0 fills at least one pixel, and
x0 = W fills none. Here the same float64 operations as Python's (IEEE, each rounded once; the halving is exact) give
the same pixels for every input.

How it differs from the paper recipe (own_impl.augment): RandAugment runs on the unflipped, uncropped image and the
flip and crop come last; 3 ops instead of 2, each always applied instead of with p = 0.5; the magnitude ranges are
the same for every op that has one (augment_list gives (0, 1) to Identity, AutoContrast and Equalize, which ignore
it); Cutout's side is U[0, 16) px instead of 16 px, its corner skews towards the bottom right (step 4), its right and
bottom edges are inclusive, it may fall outside the image entirely, and its fill is the CIFAR-10 mean
(125, 123, 114) instead of gray 127.

Each op is own_impl.augment.apply_op, equal to PIL pixel for pixel. All random numbers come from `generator`, drawn
by sample_torchssl_strong_params in one documented order; apply_torchssl_strong draws none, so it can be compiled
as one graph.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from own_impl.augment import OP_INDEX, WeakParams, apply_op, flip_and_shift, sample_weak_params

# TorchSSL's augment_list(), in its order, with its (min, max) magnitude ranges.
TORCHSSL_AUGMENT_LIST = (
    ("AutoContrast", 0, 1), ("Brightness", 0.05, 0.95), ("Color", 0.05, 0.95), ("Contrast", 0.05, 0.95),
    ("Equalize", 0, 1), ("Identity", 0, 1), ("Posterize", 4, 8), ("Rotate", -30, 30), ("Sharpness", 0.05, 0.95),
    ("ShearX", -0.3, 0.3), ("ShearY", -0.3, 0.3), ("Solarize", 0, 256), ("TranslateX", -0.3, 0.3),
    ("TranslateY", -0.3, 0.3),
)
TORCHSSL_NUM_OPS = 3                   # RandAugment(3, 5): n = 3 ops per image, every one applied
CUTOUT_MAX_FRACTION = 0.5              # v = U[0, 1) * 0.5 of the width: side in [0, 16) px at W = 32
CUTOUT_FILL = (125, 123, 114)          # RGB, CutoutAbs's colour (the CIFAR-10 mean, rounded)
NUMPY_UNIFORM_HIGH = 1.0               # np.random.uniform's default `high`, which CutoutAbs leaves in place


class TorchSSLRandAugmentParams(NamedTuple):
    op_index: torch.Tensor   # (N, TORCHSSL_NUM_OPS) int64 into own_impl.augment.OPS, applied in slot order
    magnitude: torch.Tensor  # (N, TORCHSSL_NUM_OPS) float64, min + (max - min) * U in TorchSSL's range


class TorchSSLCutoutParams(NamedTuple):
    side: torch.Tensor  # (N,) float64 px, v * W with v = U * 0.5; 0 means no cutout
    x0: torch.Tensor    # (N,) float64, np.random.uniform(W) = W + (1 - W) U, in (1, W]
    y0: torch.Tensor    # (N,) float64, np.random.uniform(H) = H + (1 - H) U, in (1, H]


class TorchSSLStrongParams(NamedTuple):
    randaugment: TorchSSLRandAugmentParams
    cutout: TorchSSLCutoutParams
    weak: WeakParams


# ---------------------------------------------------------------- sampling

def sample_torchssl_strong_params(n: int, height: int, width: int, generator: torch.Generator | None = None,
                                  device="cpu") -> TorchSSLStrongParams:
    """All of apply_torchssl_strong's random numbers, drawn from `generator` in this order, as TorchSSL draws them:
    1. ops: randint(0, 14, (n, 3)) into TORCHSSL_AUGMENT_LIST (as random.choices indexes augment_list);
    2. magnitudes: rand(n, 3) float64, one U per slot;
    3. cutout size: rand(n) float64;
    4. cutout corner: rand(2, n) float64, row 0 for x0, row 1 for y0;
    5. weak: own_impl.augment.sample_weak_params (flip: rand(n); shifts: randint(-4, 5, (2, n)) for dy, dx)."""
    to_ops, ranges = _torchssl_tables(torch.device(device))
    k = torch.randint(0, len(TORCHSSL_AUGMENT_LIST), (n, TORCHSSL_NUM_OPS), generator=generator, device=device)
    u = torch.rand(n, TORCHSSL_NUM_OPS, generator=generator, device=device, dtype=torch.float64)
    low, high = ranges[k, 0], ranges[k, 1]
    randaugment = TorchSSLRandAugmentParams(to_ops[k], low + (high - low) * u)
    size_u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    corner_u = torch.rand(2, n, generator=generator, device=device, dtype=torch.float64)
    cutout = TorchSSLCutoutParams(size_u * CUTOUT_MAX_FRACTION * width, numpy_uniform(width, corner_u[0]),
                                  numpy_uniform(height, corner_u[1]))
    return TorchSSLStrongParams(randaugment, cutout, sample_weak_params(n, generator, device))


def numpy_uniform(low: float, u: torch.Tensor, high: float = NUMPY_UNIFORM_HIGH) -> torch.Tensor:
    """What np.random.uniform(low, high) returns for the standard uniform double u: low + (high - low) * u, the
    arithmetic of numpy's random_uniform, two float64 roundings as there (numpy does not require low < high)."""
    return low + (high - low) * u


@functools.cache
def _torchssl_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(14,) int64 TorchSSL's op k -> index into OPS, and (14, 2) float64 its (min, max); made once per device."""
    to_ops = torch.tensor([OP_INDEX[name] for name, _, _ in TORCHSSL_AUGMENT_LIST], device=device)
    ranges = torch.tensor([(low, high) for _, low, high in TORCHSSL_AUGMENT_LIST], dtype=torch.float64,
                          device=device)
    return to_ops, ranges


# ---------------------------------------------------------------- applying

def torchssl_strong_augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x: (N, 3, H, W) uint8 on any device -> TorchSSL's strong view, (N, 3, H, W) uint8, same device."""
    n, _, h, w = x.shape
    return apply_torchssl_strong(x, sample_torchssl_strong_params(n, h, w, generator, x.device))


def apply_torchssl_strong(x: torch.Tensor, p: TorchSSLStrongParams) -> torch.Tensor:
    """RandAugment's 3 ops, its Cutout, then flip and crop, with drawn parameters: no random numbers here."""
    return flip_and_shift(torchssl_cutout(torchssl_randaugment(x, p.randaugment), p.cutout), p.weak)


def torchssl_randaugment(x: torch.Tensor, p: TorchSSLRandAugmentParams) -> torch.Tensor:
    """Slot 0 on every image, then slot 1, then slot 2; no image skips a slot."""
    for slot in range(p.op_index.shape[1]):
        x = apply_op(x, p.op_index[:, slot], p.magnitude[:, slot])
    return x


def torchssl_cutout(x: torch.Tensor, p: TorchSSLCutoutParams) -> torch.Tensor:
    """CutoutAbs with drawn parameters: rows top..bottom and columns left..right, both ends included, set to
    CUTOUT_FILL where side > 0. x: (N, 3, H, W) uint8."""
    _, _, h, w = x.shape
    in_rows = _filled_span(p.y0, p.side, h)                                # (N, H)
    in_cols = _filled_span(p.x0, p.side, w)                                # (N, W)
    mask = in_rows[:, :, None] & in_cols[:, None, :] & (p.side > 0)[:, None, None]   # (N, H, W)
    # One masked_fill per channel: a fill tensor would be a host-to-device copy on every call.
    return torch.stack([x[:, c].masked_fill(mask, value) for c, value in enumerate(CUTOUT_FILL)], 1)


def _filled_span(corner: torch.Tensor, side: torch.Tensor, size: int) -> torch.Tensor:
    """(N, size) bool: the pixels along one axis that CutoutAbs's rectangle fills. corner, side: (N,) float64."""
    start = (corner - side / 2).clamp(min=0).floor()     # int(max(0, x0 - v / 2.)): non-negative, so int() is floor
    end = (start + side).clamp(max=size).floor()         # int(min(W, x0 + v)), PIL's int cast of the float corner
    pixels = torch.arange(size, device=corner.device, dtype=torch.float64)
    return (pixels >= start[:, None]) & (pixels <= end[:, None])
