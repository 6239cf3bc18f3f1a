"""FixMatch's weak and strong augmentations as batched ops on uint8 image tensors, on any device, no per-image loop.

Weak  = random horizontal flip (p=0.5), then a random shift of -4..4 px in x and y (reflect-pad 4, random 32x32 crop).
Strong = weak, then RandAugment in the FixMatch paper's "RA" variant, then Cutout 16x16, always.

RandAugment ("RA", FixMatch paper appendix D; official code: google-research/fixmatch libml/augment.py,
AugmentPoolRAMC): for each image draw 2 ops uniformly WITH replacement from the 14 below; each drawn op is applied with
probability 0.5, at a magnitude drawn uniformly from the op's range, independently per image and per op.

Magnitude of each op: its unit, the range we draw from, and the other conventions found in the reference code.
Our ranges are the paper's Table 12, which TorchSSL (datasets/augmentation/randaugment.py, augment_list) uses
verbatim, so our RA and TorchSSL's draw the same magnitudes; the PIL calls are TorchSSL's too (see
tests/augment_ref.py).

| op           | magnitude m, unit                              | range (paper Table 12) | official TF, l ~ U{1..9} |
|--------------|------------------------------------------------|------------------------|--------------------------|
| Identity     | none                                           | -                      | -                        |
| AutoContrast | none (per channel, PIL ImageOps.autocontrast)  | -                      | -                        |
| Equalize     | none (per channel, PIL ImageOps.equalize)      | -                      | -                        |
| Rotate       | angle, degrees, counter-clockwise              | [-30, 30]              | +-3 l                    |
| Solarize     | threshold in pixel levels: v >= m is inverted  | [0, 256] (T in [0, 1]) | 256 - int(25.6 l)        |
| Color        | PIL ImageEnhance factor (1 = unchanged)        | [0.05, 0.95]           | 0.1 + 0.18 l             |
| Contrast     | PIL ImageEnhance factor                        | [0.05, 0.95]           | 0.1 + 0.18 l             |
| Brightness   | PIL ImageEnhance factor                        | [0.05, 0.95]           | 0.1 + 0.18 l             |
| Sharpness    | PIL ImageEnhance factor                        | [0.05, 0.95]           | 0.1 + 0.18 l             |
| ShearX       | shear: out(x, y) = in(x + m y, y)              | [-0.3, 0.3]            | +-0.03 l                 |
| ShearY       | shear: out(x, y) = in(x, y + m x)              | [-0.3, 0.3]            | +-0.03 l                 |
| TranslateX   | fraction of the width: out(x) = in(x + m W)    | [-0.3, 0.3] (+-9.6 px) | +-l px                   |
| TranslateY   | fraction of the height: out(y) = in(y + m H)   | [-0.3, 0.3] (+-9.6 px) | +-l px                   |
| Posterize    | bits kept = int(m), so 4..7 (8 has p=0)        | [4, 8]                 | 4 - int(0.4 l), so 1..4  |
(The official code's levels come from np.random.randint(1, 10) in AugmentPoolRAMC, signs from a coin flip.)

Other choices, and why:
- Geometric ops resample NEAREST and fill with 0 (black) outside the source: that is what PIL's Image.rotate /
  Image.transform do on RGB images by default, as called by TorchSSL and kekmodel/FixMatch-pytorch. (The official TF
  code works on RGBA and turns alpha=0 pixels into 0 in its [-1, 1] scale, i.e. mid-gray: a known difference.)
  We reproduce PIL's arithmetic bit for bit: rotations and shears go through its 16.16 fixed-point affine path
  (coefficients rounded to 1/65536, source pixel = floor), pure translations through its float64 scale path.
- Cutout: one 16x16 square, centre (cy, cx) uniform over the integer pixel grid, rows [cy-8, cy+8) x cols [cx-8, cx+8)
  clipped at the borders (the official code's create_cutout_mask), filled with gray 127. The official code zeroes
  the square in its [-1, 1] scale, which is mid-gray (127.5); kekmodel fills (127, 127, 127); 0 would be black,
  which no FixMatch reference uses. (TorchSSL fills the CIFAR mean (125, 123, 114) and draws the size in [0, 16].)
- Weak shift: offsets uniform over -4..4 (9 values), as torchvision RandomCrop(32, padding=4) and tf.random_crop.

Exactness under compilers: PIL rounds after every float multiply and add. A compiler may fuse a multiply and the add
after it into one FMA (Triton does by default on CUDA; C++ with -ffp-contract=fast), which skips the product's
rounding and moves a truncated value across an integer now and then. So no float multiply here feeds a float add:
AutoContrast and the blends emulate PIL's float64 and float32 arithmetic in exact integers, letting conversions do
the rounding (see _autocontrast_lut, _pil_blend); Sharpness's smoothing is integer; the geometric coefficients
multiply only by powers of two (for 32x32 images), whose products are exact, fused or not.

Random numbers come from `generator` (which must live on x's device), drawn in a fixed order, so a run is
reproducible from its generator. Every op family runs on the whole batch and is picked per image with torch.where,
so nothing is read back to the host (no GPU sync, no data loader): each RA op slot costs one LUT gather, one blend
and one index gather over the batch, whatever the mix of ops.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

OPS = ("Identity", "AutoContrast", "Equalize", "Rotate", "Solarize", "Color", "Contrast", "Brightness",
       "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Posterize")
OP_INDEX = {name: k for k, name in enumerate(OPS)}
# (low, high) of the uniform magnitude; (0, 0) for ops without one.
MAGNITUDE_RANGES = {
    "Identity": (0.0, 0.0), "AutoContrast": (0.0, 0.0), "Equalize": (0.0, 0.0),
    "Rotate": (-30.0, 30.0), "Solarize": (0.0, 256.0),
    "Color": (0.05, 0.95), "Contrast": (0.05, 0.95), "Brightness": (0.05, 0.95), "Sharpness": (0.05, 0.95),
    "ShearX": (-0.3, 0.3), "ShearY": (-0.3, 0.3), "TranslateX": (-0.3, 0.3), "TranslateY": (-0.3, 0.3),
    "Posterize": (4.0, 8.0),
}
RA_NUM_OPS = 2          # ops drawn per image
RA_OP_PROB = 0.5        # probability that a drawn op is applied
CUTOUT_SIZE = 16        # px, side of the square
CUTOUT_FILL = 127       # gray, see above
GEOMETRIC_FILL = 0      # black, PIL's default fill for RGB transforms
WEAK_SHIFT = 4          # px, reflect padding and largest shift

_LUT_OPS = ("AutoContrast", "Equalize", "Solarize", "Posterize")
_BLEND_OPS = ("Color", "Contrast", "Brightness", "Sharpness")
_GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


class WeakParams(NamedTuple):
    flip: torch.Tensor  # (N,) bool
    dy: torch.Tensor    # (N,) int64 in [-WEAK_SHIFT, WEAK_SHIFT]; out row i = padded-input row i + dy
    dx: torch.Tensor    # (N,) int64 in [-WEAK_SHIFT, WEAK_SHIFT]


class RandAugmentParams(NamedTuple):
    op_index: torch.Tensor   # (N, RA_NUM_OPS) int64 into OPS
    apply: torch.Tensor      # (N, RA_NUM_OPS) bool
    magnitude: torch.Tensor  # (N, RA_NUM_OPS) float64, in MAGNITUDE_RANGES[op]


class CutoutParams(NamedTuple):
    cy: torch.Tensor  # (N,) int64 centre row in [0, H)
    cx: torch.Tensor  # (N,) int64 centre column in [0, W)


class StrongParams(NamedTuple):
    weak: WeakParams
    randaugment: RandAugmentParams
    cutout: CutoutParams


# ---------------------------------------------------------------- sampling

def sample_weak_params(n: int, generator: torch.Generator | None = None, device="cpu") -> WeakParams:
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    shift = torch.randint(-WEAK_SHIFT, WEAK_SHIFT + 1, (2, n), generator=generator, device=device)
    return WeakParams(flip, shift[0], shift[1])


def sample_randaugment_params(n: int, generator: torch.Generator | None = None, device="cpu") -> RandAugmentParams:
    op_index = torch.randint(0, len(OPS), (n, RA_NUM_OPS), generator=generator, device=device)
    apply = torch.rand(n, RA_NUM_OPS, generator=generator, device=device) < RA_OP_PROB
    u = torch.rand(n, RA_NUM_OPS, generator=generator, device=device, dtype=torch.float64)
    ranges = _magnitude_ranges(torch.device(device))
    low, high = ranges[op_index, 0], ranges[op_index, 1]
    return RandAugmentParams(op_index, apply, low + (high - low) * u)


@functools.cache
def _magnitude_ranges(device: torch.device) -> torch.Tensor:
    """(len(OPS), 2) float64 (low, high) on `device`, made once per device: no host-to-device copy per batch."""
    return torch.tensor([MAGNITUDE_RANGES[name] for name in OPS], dtype=torch.float64, device=device)


def sample_cutout_params(n: int, height: int, width: int, generator: torch.Generator | None = None,
                         device="cpu") -> CutoutParams:
    cy = torch.randint(0, height, (n,), generator=generator, device=device)
    cx = torch.randint(0, width, (n,), generator=generator, device=device)
    return CutoutParams(cy, cx)


def sample_strong_params(n: int, height: int, width: int, generator: torch.Generator | None = None,
                         device="cpu") -> StrongParams:
    """All of strong_augment's random numbers, drawn in its order: weak, RandAugment, Cutout."""
    return StrongParams(sample_weak_params(n, generator, device), sample_randaugment_params(n, generator, device),
                        sample_cutout_params(n, height, width, generator, device))


