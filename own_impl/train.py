"""Training entry point: python -m own_impl.train --spec RUN/spec.json --run-dir RUN [--device D] [--[no-]compile].

Reads the run folder's spec.json and the arrays it names, trains FixMatch for exactly spec.steps optimizer steps,
and writes metrics.jsonl, result.json, log.txt and checkpoint.pt into the run folder (see contract/).
"""
from __future__ import annotations

import argparse
import functools
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from contract.arrays import load_run_inputs
from contract.results import (append_metrics, finished_result, replace_durably, train_log_line, train_record,
                              truncate_metrics, write_result)
from contract.runtime import NonFiniteLoss, RunInterrupted, StopFlag, make_log, resolve_device, run_entry
from contract.spec import RunFiles, RunSpec, read_spec
from own_impl.augment import (StrongParams, WeakParams, apply_strong, flip_and_shift, sample_strong_params,
                              sample_weak_params)
from own_impl.loss import fixmatch_loss
from own_impl.model import WideResNet
from own_impl.optim import EMA, cosine_lr, param_groups

CHECKPOINT_FILE = "checkpoint.pt"
# CIFAR-10 per-channel mean and std of the training pixels, in [0, 1] units (the constants TorchSSL uses).
CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
FUSED_SGD_DEVICES = ("cpu", "cuda")  # where torch.optim.SGD(fused=True) exists (CPU since torch 2.4)
# torch.compile of the augmentation and of forward + loss + backward, where neither the spec nor a flag says. It fuses
# BatchNorm, activations and the loss around the convolutions: on a 2-core CPU at B=16, mu=7, 0.83 steps/s against
# 0.65 eager, side by side (bench/own_cpu_steps.py). On a GPU it also turns the ~700 small augmentation kernels into
# a few. On the CPU only for runs of CPU_COMPILE_MIN_STEPS or more: compiling costs ~45 s there (~5 s from
# inductor's disk cache), which tests and smoke runs never win back; 1000 steps at B=16 win about 5 minutes.
CPU_COMPILE_MIN_STEPS = 1000
# How this implementation realises the spec, for the report's side-by-side settings (TorchSSL's entry writes the
# same keys).
IMPL_SETTINGS = {
    "strong_augmentation": "RandAugment as the paper's RA: 2 of 14 ops with replacement, each applied with p=0.5 at "
                           "a magnitude uniform in its range; Cutout 16x16, fill 127; after the flip and shift",
    "weak_augmentation": "flip p=0.5, reflect-pad 4 + random 32x32 crop (batched on the device)",
    "labelled_sampling": "shuffled passes over the split",
    "unlabelled_sampling": "shuffled passes over all 50,000 train images",
    "weight_decay_applies_to": "conv and linear weights (chosen by module type)",
    "ema": "parameters, decay as spec; BatchNorm buffers copied from the live model",
    "evaluated_model": "EMA parameters with the live model's BatchNorm statistics",
    "wrn_first_block_of_groups_2_3": "conv1 sees leaky_relu(bn1(x)), as the official code",
    "conv_bias_init": "zero, as the official code",
    "resume": "bit-exact: every RNG state and the sampler positions are restored",
    "headline_statistic_upstream": "median of the last 20 evaluations (the paper's)",
    "data_pipeline": "uint8 data set on the device, batched tensor augmentation, no DataLoader",
}
COMPILE_MODE = None  # torch.compile's default; "max-autotune-no-cudagraphs" and "reduce-overhead" untried on a GPU


# ---------------------------------------------------------------------------------------------------------------
# Data: the whole uint8 train set on the device, indices from local generators, augmentation batched on the device


@dataclass
class DeviceData:
    train_x: torch.Tensor  # (N, 3, 32, 32) uint8
    train_y: torch.Tensor  # (N,) int64
    labelled: np.ndarray  # (n_labels,) sorted indices into the train set
    eval_x: torch.Tensor  # (M, 3, 32, 32) uint8: the test set or its fixed subset
    eval_y: torch.Tensor  # (M,) int64
    sha256: str  # recomputed from the arrays


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


