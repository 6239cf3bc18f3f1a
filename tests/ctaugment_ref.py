"""Per-image reference of the official CTAugment (google-research/fixmatch, libml/ctaugment.py at d4985a1): the ground
truth that tests hold own_impl.ctaugment to.

The ops are the official functions, line for line, on one PIL RGB image, with three changes, each forced:
- Image.ANTIALIAS, removed in Pillow 10, is spelled Image.Resampling.LANCZOS (it was an alias of it);
- cutout takes its centre as arguments instead of drawing it from np.random (the official draws
  height_loc = randint(0, x.size[0]), a column, then width_loc = randint(0, x.size[1]), a row);
- cutout copies the image before writing into it (the official writes into its argument, a fresh image in apply).
The rate bookkeeping (rate_to_p, update_rates) is the official arithmetic as NumPy 1.x ran it, written out because
NumPy 2 (NEP 50) changed it: there np.float32 * Python float was float64, so each update was computed in float64
and rounded once to float32 when stored. Nothing here imports own_impl, so a shared mistake cannot hide here.
Slow (one image at a time): for tests only.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

# name -> bins per parameter, in the official registration order (libml/ctaugment.py:104-219).
BINS = {
    "autocontrast": (17,), "blur": (17,), "brightness": (17,), "color": (17,), "contrast": (17,),
    "cutout": (17,), "equalize": (17,), "invert": (17,), "identity": (), "posterize": (8,),
    "rescale": (17, 6), "rotate": (17,), "sharpness": (17,), "shear_x": (17,), "shear_y": (17,),
    "smooth": (17,), "solarize": (17,), "translate_x": (17,), "translate_y": (17,),
}


def _enhance(x, op, level):
    return op(x).enhance(0.1 + 1.9 * level)


def _imageop(x, op, level):
    return Image.blend(x, op(x), level)


def _filter(x, op, level):
    return Image.blend(x, x.filter(op), level)


def autocontrast(x, level):
    return _imageop(x, ImageOps.autocontrast, level)


def blur(x, level):
    return _filter(x, ImageFilter.BLUR, level)


def brightness(x, brightness):
    return _enhance(x, ImageEnhance.Brightness, brightness)


def color(x, color):
    return _enhance(x, ImageEnhance.Color, color)


def contrast(x, contrast):
    return _enhance(x, ImageEnhance.Contrast, contrast)


def cutout(x, level, height_loc, width_loc):
    """The official cutout with its two random draws passed in: height_loc is a column, width_loc a row."""
    x = x.copy()
    size = 1 + int(level * min(x.size) * 0.499)
    img_height, img_width = x.size
    upper_coord = (max(0, height_loc - size // 2), max(0, width_loc - size // 2))
    lower_coord = (min(img_height, height_loc + size // 2), min(img_width, width_loc + size // 2))
    pixels = x.load()
    for i in range(upper_coord[0], lower_coord[0]):
        for j in range(upper_coord[1], lower_coord[1]):
            pixels[i, j] = (127, 127, 127)
    return x


def equalize(x, level):
    return _imageop(x, ImageOps.equalize, level)


def invert(x, level):
    return _imageop(x, ImageOps.invert, level)


def identity(x):
    return x


def posterize(x, level):
    level = 1 + int(level * 7.999)
    return ImageOps.posterize(x, level)


def rescale(x, scale, method):
    s = x.size
    scale *= 0.25
    crop = (scale * s[0], scale * s[1], s[0] * (1 - scale), s[1] * (1 - scale))
    methods = (Image.Resampling.LANCZOS, Image.Resampling.BICUBIC, Image.Resampling.BILINEAR,
               Image.Resampling.BOX, Image.Resampling.HAMMING, Image.Resampling.NEAREST)
    method = methods[int(method * 5.99)]
    return x.crop(crop).resize(x.size, method)


def rotate(x, angle):
    angle = int(np.round((2 * angle - 1) * 45))
    return x.rotate(angle)


def sharpness(x, sharpness):
    return _enhance(x, ImageEnhance.Sharpness, sharpness)


def shear_x(x, shear):
    shear = (2 * shear - 1) * 0.3
    return x.transform(x.size, Image.Transform.AFFINE, (1, shear, 0, 0, 1, 0))


def shear_y(x, shear):
    shear = (2 * shear - 1) * 0.3
    return x.transform(x.size, Image.Transform.AFFINE, (1, 0, 0, shear, 1, 0))


def smooth(x, level):
    return _filter(x, ImageFilter.SMOOTH, level)


def solarize(x, th):
    th = int(th * 255.999)
    return ImageOps.solarize(x, th)


def translate_x(x, delta):
    delta = (2 * delta - 1) * 0.3
    return x.transform(x.size, Image.Transform.AFFINE, (1, 0, delta, 0, 1, 0))


def translate_y(x, delta):
    delta = (2 * delta - 1) * 0.3
    return x.transform(x.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, delta))


OPS = {name: globals()[name] for name in BINS}


def apply_op(img: Image.Image, name: str, levels, cutout_at=(0, 0)) -> Image.Image:
    """One official op on one RGB image; `levels` has one float per parameter of the op, cutout_at = (column, row)."""
    levels = [float(v) for v in levels][:len(BINS[name])]
    if name == "cutout":
        return cutout(img, levels[0], *cutout_at)
    return OPS[name](img, *levels)


def rate_to_p(rate: np.ndarray, decay: float, th: float) -> np.ndarray:
    """The official rate_to_p (libml/ctaugment.py:52-56): float32 throughout, as NumPy ran it on a float32 array."""
    p = rate + np.float32(1 - decay)
    p = p / p.max()
    p[p < np.float32(th)] = 0
    return p


def update_rates(rates: dict, policy, proximity: float, decay: float) -> None:
    """The official update_rates (libml/ctaugment.py:80-84) on a dict name -> tuple of float32 arrays, in place.
    policy: [(name, [level per parameter]), ...]. float64 arithmetic, rounded to float32 at the store (NumPy 1.x)."""
    for k, bins in policy:
        for p, rate in zip(bins, rates[k]):
            p = int(p * len(rate) * 0.999)
            rate[p] = float(rate[p]) * decay + float(proximity) * (1 - decay)


def proximity(probs: np.ndarray, label: int) -> float:
    """cta/lib/train.py:72-76: 1 - 0.5 * sum |softmax - one-hot|, the sum in float32, the rest in float64."""
    error = probs.astype(np.float32).copy()
    error[label] -= 1
    error = np.abs(error).sum()
    return 1 - 0.5 * float(error)