# ---------------------------------------------------------------- public entry points

def weak_augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x: (N, 3, H, W) uint8 on any device. Random horizontal flip (p=0.5) then random translation by up to 4 px in x
    and y (reflect-pad 4, random HxW crop). Returns (N, 3, H, W) uint8, same device."""
    return flip_and_shift(x, sample_weak_params(x.shape[0], generator, x.device))


def strong_augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """weak_augment, then RandAugment (paper's RA variant), then Cutout 16x16 (always). uint8 in, uint8 out."""
    n, _, h, w = x.shape
    return apply_strong(x, sample_strong_params(n, h, w, generator, x.device))


def apply_strong(x: torch.Tensor, p: StrongParams) -> torch.Tensor:
    """The strong augmentation with drawn parameters: no random numbers here, so it can be compiled as one graph."""
    return cutout(randaugment(flip_and_shift(x, p.weak), p.randaugment), p.cutout)


def flip_and_shift(x: torch.Tensor, p: WeakParams) -> torch.Tensor:
    """Flip the images with p.flip, then crop their reflect-padded copies at offset (dy, dx) from the centre."""
    n, _, h, w = x.shape
    rows = _reflect(torch.arange(h, device=x.device) + p.dy[:, None], h)   # (N, H)
    cols = _reflect(torch.arange(w, device=x.device) + p.dx[:, None], w)   # (N, W) in the flipped image
    cols = torch.where(p.flip[:, None], w - 1 - cols, cols)                # back to columns of x
    index = rows[:, :, None] * w + cols[:, None, :]                        # (N, H, W) flat source pixel
    return _gather_pixels(x, index)


def randaugment(x: torch.Tensor, p: RandAugmentParams) -> torch.Tensor:
    """Apply the drawn ops in order: slot 0 on every image, then slot 1."""
    for slot in range(p.op_index.shape[1]):
        x = apply_op(x, p.op_index[:, slot], p.magnitude[:, slot], p.apply[:, slot])
    return x


def cutout(x: torch.Tensor, p: CutoutParams, size: int = CUTOUT_SIZE, fill: int = CUTOUT_FILL) -> torch.Tensor:
    """Set rows [cy - size/2, cy + size/2) x cols [cx - size/2, cx + size/2), clipped to the image, to `fill`."""
    _, _, h, w = x.shape
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= p.cy[:, None] - size // 2) & (rows < p.cy[:, None] + size // 2)   # (N, H)
    in_cols = (cols >= p.cx[:, None] - size // 2) & (cols < p.cx[:, None] + size // 2)   # (N, W)
    return x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], fill)


