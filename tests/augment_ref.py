"""Per-image PIL reference for the FixMatch augmentations: the ground truth that tests hold own_impl.augment to.

Each op is the PIL call that TorchSSL makes (TorchSSL datasets/augmentation/randaugment.py; the same calls as
kekmodel/FixMatch-pytorch dataset/randaugment.py), taking the magnitude in the units of the table in augment.py:
that is, TorchSSL's convention after it has drawn the value. Nothing here imports augment.py, so a shared mistake
in the batched code cannot hide here. Slow (one image at a time): for tests only, never for training.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps


def _affine(img: Image.Image, matrix) -> Image.Image:
    # Image.transform defaults: NEAREST resampling, fill 0 outside the source.
    return img.transform(img.size, Image.Transform.AFFINE, matrix)


OPS = {
    "Identity": lambda img, m: img,
    "AutoContrast": lambda img, m: ImageOps.autocontrast(img),
    "Equalize": lambda img, m: ImageOps.equalize(img),
    "Rotate": lambda img, m: img.rotate(m),
    "Solarize": lambda img, m: ImageOps.solarize(img, m),
    "Color": lambda img, m: ImageEnhance.Color(img).enhance(m),
    "Contrast": lambda img, m: ImageEnhance.Contrast(img).enhance(m),
    "Brightness": lambda img, m: ImageEnhance.Brightness(img).enhance(m),
    "Sharpness": lambda img, m: ImageEnhance.Sharpness(img).enhance(m),
    "ShearX": lambda img, m: _affine(img, (1, m, 0, 0, 1, 0)),
    "ShearY": lambda img, m: _affine(img, (1, 0, 0, m, 1, 0)),
    "TranslateX": lambda img, m: _affine(img, (1, 0, m * img.size[0], 0, 1, 0)),
    "TranslateY": lambda img, m: _affine(img, (1, 0, 0, 0, 1, m * img.size[1])),
    "Posterize": lambda img, m: ImageOps.posterize(img, max(1, int(m))),
}


def apply_op(img: Image.Image, name: str, magnitude: float) -> Image.Image:
    """One RandAugment op on one RGB image."""
    return OPS[name](img, float(magnitude))


def flip_and_shift(img: np.ndarray, flip: bool, dy: int, dx: int, pad: int = 4) -> np.ndarray:
    """(H, W, 3) uint8: mirror left-right if `flip`, reflect-pad by `pad` (edge not repeated, like torchvision's
    padding_mode='reflect' and TF's REFLECT), crop H x W whose top-left corner is (pad + dy, pad + dx)."""
    h, w = img.shape[:2]
    if flip:
        img = img[:, ::-1]
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    return padded[pad + dy:pad + dy + h, pad + dx:pad + dx + w].copy()


def cutout(img: Image.Image, cy: int, cx: int, size: int = 16, fill: int = 127) -> Image.Image:
    """The official FixMatch code's Cutout (create_cutout_mask): rows [cy - size//2, cy + size//2) and columns
    [cx - size//2, cx + size//2), clipped to the image, set to `fill`."""
    w, h = img.size
    box = (max(0, cx - size // 2), max(0, cy - size // 2), min(w, cx + size // 2), min(h, cy + size // 2))
    out = img.copy()
    out.paste((fill, fill, fill), box)  # a 4-tuple box excludes its right and bottom edges
    return out
