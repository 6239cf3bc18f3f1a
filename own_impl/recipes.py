"""The recipes our FixMatch and MixMatch can follow, one table entry each: the strong augmentation (FixMatch), how
MixUp draws lambda (MixMatch), how batches are sampled, the network's wiring and initialization, and how each is
described in a result.

`paper` is each algorithm's paper and official code (Sohn et al. 2020; Berthelot et al. 2019), and `paper-cta` the
same with the FixMatch paper's other strong augmentation, CTAugment (own_impl/ctaugment.py); `torchssl`
reproduces TorchSSL's recipe for it exactly (third_party/torchssl/README.md explains each difference), so that our
code run with it beside TorchSSL itself checks the implementation, and beside the `paper` recipe measures the
recipe's effect.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from own_impl import ctaugment
from own_impl.augment import apply_strong, sample_strong_params
from own_impl.augment_torchssl import apply_torchssl_strong, sample_torchssl_strong_params


def sample_cta_strong(n: int, height: int, width: int, generator, device, cta: ctaugment.CTAugment):
    return ctaugment.sample_strong_params(cta, n, height, width, generator)


def stateless(sample: Callable) -> Callable:
    """A recipe's sampler that needs no augmentation state (all but CTAugment's)."""
    def sample_strong(n, height, width, generator, device, cta=None):
        return sample(n, height, width, generator, device)

    return sample_strong


@dataclass(frozen=True)
class Recipe:
    name: str
    # (n, height, width, generator, device, cta) -> parameters of apply_strong; cta: the run's CTAugment or None
    sample_strong: Callable
    apply_strong: Callable  # (uint8 images (N, 3, H, W), parameters) -> uint8 images; draws no random numbers
    with_replacement: bool  # batches drawn with replacement (else shuffled passes over each pool)
    wiring: str  # own_impl.model.WideResNet's wiring
    conv_bias_init: str  # and its conv-bias init
    mixup_lambda_per: str  # MixMatch: one lambda ~ Beta(alpha, alpha) per "example" or one per "batch"
    settings: dict[str, str]  # how the recipe realises the spec, for the report's side-by-side settings
    algorithm_settings: dict[str, dict[str, str]]  # and the rows that only one algorithm's runs have
    ctaugment: bool = False  # the strong augmentation learns its policy (CTAugment): rates, probe and update

    def settings_for(self, algorithm: str) -> dict[str, str]:
        return {**self.settings, **self.algorithm_settings.get(algorithm, {})}


RECIPES: dict[str, Recipe] = {
    "paper": Recipe(
        name="paper", sample_strong=stateless(sample_strong_params), apply_strong=apply_strong, with_replacement=False,
        wiring="official", conv_bias_init="zero", mixup_lambda_per="example",
        settings={
            "labelled_sampling": "shuffled passes over the split",
            "unlabelled_sampling": "shuffled passes over all 50,000 train images",
            "wrn_first_block_of_groups_2_3": "conv1 sees leaky_relu(bn1(x)), as the official code",
            "conv_bias_init": "zero, as the official code",
        },
        algorithm_settings={
            "fixmatch": {"strong_augmentation": "RandAugment as the paper's RA: 2 of 14 ops with replacement, each "
                                                "applied with p=0.5 at a magnitude uniform in its range; Cutout 16x16, "
                                                "fill 127; after the flip and shift"},
            "mixmatch": {"mixup_lambda": "one lambda ~ Beta(alpha, alpha) per example, lambda' = max(lambda, "
                                         "1 - lambda), as the official code"},
        }),
    "torchssl": Recipe(
        name="torchssl", sample_strong=stateless(sample_torchssl_strong_params), apply_strong=apply_torchssl_strong,
        with_replacement=True, wiring="torchssl", conv_bias_init="pytorch", mixup_lambda_per="batch",
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
        with_replacement=False, wiring="official", conv_bias_init="zero", mixup_lambda_per="example", ctaugment=True,
        settings={
            "labelled_sampling": "shuffled passes over the split",
            "unlabelled_sampling": "shuffled passes over all 50,000 train images",
            "wrn_first_block_of_groups_2_3": "conv1 sees leaky_relu(bn1(x)), as the official code",
            "conv_bias_init": "zero, as the official code",
        },
        algorithm_settings={
            "fixmatch": {"strong_augmentation": "CTAugment as the official code: 2 of 19 ops, bins drawn from rates "
                                                "learnt from a probe of the labelled batch (EMA model, eval mode; "
                                                "decay 0.99, threshold 0.80); Cutout 16x16, fill 127; after an own "
                                                "flip and shift"}},
        ),
}
