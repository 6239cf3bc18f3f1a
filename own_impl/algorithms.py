"""The algorithms our training loop runs, one table entry each: how a step's inputs are made, the forward pass and
loss, the statistics a step returns, and the stand-in inputs that compile it before the first step.

The loop (own_impl/train.py) is the same for every algorithm: inputs = make_batch(...), then loss_fn(*inputs)
(forward_loss, maybe compiled), backward, SGD, EMA. Per algorithm:

    fixmatch  inputs (x, y_x, y_u): x = [weak(x_b); weak(u_b); strong(u_b)], (B + 2 muB, 3, H, W); one forward
              over all of it, then own_impl.loss.fixmatch_loss.
    mixmatch  inputs (x, y_x, y_u, lam, perm, lambda_u): x = [weak(x_b); weak_1(u_b); weak_2(u_b)],
              (B + K muB, 3, H, W), K = 2 independent weak views of one unlabelled batch; MixUp's lam (N,) and
              perm (N,), N = B + K muB, drawn here from the run's augmentation generator (after the weak
              augmentation's numbers), one lam per example or one per batch as the recipe says; lambda_u = the
              spec's lambda_u * linear_rampup(step, steps, ramp_up), a 0-d tensor (no recompilation as it ramps).
              The forward guesses labels with the live model (no gradient), mixes, and runs own_impl.mixmatch.

MixMatch and BatchNorm: INTERLEAVED, as the official code (libml/layers.py interleave) and TorchSSL
(models/mixmatch/mixmatch.py) both do: the mixed batch is cut into 1 + K mu chunks of B rows, rows are swapped
between them so that each chunk holds labelled and unlabelled rows in proportion, each chunk is one forward pass
(normalised by its own B-row batch statistics), only the first pass updates the running statistics, and the logits
are swapped back. The label-guessing passes (one per view, train mode, as both references) leave the running
statistics untouched. Why not one forward over all N rows, as our FixMatch does: both references interleave, so
ours with the `paper` recipe is the official algorithm and ours with the `torchssl` recipe differs from TorchSSL
only where the recipe table says; one pass over N rows would change every row's normalisation (N-row statistics
instead of B-row ones) and the running statistics (N rows instead of B), a difference of our own making in both
comparisons. The cost is 1 + K mu smaller passes instead of one. "Untouched" is done with one throwaway copy of the
BatchNorm buffers per step (forward_with_scratch_statistics): the passes that must not update the running
statistics update the copy, which is dropped.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from contract.spec import MIXMATCH_VIEWS, RunSpec
from own_impl.augment import WeakParams, flip_and_shift, sample_weak_params
from own_impl.data import DeviceData, Samplers, augmenter, make_batch, normalization_table, normalize
from own_impl.loss import fixmatch_loss
from own_impl.mixmatch import draw_mixup_params, guess_labels, interleave, linear_rampup, mixmatch_loss, mixup
from own_impl.recipes import RECIPES


@dataclass(frozen=True)
class Algorithm:
    name: str
    # (data, samplers, spec, step, augment_fn) -> the step's inputs (tensors on the device); draws every random
    # number of the step, so that forward_loss draws none (compiled, and replayed exactly on resume)
    make_batch: Callable[..., tuple]
    forward_loss: Callable[..., tuple]  # (model, *inputs, spec) -> (loss, statistics: named detached 0-d tensors)
    augmenter: Callable[[str], Callable]  # recipe -> augment_and_normalize, pure, compiled as one graph
    stand_ins: Callable[..., tuple]  # (spec, image_shape, device) -> (augment_fn's arguments, inputs): a step's shapes
    statistics: tuple[str, ...]  # the names forward_loss returns, in metrics.jsonl's training records
    settings: dict[str, str]  # how the algorithm is realised, for the report's side-by-side settings


def autocast(spec: RunSpec, device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=spec.precision == "bf16")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """From pinned memory a host-to-GPU copy is truly asynchronous; from pageable memory CUDA may wait for the
    queued GPU work first, which would stall the host once per step."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


# ---------------------------------------------------------------------------------------------------------------
# FixMatch


def fixmatch_batch(data: DeviceData, samplers: Samplers, spec: RunSpec, step: int, augment_fn=None) -> tuple:
    return make_batch(data, samplers, spec, augment_fn)  # (x, y_x, y_u); FixMatch's step does not depend on `step`


