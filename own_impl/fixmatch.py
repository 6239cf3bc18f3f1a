"""FixMatch (Sohn et al. 2020): its objective, its batch, its forward, and what the training loop needs from it.

One step, in the paper's symbols (B labelled images, muB unlabelled ones; own_impl/train.py runs it):

    x, y_x, y_u = make_batch(...)      x = [alpha(x_b); alpha(u_b); A(u_b)], (B + 2 muB, 3, H, W), alpha weak, A strong
    loss, stats = forward_loss(model, x, y_x, y_u, spec)    one forward over all of it (BatchNorm sees every image),
                                                            then fixmatch_loss: l_s + lambda_u l_u
    backward, SGD, EMA                                      the loop's (own_impl/train.py, own_impl/optim.py)
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from contract.spec import RunSpec
from own_impl.augment import WeakParams, sample_weak_params
from own_impl.ctaugment import CTAPolicy, CTAugment, Probe, apply_policy
from own_impl.data import DeviceData, Samplers, normalization_table, normalize, to_device
from own_impl.device import autocast
from own_impl.recipes import RECIPES

STATISTICS = ("loss", "loss_x", "loss_u", "mask_rate", "pseudo_acc")  # what forward_loss returns, in metrics.jsonl
SETTINGS: dict[str, str] = {}  # FixMatch's rows of the report's settings are the recipe's and train.IMPL_SETTINGS


def fixmatch_loss(logits_x: torch.Tensor, y_x: torch.Tensor, logits_u_weak: torch.Tensor,
                  logits_u_strong: torch.Tensor, threshold: float, lambda_u: float,
                  y_u_true: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss = l_s + lambda_u * l_u (section 2.2).

    logits_x (B, C) and labels y_x (B,); logits_u_weak, logits_u_strong (muB, C): one unlabelled batch seen
    through the weak and the strong augmentation. y_u_true (muB,): its true labels, for the pseudo_acc diagnostic.
    Statistics are detached tensors on the logits' device (reading them is the caller's sync point).
    """
    loss_x = F.cross_entropy(logits_x, y_x)  # l_s = 1/B sum H(p_b, p_m(y|alpha(x_b)))
    q = torch.softmax(logits_u_weak.detach(), dim=-1)  # q_b = p_m(y|alpha(u_b)): a target, no gradient
    q_max, pseudo = q.max(dim=-1)  # max(q_b), q_hat_b = argmax(q_b)
    mask = (q_max >= threshold).float()  # 1(max(q_b) >= tau)
    # l_u = 1/(muB) sum 1(max q_b >= tau) H(q_hat_b, p_m(y|A(u_b))): the mean runs over all muB, rejected count 0
    loss_u = (F.cross_entropy(logits_u_strong, pseudo, reduction="none") * mask).mean()
    loss = loss_x + lambda_u * loss_u

    stats = {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach(),
             "mask_rate": mask.mean()}  # fraction of the unlabelled batch ACCEPTED
    if y_u_true is not None:
        correct = (pseudo == y_u_true).float() * mask
        stats["pseudo_acc"] = correct.sum() / mask.sum().clamp(min=1.0)  # among accepted; 0 when none accepted
    return loss, stats