def load_device_data(spec: RunSpec, files: RunFiles, device: torch.device) -> DeviceData:
    arrays, labelled, sub = load_run_inputs(spec, files)

    def images(x: np.ndarray) -> torch.Tensor:  # (N, 32, 32, 3) HWC -> (N, 3, 32, 32) on the device
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)

    return DeviceData(images(arrays.train_x), torch.from_numpy(arrays.train_y).to(device), labelled,
                      images(arrays.test_x[sub]), torch.from_numpy(arrays.test_y[sub]).to(device), arrays.sha256)


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


def make_batch(data: DeviceData, labelled: EpochSampler, unlabelled: EpochSampler, spec: RunSpec,
               generator: torch.Generator, augment_fn=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's input: x = [weak(labelled); weak(unlabelled); strong(unlabelled)], (B + 2muB, 3, 32, 32).

    The random numbers are drawn here, from `generator`; augment_fn (default: augment_and_normalize, eager) applies
    them, so a compiled augment_fn draws exactly what the eager one does."""
    device = data.train_x.device

    def to_device(idx: torch.Tensor) -> torch.Tensor:
        # From pinned memory a host-to-GPU copy is truly asynchronous; from pageable memory CUDA may wait for the
        # queued GPU work first, which would stall the host once per step.
        return idx.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else idx

    # Unlabelled images come from all N train images, the labelled ones included (as the paper and TorchSSL).
    idx = to_device(torch.cat([labelled.next(spec.batch_size), unlabelled.next(spec.batch_size * spec.uratio)]))
    idx_x, idx_u = idx[:spec.batch_size], idx[spec.batch_size:]  # (B,), (muB,)
    x_weak, x_strong = data.train_x[idx], data.train_x[idx_u]  # (B + muB, ...), (muB, ...)
    _, _, h, w = x_weak.shape
    p_weak = sample_weak_params(len(x_weak), generator, device)
    p_strong = sample_strong_params(len(x_strong), h, w, generator, device)
    x = (augment_fn or augment_and_normalize)(x_weak, p_weak, x_strong, p_strong, normalization_table(device),
                                              spec.channels_last)
    return x, data.train_y[idx_x], data.train_y[idx_u]


def augment_and_normalize(x_weak: torch.Tensor, p_weak: WeakParams, x_strong: torch.Tensor, p_strong: StrongParams,
                          table: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 images, drawn parameters and normalization_table -> the step's float32 input [weak(x_weak);
    strong(x_strong)]. Pure: no random numbers, no host sync; make_augment_fn compiles it into a few fused kernels."""
    return normalize(torch.cat([flip_and_shift(x_weak, p_weak), apply_strong(x_strong, p_strong)]), channels_last,
                     table)


def make_augment_fn(compile: bool, mode: str | None = COMPILE_MODE):
    """augment_and_normalize, compiled as one graph if `compile`. Eager, it is about 700 small kernels per step,
    each a host-side launch on a GPU; compiled, a few fused ones. The same inputs bit for bit either way
    (tests/test_own_compile.py, tests/test_augment.py)."""
    if not compile:
        return augment_and_normalize
    return torch.compile(augment_and_normalize, mode=mode, dynamic=False, fullgraph=True)


# ---------------------------------------------------------------------------------------------------------------
# One step and one evaluation


def autocast(spec: RunSpec, device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=spec.precision == "bf16")


def build(spec: RunSpec, device: torch.device) -> tuple[torch.nn.Module, EMA, torch.optim.Optimizer]:
    """The live model (train mode), its EMA copy and the SGD optimizer, freshly initialized from the global RNG."""
    model = WideResNet(spec.num_classes, spec.depth, spec.widen_factor).to(device)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    ema = EMA(model, spec.ema_decay)
    # Weight decay on conv/linear weights only, none on biases or BatchNorm (as TorchSSL and the official code).
    # fused: one multi-tensor kernel for the whole update, same arithmetic as the per-parameter loop. Parameters stay
    # float32 (bf16 is autocast only): fused CPU SGD skipped bf16/fp16 updates in torch 2.12-2.13 (pytorch#191763).
    optimizer = torch.optim.SGD(param_groups(model, spec.weight_decay), lr=spec.lr, momentum=spec.momentum,
                                nesterov=spec.nesterov, fused=device.type in FUSED_SGD_DEVICES)
    return model, ema, optimizer


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


def use_compile(device: torch.device, choice: bool | None = None, steps: int | None = None) -> tuple[bool, bool]:
    """(compile?, was it asked for?): the choice (--[no-]compile, else spec.json's extra["compile"]), else the
    device's default (on the CPU, for runs of `steps` >= CPU_COMPILE_MIN_STEPS only). Like the device, it is how a
    run executes, not what it computes: the augmentation's pixels are the same and the step's results differ only
    within float tolerance, so it is not part of the run spec."""
    if choice is None:
        return device.type == "cuda" or (device.type == "cpu" and (steps or 0) >= CPU_COMPILE_MIN_STEPS), False
    return bool(choice), True


def make_loss_fn(model: torch.nn.Module, spec: RunSpec, compile: bool, mode: str | None = COMPILE_MODE):
    """(x, y_x, y_u) -> (loss, stats) for `model`; compiled (forward, loss and their backward) if `compile`.

    The module itself is never wrapped, so its state_dict keys stay the same with and without compilation.
    """
    def loss_fn(x: torch.Tensor, y_x: torch.Tensor, y_u: torch.Tensor):
        return forward_loss(model, x, y_x, y_u, spec)

    # dynamic=False: a run has one input shape; never trade the static kernels for shape-generic ones
    return torch.compile(loss_fn, mode=mode, dynamic=False) if compile else loss_fn


def compile_augment_warm_up(augment_fn, spec: RunSpec, image_shape: torch.Size, device: torch.device) -> float:
    """Compile augment_fn on stand-in images and parameters of the run's shapes; returns the seconds it took. The
    parameters come from a throwaway generator: the run's generators are not touched."""
    t = time.perf_counter()
    n_x, n_u = spec.batch_size, spec.batch_size * spec.uratio
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.zeros((n_x + n_u, *image_shape), dtype=torch.uint8, device=device)
    augment_fn(images, sample_weak_params(n_x + n_u, g, device), images[n_x:],
               sample_strong_params(n_u, *image_shape[1:], g, device), normalization_table(device), spec.channels_last)
    _sync(device)
    return time.perf_counter() - t


def compile_warm_up(model: torch.nn.Module, loss_fn, spec: RunSpec, image_shape: torch.Size) -> float:
    """Compile loss_fn and its backward on a stand-in batch of the run's shapes; leaves the model as it was.

    Returns the seconds it took. No random number is drawn and no parameter changes; the BatchNorm running
    statistics that the stand-in batch moved are put back.
    """
    device = next(model.parameters()).device
    t = time.perf_counter()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    n_x, n_u = spec.batch_size, spec.batch_size * spec.uratio
    x = normalize(torch.zeros((n_x + 2 * n_u, *image_shape), dtype=torch.uint8, device=device), spec.channels_last)
    try:
        loss, _ = loss_fn(x, torch.zeros(n_x, dtype=torch.int64, device=device),
                          torch.zeros(n_u, dtype=torch.int64, device=device))
        loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved)  # copies into the same tensors: the optimizer and the compiled code keep them
    _sync(device)
    return time.perf_counter() - t