def fixmatch_forward_loss(model: torch.nn.Module, x: torch.Tensor, y_x: torch.Tensor, y_u: torch.Tensor,
                          spec: RunSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Labelled, weak and strong images through the model in ONE pass (BatchNorm sees them all), then the loss."""
    b = y_x.shape[0]
    with autocast(spec, x.device):
        logits = model(x)  # (B + 2muB, C)
    logits = logits.float()  # the loss in fp32, whatever the forward precision
    logits_u_weak, logits_u_strong = logits[b:].chunk(2)  # (muB, C) each
    return fixmatch_loss(logits[:b], y_x, logits_u_weak, logits_u_strong, spec.threshold, spec.lambda_u,
                         y_u_true=y_u)


def fixmatch_stand_ins(spec: RunSpec, image_shape: torch.Size, device: torch.device) -> tuple[tuple, tuple]:
    """Zeros of a FixMatch step's shapes; the augmentation's parameters from a throwaway generator."""
    n_x, n_u = spec.batch_size, spec.batch_size * spec.uratio
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.zeros((n_x + n_u, *image_shape), dtype=torch.uint8, device=device)
    p_strong = RECIPES[spec.recipe].sample_strong(n_u, *image_shape[1:], g, device)
    augment_args = (images, sample_weak_params(n_x + n_u, g, device), images[n_x:], p_strong,
                    normalization_table(device), spec.channels_last)
    x = normalize(torch.zeros((n_x + 2 * n_u, *image_shape), dtype=torch.uint8, device=device), spec.channels_last)
    inputs = (x, torch.zeros(n_x, dtype=torch.int64, device=device), torch.zeros(n_u, dtype=torch.int64, device=device))
    return augment_args, inputs


# ---------------------------------------------------------------------------------------------------------------
# MixMatch


@functools.cache
def mixmatch_augmenter(recipe: str):
    """Weak augmentation and normalization of every image of a MixMatch step: (B + K muB) uint8 images and their
    drawn flip and shift -> float32 input. The same for both recipes (TorchSSL's weak augmentation is the paper's)."""
    def augment_and_normalize(images: torch.Tensor, p_weak: WeakParams, table: torch.Tensor,
                              channels_last: bool) -> torch.Tensor:
        return normalize(flip_and_shift(images, p_weak), channels_last, table)

    return augment_and_normalize


def mixmatch_batch(data: DeviceData, samplers: Samplers, spec: RunSpec, step: int, augment_fn=None) -> tuple:
    """(x, y_x, y_u, lam, perm, lambda_u): see the module docstring. step: the optimizer steps done before this one.
    Draws, in order: the labelled then unlabelled indices, the weak augmentation of the B + K muB images, lam, perm."""
    device = data.train_x.device
    n_x, n_u = spec.batch_size, spec.batch_size * spec.uratio
    idx = to_device(torch.cat([samplers.labelled.next(n_x), samplers.unlabelled.next(n_u)]), device)
    idx_x, idx_u = idx[:n_x], idx[n_x:]  # (B,), (muB,)
    images = data.train_x[torch.cat([idx_x] + [idx_u] * MIXMATCH_VIEWS)]  # (N, 3, H, W): x_b, then u_b K times
    p_weak = sample_weak_params(len(images), samplers.augment, device)  # independent per row: K distinct views
    x = (augment_fn or mixmatch_augmenter(spec.recipe))(images, p_weak, normalization_table(device),
                                                         spec.channels_last)
    lam, perm = draw_mixup_params(len(images), spec.mixup_alpha, samplers.augment, device,
                                  per=RECIPES[spec.recipe].mixup_lambda_per)
    ramped = spec.lambda_u * linear_rampup(step, spec.steps, spec.ramp_up)  # TorchSSL's formula, in float64
    lambda_u = to_device(torch.tensor(ramped, dtype=torch.float32), device)
    return x, data.train_y[idx_x], data.train_y[idx_u], lam, perm, lambda_u


def forward_with_scratch_statistics(model: torch.nn.Module, scratch: dict[str, torch.Tensor],
                                    x: torch.Tensor) -> torch.Tensor:
    """model(x) in its current (train) mode, with BatchNorm's running statistics read from and written to `scratch`
    (copies of the model's buffers) instead of the model's own; the parameters, and their gradients, are the
    model's."""
    return torch.func.functional_call(model, scratch, (x,))


def mixmatch_forward_loss(model: torch.nn.Module, x: torch.Tensor, y_x: torch.Tensor, y_u: torch.Tensor,
                          lam: torch.Tensor, perm: torch.Tensor, lambda_u: torch.Tensor,
                          spec: RunSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Guess, sharpen, mix, and the interleaved forward of the mixed batch (module docstring), then the loss.

    x (N, 3, H, W) = [x_hat; u_hat_1; u_hat_2]; y_x (B,) labels; y_u (muB,) the unlabelled images' true labels, for
    the guess_acc diagnostic only; lam, perm (N,) MixUp's numbers; lambda_u 0-d: this step's ramped weight."""
    b, n_u = y_x.shape[0], y_u.shape[0]
    scratch = {name: buf.clone() for name, buf in model.named_buffers()}  # running statistics the step drops
    with torch.no_grad(), autocast(spec, x.device):
        views = [forward_with_scratch_statistics(model, scratch, v) for v in x[b:].split(n_u)]  # K x (muB, C)
    q = guess_labels(views, spec.temperature)  # (muB, C) float32, sharpened, no gradient
    targets = torch.cat([F.one_hot(y_x, spec.num_classes).float()] + [q] * MIXMATCH_VIEWS)  # (N, C): p, q, q
    x_mix, t_mix = mixup(x, targets, perm, lam)  # rows [:B] are X', rows [B:] are U'
    chunks = interleave(list(x_mix.split(b)), b)  # 1 + K mu chunks of B rows, each mixing X' and U' rows
    with autocast(spec, x.device):
        logits = [model(chunks[0])]  # the one pass that updates the running statistics
        logits += [forward_with_scratch_statistics(model, scratch, c) for c in chunks[1:]]
    logits = torch.cat(interleave(logits, b)).float()  # (N, C), rows back in x_mix's order; the loss in fp32
    loss, stats = mixmatch_loss(logits[:b], t_mix[:b], logits[b:], t_mix[b:], lambda_u)
    stats["guess_acc"] = (q.argmax(dim=-1) == y_u).float().mean()  # guessed label (argmax q) = true label
    stats["mix_lambda"] = torch.maximum(lam, 1 - lam).mean()  # mean lambda': weight of each row's own input
    return loss, stats


def mixmatch_stand_ins(spec: RunSpec, image_shape: torch.Size, device: torch.device) -> tuple[tuple, tuple]:
    """Zeros of a MixMatch step's shapes; the augmentation's and MixUp's numbers from a throwaway generator."""
    n_x, n_u = spec.batch_size, spec.batch_size * spec.uratio
    n = n_x + MIXMATCH_VIEWS * n_u
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.zeros((n, *image_shape), dtype=torch.uint8, device=device)
    augment_args = (images, sample_weak_params(n, g, device), normalization_table(device), spec.channels_last)
    lam, perm = draw_mixup_params(n, spec.mixup_alpha, g, device, per=RECIPES[spec.recipe].mixup_lambda_per)
    inputs = (normalize(images, spec.channels_last), torch.zeros(n_x, dtype=torch.int64, device=device),
              torch.zeros(n_u, dtype=torch.int64, device=device), lam, perm,
              torch.tensor(float(spec.lambda_u), device=device))
    return augment_args, inputs


ALGORITHMS: dict[str, Algorithm] = {
    "fixmatch": Algorithm(
        name="fixmatch", make_batch=fixmatch_batch, forward_loss=fixmatch_forward_loss, augmenter=augmenter,
        stand_ins=fixmatch_stand_ins, statistics=("loss", "loss_x", "loss_u", "mask_rate", "pseudo_acc"),
        settings={}),  # FixMatch's rows are the recipe's and train.IMPL_SETTINGS
    "mixmatch": Algorithm(
        name="mixmatch", make_batch=mixmatch_batch, forward_loss=mixmatch_forward_loss, augmenter=mixmatch_augmenter,
        stand_ins=mixmatch_stand_ins,
        statistics=("loss", "loss_x", "loss_u", "lambda_u", "guess_acc", "mix_lambda"),
        settings={
            "label_guessing": "K = 2 weak views; mean of the live model's softmax over them, sharpened at T; no "
                              "gradient; one train-mode pass per view, BatchNorm running statistics untouched",
            "mixup_pairing": "one shuffle over Concat(labelled, view 1, view 2), inputs and targets mixed alike",
            "batchnorm_of_the_mixed_batch": "interleaved: 1 + K mu passes of B rows, each mixing labelled and "
                                            "unlabelled rows; running statistics from the first pass only",
            "unlabelled_loss": "squared error between softmax and mixed guesses, mean over examples and classes",
            "lambda_u_ramp_up": "linear from 0 at step 0 to lambda_u at step ramp_up x steps",
        }),
}