def apply_op(x: torch.Tensor, op_index: torch.Tensor, magnitude: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """Apply op OPS[op_index[n]] at magnitude[n] to image n where mask[n] (all if None); the others pass unchanged.

    x: (N, 3, H, W) uint8; op_index: (N,) int64; magnitude: (N,) float (float64 keeps PIL's arithmetic exact).
    Each image gets one op, so the LUT, blend and geometric stages below each touch disjoint sets of images."""
    if mask is not None:
        op_index = torch.where(mask, op_index, OP_INDEX["Identity"])
    magnitude = magnitude.to(device=x.device, dtype=torch.float64)
    x = _lut_stage(x, op_index, magnitude)
    x = _blend_stage(x, op_index, magnitude)
    return _geometric_stage(x, op_index, magnitude)


# ---------------------------------------------------------------- the three op families

def _is(op_index: torch.Tensor, names) -> torch.Tensor:
    """(N,) bool: op_index is one of `names`. Comparisons only: a host-made index tensor would sync a GPU."""
    names = (names,) if isinstance(names, str) else names
    hit = op_index == OP_INDEX[names[0]]
    for name in names[1:]:
        hit = hit | (op_index == OP_INDEX[name])
    return hit


def _lut_stage(x: torch.Tensor, op: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """AutoContrast, Equalize, Solarize, Posterize: each a 256-entry lookup table per image and channel."""
    n, c, h, w = x.shape
    pixels = x.reshape(n, c, h * w).long()                                 # (N, C, HW)
    hist = _histogram(pixels)                                              # (N, C, 256)
    levels = torch.arange(256, device=x.device)                            # (256,)
    lut = levels.expand(n, c, 256)

    def pick(name, table):
        return torch.where(_is(op, name)[:, None, None], table, lut)

    lut = pick("AutoContrast", _autocontrast_lut(hist))
    lut = pick("Equalize", _equalize_lut(hist, h * w))
    # ImageOps.solarize: level i < threshold kept, else 255 - i (threshold may be fractional).
    lut = pick("Solarize", torch.where(levels < m[:, None, None], levels, 255 - levels))
    # ImageOps.posterize(img, bits) with bits = max(1, int(m)) as TorchSSL: keep the top `bits` bits.
    dropped_bits = (8 - m.trunc().long().clamp(1, 8))[:, None, None]      # (N, 1, 1)
    lut = pick("Posterize", (levels >> dropped_bits) << dropped_bits)
    out = lut.gather(2, pixels).to(torch.uint8).reshape(n, c, h, w)
    return torch.where(_is(op, _LUT_OPS)[:, None, None, None], out, x)


def _histogram(pixels: torch.Tensor) -> torch.Tensor:
    """(N, C, P) int64 levels -> (N, C, 256) int64 counts."""
    n, c, p = pixels.shape
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=pixels.device)
    # scatter_add rather than bincount, which reads its input's max back to the host on CUDA.
    ones = torch.ones(1, 1, dtype=torch.long, device=pixels.device).expand(n * c, p)
    hist.scatter_add_(1, pixels.reshape(n * c, p), ones)
    return hist.reshape(n, c, 256)


def _autocontrast_lut(hist: torch.Tensor) -> torch.Tensor:
    """PIL ImageOps.autocontrast(cutoff=0): lut[i] = int(i * scale + offset), clipped to 0..255, with
    scale = 255.0 / (hi - lo) and offset = -lo * scale in Python floats (float64, each operation rounded).

    Emulated exactly in int64, so that no compiler can fuse i * scale + offset into one FMA (which skips the
    product's rounding and turns some 255s into 254s): scale = S * 2^-q with S the 53-bit integer of the correctly
    rounded quotient; i * S is exact in int64 (below 2^61) and its conversion to float64 rounds it as the float
    multiplication does; the float64 difference of two such products is the sum i * scale + offset, rounded once
    as Python rounds it, and an integer, so the shift by q truncates it exactly. Equal to Python's result for every
    (lo, hi, i) (tests/test_augment.py checks all of them)."""
    lo, hi = _lowest_highest_level(hist)                                   # (N, C, 1) int64 each
    span = (hi - lo).clamp(min=1)
    # exponent of 255 / span: the largest e with span * 2^e <= 255, so that S = 255 * 2^q / span lies in [2^52, 2^53)
    e = sum(((span << k) <= 255).long() for k in range(1, 8))
    q = 52 - e
    numerator = torch.full_like(span, 255) << q                            # below 2^60
    s, r = numerator // span, numerator % span
    s = s + ((2 * r > span) | ((2 * r == span) & (s % 2 == 1))).long()     # round half to even, as IEEE division
    levels = torch.arange(256, device=hist.device)
    products = (levels * s).double()                                       # fl(i * scale) * 2^q, (N, C, 256)
    total = (products - (lo * s).double()).long()                          # fl(fl(i * scale) + offset) * 2^q
    lut = (total >> q).clamp(0, 255)                                       # floor = int() for total >= 0
    return torch.where(hi <= lo, levels, lut)


def _equalize_lut(hist: torch.Tensor, n_pixels: int) -> torch.Tensor:
    """PIL ImageOps.equalize, in its integer arithmetic: step = (count - count of the top level) // 255,
    lut[i] = (step // 2 + count below i) // step, clipped to 255 by Image.point; identity if step is 0
    or only one level is present."""
    _, hi = _lowest_highest_level(hist)
    step = (n_pixels - hist.gather(2, hi)) // 255                          # (N, C, 1)
    below = hist.cumsum(2) - hist                                          # (N, C, 256) pixels under level i
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    keep = ((hist > 0).sum(2, keepdim=True) <= 1) | (step == 0)
    return torch.where(keep, torch.arange(256, device=hist.device), lut)


def _lowest_highest_level(hist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    present = (hist > 0).to(torch.uint8)
    lo = present.argmax(2, keepdim=True)                                   # first present level
    hi = 255 - present.flip(2).argmax(2, keepdim=True)                     # last present level
    return lo, hi


def _blend_stage(x: torch.Tensor, op: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Color, Contrast, Brightness, Sharpness: PIL ImageEnhance, i.e. Image.blend(degenerate, x, factor)."""
    gray = _grayscale(x)                                                   # (N, 1, H, W) int32
    # ImageEnhance.Contrast: int(mean + 0.5) of the L image, done in integers: (2 sum + P) // (2 P) is the same
    # rounding (a float division by a scalar is a reciprocal multiply on CUDA).
    n_pixels = gray.shape[2] * gray.shape[3]
    mean_gray = (2 * gray.sum((2, 3), keepdim=True) + n_pixels) // (2 * n_pixels)      # (N, 1, 1, 1) int64
    select = lambda name: _is(op, name)[:, None, None, None]               # noqa: E731
    # Brightness: black; Color: L in every channel; Contrast: mean L everywhere; Sharpness: smoothed image.
    one_channel = torch.where(select("Color"), gray, torch.where(select("Contrast"), mean_gray, 0))  # (N, 1, H, W)
    degenerate = torch.where(select("Sharpness"), _smooth(x), one_channel)                          # (N, C, H, W)
    out = _pil_blend(degenerate, x, m.float()[:, None, None, None])
    return torch.where(select(_BLEND_OPS), out, x)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L: L = (19595 R + 38470 G + 7471 B + 2^15) >> 16, i.e. 0.299 R + 0.587 G + 0.114 B rounded
    in 16.16 fixed point (the float formula, rounded, differs from PIL on about 1 pixel in 200,000; truncated,
    on half of them). The sum stays below 2^24 + 2^15, so int32 holds it."""
    r, g, b = x.int().unbind(1)
    return ((19595 * r + 38470 * g + 7471 * b + 32768) >> 16)[:, None]


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL ImageFilter.SMOOTH: kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, rounded; border pixels unchanged. (N, C, H, W)
    int32. PIL adds 0.5 and truncates s / 13 for the 3x3 sum s; s / 13 is never k + 1/2 (13 is odd), so
    floor(s / 13 + 1/2) = (2 s + 13) // 26, in integers."""
    h, w = x.shape[2:]
    v = x.int()
    if h < 3 or w < 3:
        return v  # every pixel is a border pixel
    rows = v[..., :-2] + v[..., 1:-1] + v[..., 2:]                         # (N, C, H, W-2): 1x3 sums
    s = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :] + 4 * v[..., 1:-1, 1:-1]  # 3x3, centre weight 5
    out = v.clone()
    out[..., 1:-1, 1:-1] = (2 * s + 13) // 26
    return out


# alpha * 2^BLEND_FRACTION_BITS is an integer for every float32 alpha = 0 or 2^-17 <= |alpha| < 32 (its last bit is
# worth at least 2^-40), and alpha * 2^40 * 255 stays below 2^53, so float64 holds every intermediate exactly.
BLEND_FRACTION_BITS = 40


def _pil_blend(im1: torch.Tensor, im2: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """PIL Image.blend: (float)(in1 + alpha * (in2 - in1)) in float32, the product rounded, truncated, clipped to
    0..255. im1, im2: integer tensors (levels); alpha: float32, broadcastable, 0 or 2^-17 <= |alpha| < 32 (every
    ImageEnhance factor RandAugment draws).

    Emulated exactly in int64 fixed point with 40 fraction bits, so that no compiler can fuse the product and the
    sum into one FMA: the product alpha * (in2 - in1) is exact there, and float32 rounding comes only from the
    conversion of an exact float64 value to float32, which rounds as float32 arithmetic does."""
    one = 1 << BLEND_FRACTION_BITS
    a = (alpha.double() * one).long()                                      # exact: a power-of-two scaling
    product = _float32_round((im2.long() - im1.long()) * a)                # fl32(alpha * (in2 - in1)) * 2^40
    total = _float32_round(im1.long() * one + product)                     # fl32(in1 + that) * 2^40
    return (total >> BLEND_FRACTION_BITS).clamp(0, 255).to(torch.uint8)    # floor = trunc for total >= 0


def _float32_round(v: torch.Tensor) -> torch.Tensor:
    """An int64 tensor (|v| < 2^53, so float64 holds it exactly) rounded to float32's 24 significant bits, as int64
    (the float32 value is an integer, so converting it back is exact)."""
    return v.double().float().long()


def _geometric_stage(x: torch.Tensor, op: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Rotate, ShearX/Y, TranslateX/Y as PIL's NEAREST affine transform: out(x, y) = in(a0 x + a1 y + a2,
    a3 x + a4 y + a5) at pixel centres, fill GEOMETRIC_FILL outside. Identity coefficients for other ops."""
    n, _, h, w = x.shape
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    a0, a1, a2, a3, a4, a5 = one, zero, zero, zero, one, zero

    # Image.rotate(m): inverse rotation by m degrees about the centre (w/2, h/2), as PIL builds its matrix.
    angle = -torch.deg2rad(m)
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = w / 2, h / 2
    rot = _is(op, "Rotate")
    # cx and cy are 16 for 32x32 images: the products below are exact, so a fused multiply-add rounds as PIL does.
    a0, a1, a3, a4 = (torch.where(rot, v, u) for v, u in ((cos, a0), (sin, a1), (-sin, a3), (cos, a4)))
    a2 = torch.where(rot, cos * -cx + sin * -cy + 0.0 + cx, a2)
    a5 = torch.where(rot, -sin * -cx + cos * -cy + 0.0 + cy, a5)
    a1 = torch.where(_is(op, "ShearX"), m, a1)
    a3 = torch.where(_is(op, "ShearY"), m, a3)
    a2 = torch.where(_is(op, "TranslateX"), m * w, a2)
    a5 = torch.where(_is(op, "TranslateY"), m * h, a5)

    # PIL takes one of two paths. Rotations and shears: affine_fixed, 16.16 fixed point with
    # FIX(v) = floor(v * 65536 + 0.5) and source pixel = (FIX sum) >> 16. Identity and translations (a1 == a3 == 0):
    # the float64 scale path, source = floor(a2 + 0.5 + x) as a0 == a4 == 1 for all our ops; written here in 16.16
    # form (integer part << 16) so that one index computation serves both paths.
    fix = lambda v: torch.floor(v * 65536.0 + 0.5).long()                 # noqa: E731
    scale_path = (a1 == 0) & (a3 == 0)
    f0, f1, f3, f4 = fix(a0), fix(a1), fix(a3), fix(a4)
    f2 = torch.where(scale_path, torch.floor(a2 + a0 * 0.5).long() << 16, fix(a2 + a0 * 0.5 + a1 * 0.5))
    f5 = torch.where(scale_path, torch.floor(a5 + a4 * 0.5).long() << 16, fix(a5 + a3 * 0.5 + a4 * 0.5))
    ys = torch.arange(h, device=x.device).reshape(1, h, 1)
    xs = torch.arange(w, device=x.device).reshape(1, 1, w)
    col = lambda v: v.reshape(n, 1, 1)                                     # noqa: E731
    src_x = (col(f2) + ys * col(f1) + xs * col(f0)) >> 16                  # (N, H, W)
    src_y = (col(f5) + ys * col(f4) + xs * col(f3)) >> 16
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    index = src_y.clamp(0, h - 1) * w + src_x.clamp(0, w - 1)
    out = _gather_pixels(x, index).masked_fill(~inside[:, None], GEOMETRIC_FILL)
    return torch.where(_is(op, _GEOMETRIC_OPS)[:, None, None, None], out, x)


# ---------------------------------------------------------------- helpers

def _gather_pixels(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[n, c, i, j] = x[n, c].flatten()[index[n, i, j]]; index (N, H', W') int64."""
    n, c = x.shape[:2]
    flat_index = index.reshape(n, 1, -1).expand(n, c, -1)
    return x.reshape(n, c, -1).gather(2, flat_index).reshape(n, c, *index.shape[1:])


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect an index into [0, size) without repeating the edge (numpy 'reflect'), for |overshoot| < size."""
    i = torch.where(i < 0, -i, i)
    return torch.where(i > size - 1, 2 * (size - 1) - i, i)