def train_step(model: torch.nn.Module, ema: EMA, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y_x: torch.Tensor, y_u: torch.Tensor, spec: RunSpec, lr: float,
               loss_fn=None) -> dict[str, torch.Tensor]:
    """One optimizer step: forward and loss (loss_fn, default eager forward_loss), backward, SGD, EMA."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if loss_fn is None:
        loss, stats = forward_loss(model, x, y_x, y_u, spec)
    else:
        loss, stats = loss_fn(x, y_x, y_u)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    ema.update(model)
    return stats


@torch.inference_mode()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, spec: RunSpec) -> dict[str, float]:
    """top-1 and top-5 accuracy (%) and mean cross-entropy of `model` (in eval mode) on uint8 images x."""
    model.eval()
    totals = torch.zeros(3, device=x.device)  # top-1 hits, top-5 hits, summed cross-entropy
    for i in range(0, len(x), spec.eval_batch_size):
        xb, yb = normalize(x[i:i + spec.eval_batch_size], spec.channels_last), y[i:i + spec.eval_batch_size]
        logits = model(xb).float()  # (b, C); fp32 whatever the training precision, as TorchSSL evaluates
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == yb[:, None]  # (b, 5)
        totals += torch.stack([hits[:, 0].sum().float(), hits.any(dim=1).sum().float(),
                               F.cross_entropy(logits, yb, reduction="sum")])
    top1, top5, loss = totals.tolist()
    n = len(y)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n}


# ---------------------------------------------------------------------------------------------------------------
# Bookkeeping: timing without per-step syncs, signals, the log file, checkpoints


class StepClock:
    """Per-step marks (start, data ready, step done): CUDA events on a GPU, read only when logging; else wall time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.steps: list[list] = []

    def mark(self, new_step: bool = False) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        else:
            event = time.perf_counter()
        if new_step:
            self.steps.append([])
        self.steps[-1].append(event)

    def data_fraction(self) -> float:
        """Share of step time spent preparing data (sampling, augmentation, normalization); clears the marks."""
        if self.cuda:
            spans = [(s.elapsed_time(d), s.elapsed_time(e)) for s, d, e in self.steps]
        else:
            spans = [(d - s, e - s) for s, d, e in self.steps]
        self.steps = []
        total = sum(t for _, t in spans)
        return sum(d for d, _ in spans) / total if total > 0 else 0.0


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    replace_durably(tmp, path)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------
# The run


