"""Optimizer pieces: weight-decay parameter groups, the cosine learning-rate schedule, the EMA of the weights."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """FixMatch's schedule: lr * cos(7 pi k / (16 K)) at step k of K (no warm-up); ends at lr * cos(7 pi / 16).
    Evaluated in the order TorchSSL's LambdaLR evaluates it (pi * 7/16 * (k / K)), so both give the same double."""
    return base_lr * math.cos(math.pi * (7.0 / 16.0) * (step / total_steps))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights only; none on biases or BatchNorm scales and shifts.

    The official code decays only 'kernel' variables; TorchSSL skips every parameter whose name holds 'bn' or
    'bias'. Both leave exactly the conv/linear weights, which is what this selects, by module type, not by name.
    """
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            is_kernel = isinstance(module, (nn.Conv2d, nn.Linear)) and name == "weight"
            (decay if is_kernel else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class EMA:
    """An exponential moving average of a model's parameters: ema = decay * ema + (1 - decay) * live, every step.

    Starts as a copy of the live model, with no bias correction (as the official code and TorchSSL). BatchNorm
    running statistics are not averaged: they are copied from the live model at every update, so the averaged
    weights are evaluated with the live model's statistics, as in both references.
    per_tensor: (1 - decay) * live + decay * ema, one tensor at a time, TorchSSL's arithmetic to the last bit; else
    one multi-tensor lerp (the same value within one rounding per step, and a few kernels on a GPU instead of ~100).
    """

    def __init__(self, model: nn.Module, decay: float, per_tensor: bool = False):
        self.decay, self.per_tensor = decay, per_tensor
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.buffer_groups = buffer_groups(list(self.model.buffers()))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params, live_params = list(self.model.parameters()), [p.detach() for p in model.parameters()]
        if self.per_tensor:
            for e, p in zip(ema_params, live_params):
                e.copy_((1.0 - self.decay) * p + self.decay * e)
        else:
            torch._foreach_lerp_(ema_params, live_params, 1.0 - self.decay)  # ema += (1 - decay) * (live - ema)
        ema_buffers, live_buffers = list(self.model.buffers()), list(model.buffers())
        for group in self.buffer_groups:  # one multi-tensor copy per group: a few kernels on a GPU
            torch._foreach_copy_([ema_buffers[i] for i in group], [live_buffers[i] for i in group])

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


def buffer_groups(buffers: list[torch.Tensor]) -> list[list[int]]:
    """Indices of `buffers` grouped by (dtype, device), in order of first appearance. A _foreach op on CUDA takes its
    multi-tensor path only for a list of one dtype and device; BatchNorm's float32 statistics and int64
    num_batches_tracked in one list would fall back to one copy kernel per tensor."""
    groups: dict[tuple, list[int]] = {}
    for i, b in enumerate(buffers):
        groups.setdefault((b.dtype, b.device), []).append(i)
    return list(groups.values())