def forward_loss(model: torch.nn.Module, x: torch.Tensor, y_x: torch.Tensor, y_u: torch.Tensor,
                 spec: RunSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Labelled, weak and strong images through the model in ONE pass (BatchNorm sees them all), then the loss."""
    b = y_x.shape[0]
    with autocast(spec, x.device):
        logits = model(x)  # (B + 2muB, C)
    logits = logits.float()  # the loss in fp32, whatever the forward precision
    logits_u_weak, logits_u_strong = logits[b:].chunk(2)  # (muB, C) each
    return fixmatch_loss(logits[:b], y_x, logits_u_weak, logits_u_strong, spec.threshold, spec.lambda_u,
                         y_u_true=y_u)


def make_batch(data: DeviceData, samplers: Samplers, spec: RunSpec, step: int = 0,
               augment_fn=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's inputs: x = [weak(labelled); weak(unlabelled); strong(unlabelled)], (B + 2muB, 3, 32, 32), and the
    labels of the labelled (B,) and unlabelled (muB,) images (the latter for the pseudo-label diagnostic only).

    Every random number is drawn here, the strong ones by the spec's recipe; augment_fn (default: augmenter(recipe),
    eager) applies them, so a compiled augment_fn draws exactly what the eager one does. FixMatch's step does not
    depend on `step`."""
    device = data.train_x.device
    n_x, n_u = spec.batch_size, spec.batch_size * spec.uratio
    idx = to_device(torch.cat([samplers.labelled.next(n_x), samplers.unlabelled.next(n_u)]), device)
    idx_x, idx_u = idx[:n_x], idx[n_x:]  # (B,), (muB,)
    x_weak, x_strong = data.train_x[idx], data.train_x[idx_u]  # (B + muB, ...), (muB, ...)
    _, _, h, w = x_weak.shape
    recipe, cta = RECIPES[spec.recipe], samplers.cta
    p_weak = sample_weak_params(len(x_weak), samplers.augment, device)
    p_strong = recipe.sample_strong(len(x_strong), h, w, samplers.augment, device, cta)
    probe = cta.draw(n_x, h, w, samplers.augment, probe=True) if recipe.ctaugment else None
    x = (augment_fn or augmenter(spec.recipe))(x_weak, p_weak, x_strong, p_strong,
                                               normalization_table(device, recipe.normalization), spec.channels_last,
                                               probe)
    if probe is not None:  # CTAugment: the probe of the weak labelled images goes to the loop with its labels
        x, x_probe = x
        cta.probe = Probe(x_probe, probe, data.train_y[idx_x])
    return x, data.train_y[idx_x], data.train_y[idx_u]


@functools.cache
def augmenter(recipe: str):
    """The recipe's augment_and_normalize: uint8 images, drawn parameters and normalization_table -> the step's
    float32 input [weak(x_weak); strong(x_strong)], and with a CTAugment probe policy also the probe images (the
    policy on the weak labelled images, no Cutout). Pure (no random numbers, no host sync): it compiles into a few
    fused kernels."""
    apply_weak, apply_strong = RECIPES[recipe].weak_augment, RECIPES[recipe].apply_strong

    def augment_and_normalize(x_weak: torch.Tensor, p_weak: WeakParams, x_strong: torch.Tensor, p_strong,
                              table: torch.Tensor, channels_last: bool, probe: CTAPolicy | None = None):
        weak = apply_weak(x_weak, p_weak)  # (B + muB, 3, H, W): flip and shift (the `usb` recipe: crop, then flip)
        x = normalize(torch.cat([weak, apply_strong(x_strong, p_strong)]), channels_last, table)
        if probe is None:
            return x
        return x, normalize(apply_policy(weak[:probe.op_index.shape[0]], probe), channels_last, table)

    return augment_and_normalize


def stand_ins(spec: RunSpec, image_shape: torch.Size, device: torch.device) -> tuple[tuple, tuple]:
    """Zeros of a step's shapes, to compile on: (augment_fn's arguments, forward_loss's inputs); the augmentation's
    parameters from a throwaway generator."""
    n_x, n_u = spec.batch_size, spec.batch_size * spec.uratio
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.zeros((n_x + n_u, *image_shape), dtype=torch.uint8, device=device)
    recipe = RECIPES[spec.recipe]
    cta = CTAugment(device=device) if recipe.ctaugment else None  # a throwaway one: the run's rates stay untouched
    p_strong = recipe.sample_strong(n_u, *image_shape[1:], g, device, cta)
    probe = cta.draw(n_x, *image_shape[1:], g, probe=True) if cta else None
    table = normalization_table(device, recipe.normalization)
    augment_args = (images, sample_weak_params(n_x + n_u, g, device), images[n_x:], p_strong, table,
                    spec.channels_last, probe)
    x = normalize(torch.zeros((n_x + 2 * n_u, *image_shape), dtype=torch.uint8, device=device), spec.channels_last,
                  table)
    inputs = (x, torch.zeros(n_x, dtype=torch.int64, device=device), torch.zeros(n_u, dtype=torch.int64, device=device))
    return augment_args, inputs
