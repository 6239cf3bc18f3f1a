"""The data side of a step: the uint8 data set on the device, index samplers, normalization."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from contract.arrays import load_run_inputs
from contract.spec import RunFiles, RunSpec
from own_impl.ctaugment import CTAugment

# CIFAR-10 per-channel mean and std of the training pixels, in [0, 1] units (the constants TorchSSL uses).
CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)


@dataclass
class DeviceData:
    train_x: torch.Tensor  # (N, 3, 32, 32) uint8
    train_y: torch.Tensor  # (N,) int64
    labelled: np.ndarray  # (n_labels,) sorted indices into the train set
    eval_x: torch.Tensor  # (M, 3, 32, 32) uint8: the test set or its fixed subset
    eval_y: torch.Tensor  # (M,) int64
    sha256: str  # recomputed from the arrays


def load_device_data(spec: RunSpec, files: RunFiles, device: torch.device) -> DeviceData:
    arrays, labelled, sub = load_run_inputs(spec, files)

    def images(x: np.ndarray) -> torch.Tensor:  # (N, 32, 32, 3) HWC -> (N, 3, 32, 32) on the device
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)

    return DeviceData(images(arrays.train_x), torch.from_numpy(arrays.train_y).to(device), labelled,
                      images(arrays.test_x[sub]), torch.from_numpy(arrays.test_y[sub]).to(device), arrays.sha256)


class ReplacementSampler:
    """Indices drawn uniformly with replacement from a pool, from a local generator (torch's RandomSampler with
    replacement=True, as TorchSSL samples)."""

    def __init__(self, pool: np.ndarray, seed: int):
        self.pool = torch.as_tensor(pool, dtype=torch.int64)
        self.generator = torch.Generator().manual_seed(seed)

    def next(self, n: int) -> torch.Tensor:  # (n,) int64 on the CPU
        return self.pool[torch.randint(len(self.pool), (n,), generator=self.generator)]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class EpochSampler:
    """Indices from shuffled passes over a pool: each pass is a fresh permutation drawn from a local generator."""

    def __init__(self, pool: np.ndarray, seed: int):
        self.pool = torch.as_tensor(pool, dtype=torch.int64)
        self.generator = torch.Generator().manual_seed(seed)
        self.order = self.pool[:0]
        self.pos = 0

    def next(self, n: int) -> torch.Tensor:  # (n,) int64 on the CPU; a batch may run into the next pass
        parts = []
        while n > 0:
            if self.pos == len(self.order):
                self.order = self.pool[torch.randperm(len(self.pool), generator=self.generator)]
                self.pos = 0
            take = min(n, len(self.order) - self.pos)
            parts.append(self.order[self.pos:self.pos + take])
            self.pos += take
            n -= take
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.pos = state["order"].clone(), state["pos"]


@dataclass
class Samplers:
    """Where each step's images come from: its labelled and unlabelled indices, and its augmentation's numbers."""

    labelled: EpochSampler | ReplacementSampler  # from the split
    unlabelled: EpochSampler | ReplacementSampler  # from all N train images, the labelled ones included (as the paper)
    augment: torch.Generator  # on the device
    cta: CTAugment | None = None  # the learnt policy of a CTAugment recipe: its rates are training state

    @classmethod
    def seeded(cls, seed: int, data: DeviceData, with_replacement: bool = False, cta: bool = False) -> "Samplers":
        seeds = [int(s) for s in np.random.SeedSequence(seed).generate_state(3, dtype=np.uint64)]
        sampler = ReplacementSampler if with_replacement else EpochSampler
        device = data.train_x.device
        return cls(sampler(data.labelled, seeds[0]), sampler(np.arange(len(data.train_y)), seeds[1]),
                   torch.Generator(device=device).manual_seed(seeds[2]), CTAugment(device=device) if cta else None)

    def state_dict(self) -> dict:
        return {"augment": self.augment.get_state(), "labelled": self.labelled.state_dict(),
                "unlabelled": self.unlabelled.state_dict(),
                **({"cta": self.cta.state_dict()} if self.cta is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        self.augment.set_state(state["augment"])
        self.labelled.load_state_dict(state["labelled"])
        self.unlabelled.load_state_dict(state["unlabelled"])
        if self.cta is not None:
            self.cta.load_state_dict(state["cta"])


def normalize(x: torch.Tensor, channels_last: bool, table: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32, standardized with the CIFAR-10 mean and std, by table lookup.

    table: normalization_table(x.device), passed in by compiled callers. A lookup is exact on every backend; the
    same x * scale + shift computed per pixel could be fused into one FMA by a compiler and differ in the last bit."""
    table = normalization_table(x.device) if table is None else table
    offsets = torch.arange(0, 3 * 256, 256, device=x.device).view(1, 3, 1, 1)
    out = table.reshape(-1)[x.long() + offsets]
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


@functools.cache
def normalization_table(device: torch.device) -> torch.Tensor:
    """(3, 256) float32: level v of channel c -> (v/255 - mean_c)/std_c, as v * scale + shift in float32 (one rounding
    for each), made once per device on the CPU."""
    levels = torch.arange(256, dtype=torch.float32)
    return torch.stack([levels * (1.0 / (255.0 * s)) + (-m / s) for m, s in zip(CIFAR10_MEAN, CIFAR10_STD)]).to(device)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """From pinned memory a host-to-GPU copy is truly asynchronous; from pageable memory CUDA may wait for the
    queued GPU work first, which would stall the host once per step."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t
