"""Bugs planted in our code for the identity check's power test: each is a realistic mistake, patched into our
modules (never the reference's) while our side builds and steps, and the check must catch every one. Some only
exist against one reference: a recipe entry set to the other reference's value (USB's MixMatch interleaved, its
blocks' BatchNorm eps TorchSSL's, ...)."""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, ContextManager
from unittest import mock

import torch
import torch.nn.functional as F

from own_impl import fixmatch, mixmatch
from own_impl import train as train_mod
from own_impl.device import autocast
from own_impl.optim import EMA
from own_impl.recipes import RECIPES


REAL_FIXMATCH_LOSS = fixmatch.fixmatch_loss


@dataclass(frozen=True)
class Bug:
    name: str
    algorithms: tuple[str, ...]
    plant: Callable[[], ContextManager]
    widths: tuple[int, ...] = ()  # the network widths where it changes anything (empty: every width)
    references: tuple[str, ...] = ("torchssl", "usb")  # the checks (ours against which reference) it belongs to

    def applies(self, algorithm: str, network: tuple[int, int], reference: str = "torchssl") -> bool:
        return (algorithm in self.algorithms and (not self.widths or network[1] in self.widths)
                and reference in self.references)


def decay_everything(model, weight_decay):
    """Weight decay on every parameter, BatchNorm scales and shifts and biases included."""
    return [{"params": list(model.parameters()), "weight_decay": weight_decay}]


def one_step_early(base_lr, step, total_steps, _lr=train_mod.cosine_lr):
    return _lr(base_lr, step + 1, total_steps)


def without_nesterov(model, weight_decay, _groups=train_mod.param_groups):
    return [{**g, "nesterov": False} for g in _groups(model, weight_decay)]


class EMAOffBy1e7(EMA):
    def __init__(self, model, decay, per_tensor=False):
        super().__init__(model, decay - 1e-7, per_tensor)


def mean_over_accepted(logits_x, y_x, logits_u_weak, logits_u_strong, threshold, lambda_u, y_u_true=None):
    """FixMatch's l_u averaged over the accepted pseudo-labels only (the paper divides by mu B)."""
    q_max, pseudo = torch.softmax(logits_u_weak.detach(), dim=-1).max(dim=-1)
    mask = (q_max >= threshold).float()
    loss_u = (F.cross_entropy(logits_u_strong, pseudo, reduction="none") * mask).sum() / mask.sum().clamp(min=1.0)
    loss = F.cross_entropy(logits_x, y_x) + lambda_u * loss_u
    _, stats = REAL_FIXMATCH_LOSS(logits_x, y_x, logits_u_weak, logits_u_strong, threshold, lambda_u, y_u_true)
    return loss, {**stats, "loss": loss.detach(), "loss_u": loss_u.detach()}


def separate_batchnorm(model, x, y_x, y_u, spec):
    """FixMatch's labelled and unlabelled images through the model in two passes (two sets of batch statistics)."""
    b = y_x.shape[0]
    with autocast(spec, x.device):
        logits = torch.cat([model(x[:b]), model(x[b:])]).float()
    weak, strong = logits[b:].chunk(2)
    return fixmatch.fixmatch_loss(logits[:b], y_x, weak, strong, spec.threshold, spec.lambda_u, y_u_true=y_u)


def sharpen_inverted(p, T):
    """p^T instead of p^(1/T): flattens where it should sharpen."""
    p_t = p.pow(T)
    return p_t / p_t.sum(dim=-1, keepdim=True)


def mixup_without_max(x, y, perm, lam):
    """MixUp with lambda as drawn, not lambda' = max(lambda, 1 - lambda): a row may be mostly its partner."""
    n = x.shape[0]

    def mix(v):
        w = lam if lam.dim() == 0 else lam.to(v.dtype).view(n, *[1] * (v.dim() - 1))
        return w * v + (1 - w) * v[perm]

    return mix(x), mix(y)


def ramp_one_step_late(step, total_steps, ramp_up_fraction, _ramp=mixmatch.linear_rampup):
    return _ramp(step - 1, total_steps, ramp_up_fraction)


def no_interleave(chunks, batch):
    """The mixed batch's chunks as they come: the first pass sees labelled rows only."""
    return list(chunks)


class ShortcutAlwaysActivated(train_mod.WideResNet):
    """Group 1's first shortcut sees the activated input at every width: our `torchssl` wiring once did, which is
    not TorchSSL's network at width 1 (16 -> 16 channels there: its BasicBlock adds the raw input)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.groups[0][0].activate_before_residual = True


def recipe_changed(module, recipe: str, **fields) -> Callable[[], ContextManager]:
    """The recipe table `module` reads, with `recipe`'s entry given other values: a recipe set up wrong."""
    return patched(module, RECIPES={**RECIPES, recipe: dataclasses.replace(RECIPES[recipe], **fields)})


def patched(module, **attrs) -> Callable[[], ContextManager]:
    def plant() -> ContextManager:
        stack = contextlib.ExitStack()
        for name, value in attrs.items():
            stack.enter_context(mock.patch.object(module, name, value))
        return stack

    return plant


BOTH = ("fixmatch", "mixmatch")
BUGS: tuple[Bug, ...] = (
    Bug("weight decay on BatchNorm and biases", BOTH, patched(train_mod, param_groups=decay_everything)),
    Bug("learning-rate schedule one step early", BOTH, patched(train_mod, cosine_lr=one_step_early)),
    Bug("no Nesterov momentum", BOTH, patched(train_mod, param_groups=without_nesterov)),
    Bug("EMA decay off by 1e-7", BOTH, patched(train_mod, EMA=EMAOffBy1e7)),
    Bug("unlabelled loss averaged over accepted images only", ("fixmatch",),
        patched(fixmatch, fixmatch_loss=mean_over_accepted)),
    Bug("labelled and unlabelled images through BatchNorm separately", ("fixmatch",),
        patched(fixmatch, forward_loss=separate_batchnorm)),
    Bug("sharpening with T instead of 1/T", ("mixmatch",), patched(mixmatch, sharpen=sharpen_inverted)),
    Bug("MixUp lambda without max(lambda, 1 - lambda)", ("mixmatch",), patched(mixmatch, mixup=mixup_without_max)),
    Bug("lambda_u ramp-up one step late", ("mixmatch",), patched(mixmatch, linear_rampup=ramp_one_step_late)),
    Bug("mixed batch through BatchNorm without interleaving", ("mixmatch",),
        patched(mixmatch, interleave=no_interleave), references=("torchssl",)),
    Bug("group 1's shortcut activated at width 1", BOTH, patched(train_mod, WideResNet=ShortcutAlwaysActivated),
        widths=(1,)),
    # against USB: its recipe's entries, each set to TorchSSL's value
    Bug("BatchNorm eps 1e-3 in the residual blocks (USB: 1e-5)", BOTH,
        recipe_changed(train_mod, "usb", block_bn_eps=1e-3), references=("usb",)),
    Bug("mixed batch interleaved (USB's MixMatch does not interleave)", ("mixmatch",),
        recipe_changed(mixmatch, "usb", mixmatch_interleave=True), references=("usb",)),
    Bug("label guess renormalised before sharpening (USB: not)", ("mixmatch",),
        recipe_changed(mixmatch, "usb", mixmatch_renormalise_guess=True), references=("usb",)),
    Bug("unlabelled loss as one mean over all elements (USB: over classes, then examples)", ("mixmatch",),
        recipe_changed(mixmatch, "usb", mixmatch_loss_u_mean="elements"), references=("usb",)),
)
