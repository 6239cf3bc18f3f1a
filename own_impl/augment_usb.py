"""USB's FixMatch augmentations (the `usb` recipe), batched on uint8 tensors: its weak crop-then-flip, and its strong
view, RandAugment(3, 5) and Cutout AFTER the crop and flip.

What USB does to CIFAR-10 images (semilearn/datasets/cv_datasets/cifar.py at its pin, third_party/usb):

| # | USB                                                                                 | where               |
|---|-------------------------------------------------------------------------------------|---------------------|
| 0 | Resize(32): a 32x32 image passes unchanged                                          | cifar.py:35, 52     |
| 1 | RandomCrop(32, padding=int(32 * (1 - 0.875)) = 4, padding_mode='reflect')           | cifar.py:36, 53     |
| 2 | RandomHorizontalFlip() (p = 0.5), AFTER the crop                                    | cifar.py:37, 54     |
| 3 | strong only: RandAugment(3, 5), after the crop and flip                             | cifar.py:55         |
| 4 | ToTensor, Normalize(ImageNet mean, std)                                             | cifar.py:38-39, 56-57 |

USB's RandAugment (datasets/augmentation/randaugment.py:145-202) is TorchSSL's line for line: the same 14 ops in the
same augment_list order with the same ranges, random.choices(k=3) with replacement, each op always applied at
min + (max - min) * random.random(), then Cutout(random.random() * 0.5) with the same CutoutAbs (np.random.uniform
corner, fill (125, 123, 114)). The only addition, an `exclude_color_aug` list, is unused by CIFAR-10 (RandAugment(3,
5) leaves it False). So the ops, their draws and the Cutout are own_impl/augment_torchssl.py's, tested there against
TorchSSL's functions and in tests/test_usb_recipe.py against USB's.

What differs from TorchSSL's recipe is the order alone: TorchSSL runs RandAugment and Cutout on the raw image and
then flips and crops; USB crops and flips first. And the weak view crops, then flips (TorchSSL: flip, then crop).

Crop then flip, as USB: out[i, j] = padded[top + i, left + (W - 1 - j)] for a flipped image. own_impl.augment's
flip_and_shift flips first and crops the flipped, padded image at dx; reflect padding commutes with the flip, so
crop-then-flip at offset dx equals flip-then-crop at -dx (the same law: dx is uniform on -4..4). crop_then_flip
reads WeakParams as USB's draws, (dy, dx) the crop's offset from the centre (top = 4 + dy, left = 4 + dx) and flip
applied after it, and equals torchvision's RandomCrop then RandomHorizontalFlip pixel for pixel given them.

All random numbers are drawn by sample_usb_strong_params in one documented order; the apply functions draw none.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from own_impl.augment import WeakParams, flip_and_shift, sample_weak_params
from own_impl.augment_torchssl import (TORCHSSL_AUGMENT_LIST, TORCHSSL_NUM_OPS, TorchSSLCutoutParams,
                                       TorchSSLRandAugmentParams, sample_torchssl_strong_params, torchssl_cutout,
                                       torchssl_randaugment)

USB_AUGMENT_LIST = TORCHSSL_AUGMENT_LIST  # randaugment.py:145-162: the same ops, order and ranges
USB_NUM_OPS = TORCHSSL_NUM_OPS  # RandAugment(3, 5), cifar.py:55


class USBStrongParams(NamedTuple):
    weak: WeakParams  # the crop and flip, applied first
    randaugment: TorchSSLRandAugmentParams
    cutout: TorchSSLCutoutParams


def crop_then_flip(x: torch.Tensor, p: WeakParams) -> torch.Tensor:
    """Reflect-pad 4, crop HxW at (4 + dy, 4 + dx), then mirror the images with p.flip (USB's weak augmentation).
    x: (N, 3, H, W) uint8."""
    return flip_and_shift(x, p._replace(dx=torch.where(p.flip, -p.dx, p.dx)))


def sample_usb_strong_params(n: int, height: int, width: int, generator: torch.Generator | None = None,
                             device="cpu") -> USBStrongParams:
    """All of apply_usb_strong's random numbers, drawn from `generator` in this order: the crop and flip (own_impl.
    augment.sample_weak_params: flip rand(n), then the offsets randint(-4, 5, (2, n))), then RandAugment's and
    Cutout's draws exactly as augment_torchssl.sample_torchssl_strong_params draws them (ops, magnitudes, cutout size,
    cutout corner; its trailing flip and crop draws are not used)."""
    weak = sample_weak_params(n, generator, device)
    tssl = sample_torchssl_strong_params(n, height, width, generator, device)
    return USBStrongParams(weak, tssl.randaugment, tssl.cutout)


def apply_usb_strong(x: torch.Tensor, p: USBStrongParams) -> torch.Tensor:
    """Crop and flip, then RandAugment's 3 ops, then its Cutout: no random numbers here. uint8 in, uint8 out."""
    return torchssl_cutout(torchssl_randaugment(crop_then_flip(x, p.weak), p.randaugment), p.cutout)


def usb_strong_augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x: (N, 3, H, W) uint8 on any device -> USB's strong view, (N, 3, H, W) uint8, same device."""
    n, _, h, w = x.shape
    return apply_usb_strong(x, sample_usb_strong_params(n, h, w, generator, x.device))
