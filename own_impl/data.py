"""The data side of a step: the uint8 data set on the device, index samplers, normalization (one table per recipe)."""
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
# ImageNet's, which USB uses for CIFAR-10 (semilearn/datasets/cv_datasets/cifar.py:17, 20 at its pin).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalization:
    """A per-channel standardisation (v/255 - mean_c)/std_c of pixel level v, and the float32 arithmetic computing it:
    "scale_shift": v * (1/(255 std)) + (-mean/std), one rounding for each operation (ours);
    "totensor_normalize": ((v / 255) - mean) / std, each operation in float32 with mean and std rounded to float32
    first, as torchvision's ToTensor and Normalize compute it (TorchSSL's and USB's data sets)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    arithmetic: str


NORMALIZATIONS = {  # a recipe names one (own_impl/recipes.py)
    "cifar10": Normalization(CIFAR10_MEAN, CIFAR10_STD, "scale_shift"),
    # TorchSSL's: the same constants through ToTensor + Normalize (one ulp away from scale_shift at 554 of 768 levels)
    "cifar10-torchvision": Normalization(CIFAR10_MEAN, CIFAR10_STD, "totensor_normalize"),
    "imagenet-torchvision": Normalization(IMAGENET_MEAN, IMAGENET_STD, "totensor_normalize"),
}


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


class EpochSeededSampler:
    """USB's sampling (semilearn/datasets/samplers/sampler.py:55-65 DistributedSampler.__iter__, set_epoch by
    core/hooks/sampler_seed.py:21 before each epoch, batches cut by core/utils/build.py:166-172 get_data_loader):
    an epoch is `epoch_iters` batches of n; its indices are randperm(len(pool)) repeated (epoch_iters * n) //
    len(pool) times, then the first (epoch_iters * n) % len(pool) of one more randperm, all from a fresh
    torch.Generator seeded with the epoch index (0, 1, ...) and not with the run's seed: every seed sees the same
    order. Each pool (labelled, unlabelled) has its own generator, seeded alike."""

    def __init__(self, pool: np.ndarray, epoch_iters: int):
        self.pool = torch.as_tensor(pool, dtype=torch.int64)
        self.epoch_iters = epoch_iters
        self.epoch = 0  # the next epoch to draw
        self.order = self.pool[:0]
        self.pos = 0

    def epoch_order(self, epoch: int, n: int) -> torch.Tensor:
        """(epoch_iters * n,) indices into the pool for `epoch` (the epoch's batches, in order, each n long)."""
        g = torch.Generator().manual_seed(epoch)
        total, size = self.epoch_iters * n, len(self.pool)
        perms = [torch.randperm(size, generator=g) for _ in range(total // size)]
        perms.append(torch.randperm(size, generator=g)[:total % size])
        return torch.cat(perms)

    def next(self, n: int) -> torch.Tensor:  # (n,) int64 on the CPU: the next batch of the epoch
        if self.pos == len(self.order):
            self.order = self.pool[self.epoch_order(self.epoch, n)]
            self.epoch, self.pos = self.epoch + 1, 0
        if self.pos + n > len(self.order):
            raise ValueError(f"a batch of {n} does not fit this epoch's {len(self.order)} indices (batch size changed)")
        self.pos += n
        return self.order[self.pos - n:self.pos]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "order": self.order.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.order, self.pos = state["epoch"], state["order"].clone(), state["pos"]


@dataclass
class Samplers:
    """Where each step's images come from: its labelled and unlabelled indices, and its augmentation's numbers."""

    labelled: EpochSampler | ReplacementSampler | EpochSeededSampler  # from the split
    unlabelled: EpochSampler | ReplacementSampler | EpochSeededSampler  # from all N train images, the labelled ones
    # included (as the paper)
    augment: torch.Generator  # on the device
    cta: CTAugment | None = None  # the learnt policy of a CTAugment recipe: its rates are training state

    @classmethod
    def seeded(cls, seed: int, data: DeviceData, with_replacement: bool = False, cta: bool = False,
               epoch_iters: int | None = None) -> "Samplers":
        """epoch_iters: USB's sampling (EpochSeededSampler, epochs of that many batches; `seed` then seeds the
        augmentation only); else shuffled passes, or draws with replacement, from generators seeded from `seed`."""
        seeds = [int(s) for s in np.random.SeedSequence(seed).generate_state(3, dtype=np.uint64)]
        sampler = ReplacementSampler if with_replacement else EpochSampler
        device = data.train_x.device
        pools = (data.labelled, np.arange(len(data.train_y)))
        if epoch_iters is not None:
            labelled, unlabelled = (EpochSeededSampler(pool, epoch_iters) for pool in pools)
        else:
            labelled, unlabelled = sampler(pools[0], seeds[0]), sampler(pools[1], seeds[1])
        return cls(labelled, unlabelled, torch.Generator(device=device).manual_seed(seeds[2]),
                   CTAugment(device=device) if cta else None)

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
    """uint8 (N, 3, H, W) -> float32, standardized by table lookup: with `table` (normalization_table(x.device,
    the recipe's normalization), which compiled callers pass in), else with the CIFAR-10 mean and std.

    A lookup is exact on every backend; the same x * scale + shift computed per pixel could be fused into one FMA by
    a compiler and differ in the last bit."""
    table = normalization_table(x.device) if table is None else table
    offsets = torch.arange(0, 3 * 256, 256, device=x.device).view(1, 3, 1, 1)
    out = table.reshape(-1)[x.long() + offsets]
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


@functools.cache
def normalization_table(device: torch.device, normalization: str = "cifar10") -> torch.Tensor:
    """(3, 256) float32: level v of channel c -> (v/255 - mean_c)/std_c in the arithmetic of NORMALIZATIONS[
    normalization], made once per device on the CPU (the CPU kernels torchvision's transforms run on)."""
    n = NORMALIZATIONS[normalization]
    levels = torch.arange(256, dtype=torch.float32)
    if n.arithmetic == "scale_shift":
        rows = [levels * (1.0 / (255.0 * s)) + (-m / s) for m, s in zip(n.mean, n.std)]
    else:  # ToTensor: uint8.to(float32).div(255); Normalize: sub_(as_tensor(mean, float32)).div_(as_tensor(std))
        mean, std = torch.as_tensor(n.mean, dtype=torch.float32), torch.as_tensor(n.std, dtype=torch.float32)
        rows = [levels.div(255).sub(m).div(s) for m, s in zip(mean, std)]
    return torch.stack(rows).to(device)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """From pinned memory a host-to-GPU copy is truly asynchronous; from pageable memory CUDA may wait for the
    queued GPU work first, which would stall the host once per step."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t