def train(spec: RunSpec, files: RunFiles, run_dir: Path, device: torch.device,
          stop_after: int | None = None, compile: bool | None = None) -> dict | None:
    """Run (or resume, or recognize as done) one run in run_dir. Returns result.json's content.

    stop_after=k (tests): stop after step k as an interruption would, with a checkpoint; returns None.
    compile: torch.compile the augmentation and forward + loss (None: see use_compile).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if spec.impl != "own":
        raise ValueError(f"this is the 'own' implementation; the spec says impl={spec.impl!r}")
    done = finished_result(run_dir, spec)
    if done is not None:
        return done

    log = make_log(run_dir)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # events, pinned memory and the default stream belong to this run's GPU
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest conv algorithms
    torch.manual_seed(spec.seed)  # the one global seeding: model initialization
    seeds = [int(s) for s in np.random.SeedSequence(spec.seed).generate_state(3, dtype=np.uint64)]
    data = load_device_data(spec, files, device)
    labelled = EpochSampler(data.labelled, seeds[0])
    unlabelled = EpochSampler(np.arange(len(data.train_y)), seeds[1])
    aug_gen = torch.Generator(device=device).manual_seed(seeds[2])

    model, ema, optimizer = build(spec, device)
    param_count = sum(p.numel() for p in model.parameters())
    compiled, asked = use_compile(device, compile, spec.steps)
    loss_fn, augment_fn = make_loss_fn(model, spec, compiled), make_augment_fn(compiled)

    ckpt_path = run_dir / CHECKPOINT_FILE
    step, good_step, prior_train_s, prior_wall_s, prior_compile_s = 0, None, 0.0, 0.0, 0.0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt["spec_hash"] != spec.hash():
            raise ValueError(f"checkpoint {ckpt_path} belongs to spec {ckpt['spec_hash']}, not {spec.hash()}")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        aug_gen.set_state(ckpt["rng"]["augment"])
        labelled.load_state_dict(ckpt["rng"]["labelled"])
        unlabelled.load_state_dict(ckpt["rng"]["unlabelled"])
        step = good_step = ckpt["step"]
        prior_train_s, prior_wall_s = ckpt["train_seconds"], ckpt["wall_seconds"]
        prior_compile_s = ckpt.get("compile_seconds", 0.0)
        log(f"resuming {spec.name} from {ckpt_path} at step {step} of {spec.steps}")
    else:
        log(f"starting {spec.name}: {spec.steps} steps on {device}, {param_count:,} parameters, "
            f"{spec.precision}{', channels_last' if spec.channels_last else ''}")
    truncate_metrics(run_dir, step)  # drop records a killed session wrote past its last checkpoint
    compile_s = 0.0  # this session's compilation, before the first step and apart from train_seconds
    augment_compiled = compiled
    if compiled:
        # Each part is tried on its own: a default (not asked for) that fails, e.g. no Triton or no C++ compiler,
        # falls back to eager for that part only; one that was asked for fails the run.
        def attempt(what: str, warm_up) -> bool:
            nonlocal compile_s
            t = time.perf_counter()
            try:
                warm_up()
            except Exception as e:
                if asked:
                    raise
                first_line = (str(e).splitlines() or [""])[0][:200]
                log(f"torch.compile of {what} failed ({type(e).__name__}: {first_line}); {what} runs eager")
                return False
            finally:
                compile_s += time.perf_counter() - t
            log(f"compiled {what} in {time.perf_counter() - t:.1f} s (kept out of train_seconds)")
            return True

        if not attempt("the augmentation", lambda: compile_augment_warm_up(augment_fn, spec, data.train_x.shape[1:],
                                                                           device)):
            augment_compiled, augment_fn = False, make_augment_fn(False)
        if not attempt("forward + loss + backward", lambda: compile_warm_up(model, loss_fn, spec,
                                                                            data.train_x.shape[1:])):
            compiled, loss_fn = False, make_loss_fn(model, spec, False)

    images_per_step = spec.batch_size * (1 + 2 * spec.uratio)  # images through the forward pass
    stats_acc = torch.zeros(5, device=device)  # sums over the log window: loss, loss_x, loss_u, mask, mask*pacc
    window_first = step + 1
    clock = StepClock(device)
    paused_s = 0.0  # this session's time in evaluation, checkpoints and logging, kept out of train_seconds
    t_loop = t_window = time.perf_counter()

    def train_seconds() -> float:
        return prior_train_s + (time.perf_counter() - t_loop) - paused_s

    def check_finite(upto: int) -> None:
        if not math.isfinite(float(stats_acc[0])):
            where = f"step {good_step} ({ckpt_path})" if good_step is not None else "none was written"
            raise NonFiniteLoss(f"non-finite loss between steps {window_first} and {upto}; "
                                f"stopping; last good checkpoint: {where}")

    def checkpoint(at: int) -> None:
        nonlocal good_step
        check_finite(at)
        if not bool(torch.stack([p.isfinite().all() for p in model.parameters()]).all()):
            raise NonFiniteLoss(f"non-finite weights after step {at}; stopping; last good checkpoint: step "
                                f"{good_step}")
        save_checkpoint(ckpt_path, {
            "spec_hash": spec.hash(), "step": at, "model": model.state_dict(), "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                    "augment": aug_gen.get_state(), "labelled": labelled.state_dict(),
                    "unlabelled": unlabelled.state_dict()},
            "train_seconds": train_seconds(), "wall_seconds": prior_wall_s + time.perf_counter() - t_start,
            "compile_seconds": prior_compile_s + compile_s})
        good_step = at

    with StopFlag() as stop:
        while step < spec.steps:  # the one place that bounds the number of optimizer steps
            lr = cosine_lr(spec.lr, step, spec.steps)
            clock.mark(new_step=True)
            x, y_x, y_u = make_batch(data, labelled, unlabelled, spec, aug_gen, augment_fn)
            clock.mark()
            stats = train_step(model, ema, optimizer, x, y_x, y_u, spec, lr, loss_fn)
            stats_acc += torch.stack([stats["loss"], stats["loss_x"], stats["loss_u"], stats["mask_rate"],
                                      stats["mask_rate"] * stats["pseudo_acc"]])
            clock.mark()
            step += 1
            last = step == spec.steps
            stopping = stop.signum is not None or step == stop_after

            if step % spec.log_every == 0 or last or stopping:  # a stop logs its partial window too
                s = stats_acc.tolist()  # the sync point: once per log window
                t_now = time.perf_counter()
                check_finite(step)
                n = step - window_first + 1
                record = train_record(step, n, lr, s, n * images_per_step / (t_now - t_window),
                                      clock.data_fraction(), train_seconds())
                append_metrics(run_dir, record)
                log(train_log_line(record, spec.steps))
                stats_acc.zero_()
                window_first = step + 1
                paused_s += time.perf_counter() - t_now
                t_window = time.perf_counter()

            t_pause = time.perf_counter()
            if step % spec.eval_every == 0 or last:
                check_finite(step)
                _sync(device)
                t_pause = time.perf_counter()  # queued training work is counted as training, not as pause
                ev = {"kind": "eval", "step": step, **evaluate(ema.model, data.eval_x, data.eval_y, spec)}
                append_metrics(run_dir, ev)
                log(f"eval step {step}: top1 {ev['top1']:.2f} top5 {ev['top5']:.2f} loss {ev['loss']:.4f} "
                    f"(EMA model, {len(data.eval_y)} test images)")
            if step % spec.checkpoint_every == 0 or last or stopping:
                checkpoint(step)
            pause = time.perf_counter() - t_pause
            paused_s += pause
            t_window += pause
            if stopping and stop.signum is not None:
                log(f"stopped by {signal.Signals(stop.signum).name} after step {step}; checkpoint written")
                raise RunInterrupted(stop.signum, step)
            if step == stop_after and not last:
                log(f"stopping after step {step} (stop_after); checkpoint written")
                return None

    if step != spec.steps:  # unreachable unless the loop above changes: the step budget is a contract
        raise RuntimeError(f"ran {step} steps, the spec says {spec.steps}")
    return write_result(
        run_dir, spec, log, steps=step, data_sha256=data.sha256, param_count=param_count,
        wall_seconds=prior_wall_s + time.perf_counter() - t_start, train_seconds=train_seconds(), device=str(device),
        eval_images=len(data.eval_y),
        compiled=compiled,  # torch.compile of forward + loss + backward in the last session
        augmentation_compiled=augment_compiled,  # and of the augmentation
        compile_seconds=prior_compile_s + compile_s,  # summed over sessions, kept out of train_seconds
        impl_settings=IMPL_SETTINGS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m own_impl.train", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, required=True, help="the run's spec.json")
    parser.add_argument("--run-dir", type=Path, required=True, help="the run folder (outputs go here)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: spec.json's)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the augmentation and forward + loss (default: spec.json's "
                             "extra['compile'], else on for CUDA, and on the CPU for runs of 1000 steps or more)")
    args = parser.parse_args(argv)

    def body() -> None:
        spec, files = read_spec(args.spec)
        choice = args.compile if args.compile is not None else files.extra.get("compile")
        train(spec, files, args.run_dir, resolve_device(args.device or files.device), compile=choice)

    return run_entry("own_impl.train", args.run_dir, body)


if __name__ == "__main__":
    sys.exit(main())
