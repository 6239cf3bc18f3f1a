"""When and how our step is compiled: torch.compile of the augmentation and of forward + loss + backward.

The policy, stated once:
- What is compiled: the augmentation with normalization (one graph: eager, it is about 700 small kernels per step,
  each a host-side launch on a GPU) and forward + loss + backward (BatchNorm, activations and the loss fused around
  the convolutions). The module itself is never wrapped, so checkpoints look the same either way.
- When: as asked (`--compile` / `--no-compile`, carried to the run by spec.json); unasked, on CUDA always, and on
  the CPU for runs of CPU_COMPILE_MIN_STEPS steps or more, because compiling takes tens of seconds there, which
  tests and smoke runs never win back (bench/README.md has the measurements).
- Every algorithm (own_impl/fixmatch.py, own_impl/mixmatch.py) compiles the same way: its augmenter and its
  forward_loss, warmed up on its stand-in inputs.
- It is how a run executes, not what it computes: the augmented pixels are the same bit for bit and the step's
  results differ only within float tolerance (tests/test_own_compile.py), so it is not part of the run spec.
- Each part is compiled on stand-in inputs before the first step (timed apart from training). An unasked compile
  that fails (no C++ compiler, no Triton) falls back to eager for that part alone, with a line in the log; an
  asked-for one fails the run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from contract.spec import RunSpec
from own_impl.device import autocast
from own_impl.recipes import RECIPES

CPU_COMPILE_MIN_STEPS = 1000
COMPILE_MODE = None  # torch.compile's default mode


def use_compile(device: torch.device, choice: bool | None, steps: int, binding: bool = True) -> tuple[bool, bool]:
    """(compile?, must it succeed?) for a run of `steps` steps on `device`. choice None: the policy decides (a
    failure falls back); True/False: as asked, a failure failing the run unless not `binding` (benchmarks)."""
    if choice is None:
        return device.type == "cuda" or (device.type == "cpu" and steps >= CPU_COMPILE_MIN_STEPS), False
    return bool(choice), binding


def make_augment_fn(algorithm: ModuleType, recipe: str, compile: bool, mode: str | None = COMPILE_MODE):
    """The algorithm module's augment_and_normalize for the recipe, compiled as one graph if `compile`."""
    augment = algorithm.augmenter(recipe)
    if not compile:
        return augment
    return torch.compile(augment, mode=mode, dynamic=False, fullgraph=True)


def make_loss_fn(forward_loss: Callable, model: torch.nn.Module, spec: RunSpec, compile: bool,
                 mode: str | None = COMPILE_MODE):
    """inputs -> forward_loss(model, *inputs, spec), compiled (with its backward) if `compile`. inputs: the
    algorithm's make_batch (FixMatch: x, y_x, y_u)."""
    def loss_fn(*inputs: torch.Tensor):
        return forward_loss(model, *inputs, spec)

    # dynamic=False: a run has one input shape; never trade the static kernels for shape-generic ones
    return torch.compile(loss_fn, mode=mode, dynamic=False) if compile else loss_fn


def warm_up_augment(algorithm: ModuleType, augment_fn, spec: RunSpec, image_shape: torch.Size,
                    device: torch.device) -> None:
    """Compile augment_fn on stand-in images and parameters of the run's shapes (the algorithm's stand_ins), from a
    throwaway generator: the run's generators are not touched."""
    augment_args, _ = algorithm.stand_ins(spec, image_shape, device)
    augment_fn(*augment_args)


def warm_up_loss(algorithm: ModuleType, model: torch.nn.Module, loss_fn, spec: RunSpec,
                 image_shape: torch.Size) -> None:
    """Compile loss_fn and its backward on a stand-in batch of the run's shapes; leaves the model as it was: no
    random number is drawn, no parameter changes, and the BatchNorm statistics the batch moved are put back."""
    device = next(model.parameters()).device
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    _, inputs = algorithm.stand_ins(spec, image_shape, device)
    try:
        loss, _ = loss_fn(*inputs)
        loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved)  # copies into the same tensors: the optimizer and the compiled code keep them


def make_probe_fn(ema_model: torch.nn.Module, spec: RunSpec, compile: bool, mode: str | None = COMPILE_MODE):
    """CTAugment's probe: the EMA model's float32 logits on probe images, no gradient, eval mode (as the official
    code's classify op), compiled if `compile`."""
    def probe_fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(spec, x.device):
            return ema_model(x).float()

    return torch.compile(probe_fn, mode=mode, dynamic=False) if compile else probe_fn


@dataclass
class Compiled:
    """The step's parts as they will run, and what compiling them took."""

    augment_fn: Callable
    loss_fn: Callable
    augmentation_compiled: bool
    step_compiled: bool
    seconds: float  # compilation before the first step, kept out of training time
    probe_fn: Callable | None = None  # CTAugment recipes: the probe forward (compiled with the step)


def compile_step(algorithm: ModuleType, model: torch.nn.Module, spec: RunSpec, device: torch.device,
                 image_shape: torch.Size, choice: bool | None, log: Callable[[str], None],
                 binding: bool = True, ema_model: torch.nn.Module | None = None) -> Compiled:
    """The parts of `algorithm`'s step (its module), compiled or eager by the policy above, each compiled before
    the first step; the fallback. ema_model: the run's EMA model, whose probe forward a CTAugment recipe needs."""
    wanted, asked = use_compile(device, choice, spec.steps, binding)
    probe = RECIPES[spec.recipe].ctaugment and ema_model is not None
    eager = Compiled(make_augment_fn(algorithm, spec.recipe, False),
                     make_loss_fn(algorithm.forward_loss, model, spec, False), False, False, 0.0,
                     make_probe_fn(ema_model, spec, False) if probe else None)
    if not wanted:
        return eager
    out = Compiled(make_augment_fn(algorithm, spec.recipe, True),
                   make_loss_fn(algorithm.forward_loss, model, spec, True), True, True, 0.0,
                   make_probe_fn(ema_model, spec, True) if probe else None)
    parts = (("the augmentation", lambda: warm_up_augment(algorithm, out.augment_fn, spec, image_shape, device),
              "augment_fn", "augmentation_compiled"),
             ("forward + loss + backward", lambda: warm_up_loss(algorithm, model, out.loss_fn, spec, image_shape),
              "loss_fn", "step_compiled"))
    if probe:
        parts += (("the CTAugment probe", lambda: out.probe_fn(torch.zeros(
            (spec.batch_size, *image_shape), device=device)), "probe_fn", "step_compiled"),)
    for what, warm_up, fn_field, flag_field in parts:
        t = time.perf_counter()
        try:
            warm_up()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            log(f"compiled {what} in {time.perf_counter() - t:.1f} s (kept out of train_seconds)")
        except Exception as e:
            if asked:
                raise
            first_line = (str(e).splitlines() or [""])[0][:200]
            log(f"torch.compile of {what} failed ({type(e).__name__}: {first_line}); {what} runs eager")
            setattr(out, fn_field, getattr(eager, fn_field))
            setattr(out, flag_field, False)
        finally:
            out.seconds += time.perf_counter() - t
    return out
