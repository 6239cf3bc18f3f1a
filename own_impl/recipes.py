"""The recipes our FixMatch and MixMatch can follow, one table entry each: the weak and strong augmentation, the
normalisation, how batches are sampled, the network's wiring, biases and BatchNorm eps, MixMatch's MixUp lambda,
label guess, BatchNorm of the mixed batch and unlabelled-loss reduction, and how each is described in a result.

`paper` is each algorithm's paper and official code (Sohn et al. 2020; Berthelot et al. 2019), and `paper-cta` the
same with the FixMatch paper's other strong augmentation, CTAugment (own_impl/ctaugment.py); `torchssl`
reproduces TorchSSL's recipe for it exactly (third_party/torchssl/README.md explains each difference), and `usb`
USB's (microsoft/Semi-supervised-learning, third_party/usb/README.md), so that our code run with either beside that
implementation checks the implementation, and beside the `paper` recipe measures the recipe's effect.

Where `usb` differs from `torchssl` (USB's files at its pin 1ef4cbeb, semilearn/...; each a row of its settings):

| what                 | usb (USB)                                                        | torchssl (TorchSSL)    |
|----------------------|------------------------------------------------------------------|------------------------|
| WRN conv biases      | none in the residual blocks (nets/wrn/wrn.py:35-44); the stem    | every conv, PyTorch    |
|                      | conv keeps its PyTorch-default one (wrn.py:84-85)                | default init           |
| WRN BatchNorm eps    | 1e-5 in the blocks (wrn.py:33, 37), 1e-3 in the head (wrn.py:97)  | 1e-3 everywhere        |
| normalisation        | ImageNet mean/std (datasets/cv_datasets/cifar.py:17, 20), in      | CIFAR-10 mean/std      |
|                      | ToTensor + Normalize's float32 arithmetic, bit for bit           |                        |
| weak augmentation    | crop, then flip (cifar.py:36-37)                                 | flip, then crop        |
| strong augmentation  | crop, flip, THEN RandAugment(3, 5) + Cutout (cifar.py:53-55);    | RandAugment(3, 5) +    |
|                      | the RandAugment code is TorchSSL's (randaugment.py:145-202)      | Cutout, then flip/crop |
| sampling             | per-epoch shuffles without replacement, from generators seeded   | with replacement, from |
|                      | with the epoch index (datasets/samplers/sampler.py:55-65,        | the run's seed         |
|                      | core/hooks/sampler_seed.py:21); an epoch is usb_epoch_iters(steps)|                       |
|                      | batches, as third_party/usb/entry.py sets USB up                 |                        |
| MixMatch: BatchNorm  | NOT interleaved: the 1 + K mu chunks of B mixed rows in order    | interleaved            |
| of the mixed batch   | (algorithms/mixmatch/mixmatch.py:91-92, 109-110)                 |                        |
| MixMatch: guess      | mean of the views' softmax, NOT renormalised (mixmatch.py:67-68) | renormalised to sum 1  |
| MixMatch: L_U        | squared error averaged over classes, then over examples          | F.mse_loss: one mean   |
| reduction            | (core/criterions/consistency.py:27-29, 40): the same value,      | over all elements      |
|                      | rounded differently                                              |                        |
| MixMatch: an extra   | one train-mode pass of the labelled batch per step that only     | none                   |
| forward              | fills a feature dict, BatchNorm restored (mixmatch.py:74-78): no |                        |
|                      | number depends on it. NOT reproduced (the identity check leaves  |                        |
|                      | that forward out and is bit-identical without it)                |                        |

The same in both: one lambda per batch, lambda' = max(lambda, 1 - lambda) (algorithms/utils/ops.py:48-63), the
network's wiring and init, FixMatch's loss, the schedule, EMA and weight decay (identity check: docs/identity.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from contract.spec import RunSpec
from own_impl import ctaugment
from own_impl.augment import apply_strong, flip_and_shift, sample_strong_params
from own_impl.augment_torchssl import apply_torchssl_strong, sample_torchssl_strong_params
from own_impl.augment_usb import apply_usb_strong, crop_then_flip, sample_usb_strong_params
from own_impl.data import DeviceData, Samplers

USB_EPOCH_ITERS = 1024  # USB's CIFAR-10 configs: 1,048,576 iterations in 1,024 epochs


def usb_epoch_iters(steps: int) -> int:
    """Iterations per USB epoch in a run of `steps` steps, as third_party/usb/entry.py's epoch_iters sets USB up
    (tests hold the two equal): its configs' 1,024 where that divides the steps, else the largest divisor of steps
    below it (USB's main() requires num_train_iter % epoch == 0)."""
    return max(d for d in range(1, min(steps, USB_EPOCH_ITERS) + 1) if steps % d == 0)


def sample_cta_strong(n: int, height: int, width: int, generator, device, cta: ctaugment.CTAugment):
    return ctaugment.sample_strong_params(cta, n, height, width, generator)


def stateless(sample: Callable) -> Callable:
    """A recipe's sampler that needs no augmentation state (all but CTAugment's)."""
    def sample_strong(n, height, width, generator, device, cta=None):
        return sample(n, height, width, generator, device)

    return sample_strong


SAMPLINGS = ("passes", "replacement", "usb-epochs")


@dataclass(frozen=True)
class Recipe:
    name: str
    # (n, height, width, generator, device, cta) -> parameters of apply_strong; cta: the run's CTAugment or None
    sample_strong: Callable
    apply_strong: Callable  # (uint8 images (N, 3, H, W), parameters) -> uint8 images; draws no random numbers
    # "passes": shuffled passes over each pool from the run's seed; "replacement": draws with replacement;
    # "usb-epochs": USB's epoch-seeded shuffles (own_impl.data.EpochSeededSampler)
    sampling: str
    wiring: str  # own_impl.model.WideResNet's wiring
    conv_bias_init: str  # and its conv-bias init
    mixup_lambda_per: str  # MixMatch: one lambda ~ Beta(alpha, alpha) per "example" or one per "batch"
    settings: dict[str, str]  # how the recipe realises the spec, for the report's side-by-side settings
    algorithm_settings: dict[str, dict[str, str]]  # and the rows that only one algorithm's runs have
    ctaugment: bool = False  # the strong augmentation learns its policy (CTAugment): rates, probe and update
    weak_augment: Callable = flip_and_shift  # (uint8 images, own_impl.augment.WeakParams) -> uint8 images
    normalization: str = "cifar10"  # a key of own_impl.data.NORMALIZATIONS
    block_conv_bias: bool = True  # the WideResNet's residual blocks have conv biases
    block_bn_eps: float = 1e-3  # and their BatchNorms' eps (the head's is 1e-3 in every recipe)
    mixmatch_interleave: bool = True  # MixMatch: the mixed batch's chunks interleaved for BatchNorm
    mixmatch_renormalise_guess: bool = True  # MixMatch: the views' mean softmax divided by its sum before sharpening
    # MixMatch: L_U as one mean over all elements ("elements"), or over classes then examples ("classes_then_rows")
    mixmatch_loss_u_mean: str = "elements"

    def __post_init__(self):
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling {self.sampling!r} is not one of {SAMPLINGS}")

    @property
    def with_replacement(self) -> bool:
        return self.sampling == "replacement"

    def samplers(self, spec: RunSpec, data: DeviceData) -> Samplers:
        """The run's index samplers and augmentation generator, as this recipe samples, seeded from spec.seed."""
        epoch_iters = usb_epoch_iters(spec.steps) if self.sampling == "usb-epochs" else None
        return Samplers.seeded(spec.seed, data, self.with_replacement, cta=self.ctaugment, epoch_iters=epoch_iters)

    def settings_for(self, algorithm: str) -> dict[str, str]:
        return {**self.settings, **self.algorithm_settings.get(algorithm, {})}


PAPER_SETTINGS = {  # the paper recipes' rows (RandAugment or CTAugment alike)
    "labelled_sampling": "shuffled passes over the split",
    "unlabelled_sampling": "shuffled passes over all 50,000 train images",
    "wrn_first_block_of_groups_2_3": "conv1 sees leaky_relu(bn1(x)), as the official code",
    "conv_bias_init": "zero, as the official code",
}
RECIPES: dict[str, Recipe] = {
    "paper": Recipe(
        name="paper", sample_strong=stateless(sample_strong_params), apply_strong=apply_strong, sampling="passes",
        wiring="official", conv_bias_init="zero", mixup_lambda_per="example",
        settings=PAPER_SETTINGS,
        algorithm_settings={
            "fixmatch": {"strong_augmentation": "RandAugment as the paper's RA: 2 of 14 ops with replacement, each "
                                                "applied with p=0.5 at a magnitude uniform in its range; Cutout 16x16, "
                                                "fill 127; after the flip and shift"},
            "mixmatch": {"mixup_lambda": "one lambda ~ Beta(alpha, alpha) per example, lambda' = max(lambda, "
                                         "1 - lambda), as the official code"},
        }),
    "torchssl": Recipe(
        name="torchssl", sample_strong=stateless(sample_torchssl_strong_params), apply_strong=apply_torchssl_strong,
        sampling="replacement", wiring="torchssl", conv_bias_init="pytorch", mixup_lambda_per="batch",
        normalization="cifar10-torchvision",
        settings={
            "labelled_sampling": "with replacement",
            "unlabelled_sampling": "with replacement over all 50,000 train images",
            "wrn_first_block_of_groups_2_3": "conv1 sees the raw input (its bn1 is unused), as TorchSSL",
            "conv_bias_init": "PyTorch default (uniform), as TorchSSL",
        },
        algorithm_settings={
            "fixmatch": {"strong_augmentation": "RandAugment(3, 5): 3 of 14 ops with replacement, each always "
                                                "applied, magnitude uniform in its range; then Cutout of side "
                                                "U[0, 16) px, fill (125, 123, 114); all of it BEFORE the flip and "
                                                "crop (TorchSSL's, batched on the device)"},
            # word for word TorchSSL's own row (third_party/torchssl/entry.py): the report bolds rows that differ
            "mixmatch": {"mixup_lambda": "ONE lambda ~ Beta(alpha, alpha) per batch, lambda' = max(lambda, "
                                         "1 - lambda)"},
        }),
    "paper-cta": Recipe(
        name="paper-cta", sample_strong=sample_cta_strong, apply_strong=ctaugment.apply_strong,
        sampling="passes", wiring="official", conv_bias_init="zero", mixup_lambda_per="example", ctaugment=True,
        settings=PAPER_SETTINGS,
        algorithm_settings={
            "fixmatch": {"strong_augmentation": "CTAugment as the official code: 2 of 19 ops, bins drawn from rates "
                                                "learnt from a probe of the labelled batch (EMA model, eval mode; "
                                                "decay 0.99, threshold 0.80); Cutout 16x16, fill 127; after an own "
                                                "flip and shift"}},
        ),
    "usb": Recipe(
        name="usb", sample_strong=stateless(sample_usb_strong_params), apply_strong=apply_usb_strong,
        sampling="usb-epochs", wiring="torchssl", conv_bias_init="pytorch", mixup_lambda_per="batch",
        weak_augment=crop_then_flip, normalization="imagenet-torchvision", block_conv_bias=False, block_bn_eps=1e-5,
        mixmatch_interleave=False, mixmatch_renormalise_guess=False, mixmatch_loss_u_mean="classes_then_rows",
        # the keys USB's own result rows use (third_party/usb/entry.py IMPL_SETTINGS), so the report sets them side
        # by side; word for word USB's where ours does the same
        settings={
            "labelled_sampling": "per-epoch shuffles without replacement (randperm of the labelled set, repeated), "
                                 "from a generator seeded with the epoch index, not the run's seed",
            "unlabelled_sampling": "per-epoch shuffles without replacement over all 50,000 train images, from a "
                                   "generator seeded with the epoch index, not the run's seed",
            "normalization": "ImageNet mean/std (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225)",
            "weak_augmentation": "reflect-pad 4 + random 32x32 crop, then flip p=0.5 (batched on the device)",
            "wrn_first_block_of_groups_2_3": "conv1 sees the raw input (its bn1 is unused)",
            "wrn_conv_bias": "none in the residual blocks (the stem conv and the classifier have one)",
            "wrn_batchnorm_eps": "1e-5 in the residual blocks, 1e-3 in the final BatchNorm",
            "conv_bias_init": "PyTorch default (uniform) for the stem conv, as USB",
        },
        algorithm_settings={
            "fixmatch": {"strong_augmentation": "reflect-pad 4 + random crop, flip, THEN RandAugment(3, 5): 3 of 14 "
                                                "ops with replacement, each always applied, magnitude uniform in its "
                                                "range; then Cutout of side U[0, 16] px, fill (125, 123, 114)"},
            "mixmatch": {
                "mixup_lambda": "ONE lambda ~ Beta(alpha, alpha) per batch, lambda' = max(lambda, 1 - lambda)",
                "label_guessing": "K = 2 weak views; mean of the live model's softmax over them, sharpened at T; no "
                                  "gradient; train-mode passes, BatchNorm running statistics restored",
                "label_guess_renormalised": "no: the views' mean softmax is sharpened as it is (TorchSSL divides it "
                                            "by its sum first)",
                "extra_forward": "none: USB's extra pass of the labelled batch feeds only a feature dict, its "
                                 "BatchNorm statistics restored, so no number depends on it",
                "batchnorm_of_the_mixed_batch": "NOT interleaved: 1 + K mu passes of B rows in order (the mixed "
                                                "labelled rows first), running statistics from the first pass only",
                "unlabelled_loss": "squared error between softmax and mixed guesses, mean over classes, then over "
                                   "examples",
            },
        }),
}
