"""What the TorchSSL and USB adapters share: importing a checkout without bytecode, the patch table's form, the
CPU device shim, BatchNorm momentum, bf16 autocast, checkpoints kept atomically with the previous one, the glue to
the run recorder at the end of a step, the check that their datasets hold our images, and the run's start and
finish around each one's own wiring and loop.

Imports neither torch nor a pinned repository at import time, so the patch tables built on it read anywhere.
"""
from __future__ import annotations

import contextlib
import errno
import importlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from contract.checkpoints import rotate_in
from contract.recorder import RunRecorder, check_belongs, check_impl
from contract.results import finished_result, read_json, replace_durably, write_json_atomic, write_result
from contract.runtime import NonFiniteLoss, make_log, resolve_device
from contract.spec import RunFiles, RunSpec

PROGRESS = "progress.json"  # beside an implementation's resume checkpoint: the step it holds, seconds so far


# ---------------------------------------------------------------------------------------------------------------
# the patch table


@dataclass(frozen=True)
class Patch:
    name: str
    target: str  # what of the pinned code it replaces, wraps or sets; may name {fields} filled per algorithm
    when: str  # a condition name; each adapter's `conditions` says which hold for a run
    why: str


def applied_patches(table: tuple[Patch, ...], conditions: dict[str, bool]) -> list[str]:
    """Names of the patches of `table` whose condition holds, in table order."""
    unknown = {p.when for p in table} - set(conditions)
    if unknown:
        raise KeyError(f"patch conditions {sorted(unknown)} are not decided")
    return [p.name for p in table if conditions[p.when]]


def described_patches(table: tuple[Patch, ...], names: list[str], fields: dict[str, str]) -> list[dict[str, str]]:
    """The patches `names`, as result.json lists them: name, target (its {fields} filled), why."""
    return [{"name": p.name, "target": p.target.format(**fields), "why": p.why} for p in table if p.name in names]


# ---------------------------------------------------------------------------------------------------------------
# imports from a checkout


_NO_BYTECODE_PREFIX: str | None = None


def read_no_bytecode_from_checkouts() -> str:
    """From now on in this process and its children: no bytecode is written anywhere, and none is read from beside
    a source file. sys.pycache_prefix points at an empty folder of this process's own, so Python looks for
    bytecode there only, and finds none: a .pyc planted in a checkout's __pycache__ (one whose header matches its
    source's size and mtime would otherwise run instead of the source) is never read. Modules imported later
    compile from source; import heavy dependencies first (import_from_checkout's `preload`). Returns the prefix."""
    global _NO_BYTECODE_PREFIX
    if _NO_BYTECODE_PREFIX is None:
        _NO_BYTECODE_PREFIX = tempfile.mkdtemp(prefix="fixmatch-bench-no-bytecode-")
    sys.dont_write_bytecode = True
    sys.pycache_prefix = _NO_BYTECODE_PREFIX
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # DataLoader workers and any other child process
    os.environ["PYTHONPYCACHEPREFIX"] = _NO_BYTECODE_PREFIX
    return _NO_BYTECODE_PREFIX


def import_from_checkout(checkout: Path, names: list[str], preload: tuple[str, ...] = ()) -> list:
    """The modules `names`, imported from `checkout` (its folder first on sys.path) with no bytecode read from it or
    written (read_no_bytecode_from_checkouts); each must come from the checkout. `preload`: third-party modules
    imported first, while their own bytecode caches may still be used (torch takes seconds more from source)."""
    for name in preload:
        importlib.import_module(name)
    prefix = Path(read_no_bytecode_from_checkouts()).resolve()
    checkout = Path(checkout).resolve()
    if prefix.is_relative_to(checkout):
        raise RuntimeError(f"the bytecode prefix {prefix} lies inside the checkout {checkout}")
    sys.path.insert(0, str(checkout))
    modules = [importlib.import_module(name) for name in names]
    for mod in modules:
        if not Path(mod.__file__).resolve().is_relative_to(checkout):
            raise ImportError(f"module {mod.__name__} came from {mod.__file__}, not from the checkout {checkout}")
    return modules


# ---------------------------------------------------------------------------------------------------------------
# cpu_device_shim


class WallClockEvent:
    """Stand-in for torch.cuda.Event on a CPU: record() notes the wall time; elapsed_time() is in milliseconds."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self.t: float | None = None

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: "WallClockEvent") -> float:
        return (end.t - self.t) * 1000.0

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def wait(self, stream=None) -> None:
        pass


@contextlib.contextmanager
def cpu_device_shim(device):
    """While active: Tensor.cuda / Module.cuda move to `device`, torch.cuda.Event and synchronize are stand-ins."""
    import torch

    saved = (torch.Tensor.cuda, torch.nn.Module.cuda, torch.cuda.Event, torch.cuda.synchronize)

    def tensor_cuda(self, device_index=None, non_blocking=False, memory_format=torch.preserve_format):
        return self.to(device, non_blocking=non_blocking, memory_format=memory_format)

    def module_cuda(self, device_index=None):
        return self.to(device)

    torch.Tensor.cuda, torch.nn.Module.cuda = tensor_cuda, module_cuda
    torch.cuda.Event, torch.cuda.synchronize = WallClockEvent, lambda device=None: None
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda, torch.cuda.Event, torch.cuda.synchronize = saved


# ---------------------------------------------------------------------------------------------------------------
# bn_momentum, amp_bf16


def set_bn_momentum(model, momentum: float) -> int:
    """Every BatchNorm2d of `model` gets `momentum`; returns how many there were."""
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.momentum = momentum
    return len(bns)


def amp_bf16(module, device_type: str) -> None:
    """Bind the module-level names `autocast` and `GradScaler` of `module` (both adapters' code calls `autocast()`
    and `GradScaler()` with no arguments) to bf16 autocast on `device_type` and to a disabled scaler, whose
    scale/step/update pass through: bf16 needs no loss scaling."""
    import torch

    module.autocast = lambda: torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    module.GradScaler = lambda: torch.amp.GradScaler(device_type, enabled=False)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def refuse_non_finite(model, step: int) -> None:
    """A save of non-finite weights would replace the last good checkpoint: refuse it."""
    import torch

    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise NonFiniteLoss(f"non-finite weights at step {step}; the last good checkpoint is kept")


def save_atomically(save: Callable[[str, str], None], save_name: str, save_path: str | Path,
                    keep_previous: bool) -> bool:
    """Run an implementation's own save(name, folder) into NAME.tmp, then put it in place of NAME: with
    keep_previous (the resume checkpoint), the file it replaces stays as NAME's previous_path
    (contract.checkpoints.rotate_in); else an atomic replace. False if save wrote nothing (a guard of its own). A
    save that fails (a full disk: torch says only "enforce fail at inline_container.cc") leaves no temporary file
    and is an OSError naming the checkpoint."""
    save_path = Path(save_path)
    tmp = save_path / (save_name + ".tmp")
    tmp.unlink(missing_ok=True)  # a kill's leftover is never put in place below
    try:
        save(tmp.name, str(save_path))
        if not tmp.exists():
            return False
        (rotate_in if keep_previous else replace_durably)(tmp, save_path / save_name)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        code = getattr(e, "errno", None) or errno.EIO
        why = getattr(e, "strerror", None) or f"{type(e).__name__}: {str(e).splitlines()[0][:120]}; a full disk?"
        raise OSError(code, f"cannot write the checkpoint ({why})", str(save_path / save_name)) from None
    return True


@contextlib.contextmanager
def torch_load_to(device):
    """While active, torch.load maps every tensor to `device` where the caller names no map_location."""
    import torch

    load = torch.load

    def load_to_device(f, map_location=None, *args, **kwargs):
        return load(f, device if map_location is None else map_location, *args, **kwargs)

    torch.load = load_to_device
    try:
        yield
    finally:
        torch.load = load


def read_checkpoint(path: Path, keys: tuple[str, ...], safe_globals: tuple = ()) -> dict:
    """A checkpoint file as its implementation will read it; raises unless it holds `keys`. Read with
    weights_only (a checkpoint runs no code), allowing the `safe_globals` it is known to hold besides tensors."""
    import torch

    with torch.serialization.safe_globals(list(safe_globals)):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise KeyError(f"no {missing} in it")
    return ckpt


def write_progress(save_path: Path, spec: RunSpec, step: int, train_seconds: float, wall_seconds: float) -> None:
    write_json_atomic(Path(save_path) / PROGRESS, {"spec_hash": spec.hash(), "step": step,
                                                   "train_seconds": train_seconds, "wall_seconds": wall_seconds})


def read_progress(save_path: Path, checkpoint: Path, spec: RunSpec, step: int, log) -> dict:
    """The progress file beside a resumed checkpoint (spec hash checked); {} if there is none."""
    path = Path(save_path) / PROGRESS
    if not path.exists():
        log(f"note: no {PROGRESS} beside the checkpoint; time before step {step} is not counted")
        return {}
    progress = read_json(path, "progress file")
    check_belongs(progress.get("spec_hash"), spec, checkpoint)
    if progress.get("step") != step:
        log(f"note: {PROGRESS} is for step {progress.get('step')}, the checkpoint for step {step}; times approximate")
    return progress


# ---------------------------------------------------------------------------------------------------------------
# our_split: their datasets hold our images


def verify_data(impl: str, lb_dset, ulb_dset, eval_dset, arrays, split: np.ndarray, eval_idx: np.ndarray) -> None:
    """Refuse to run unless `impl`'s datasets hold exactly our images, in order: train[split] with its labels, all
    train images, and the evaluation set with its labels. Each dataset has .data (N, 32, 32, 3) and .targets."""
    checks = [
        ("labelled images", lb_dset.data, arrays.train_x[split]),
        ("labelled labels", np.asarray(lb_dset.targets), arrays.train_y[split]),
        ("unlabelled images", ulb_dset.data, arrays.train_x),
        ("evaluation images", eval_dset.data, arrays.test_x[eval_idx]),
        ("evaluation labels", np.asarray(eval_dset.targets), arrays.test_y[eval_idx]),
    ]
    for what, held, ours in checks:
        if np.shape(held) != ours.shape or not np.array_equal(held, ours):
            raise ValueError(f"{impl}'s {what} differ from ours (shape {np.shape(held)} vs {ours.shape}); "
                             f"refusing to run")


# ---------------------------------------------------------------------------------------------------------------
# the recorder at the end of a step


class StepEnd:
    """What an adapter does after each of its implementation's steps, the same for both: record the step's
    statistics, checkpoint when due, stop when due. `save()` writes the resume checkpoint (the implementation's own
    save, made atomic; whoever saves the resume checkpoint also writes the progress file beside it) and returns its
    path; `evaluate_before_stop()`, if given, runs an evaluation that is due at a stopping step but that the
    implementation would only run after this point."""

    def __init__(self, rec: RunRecorder):
        self.rec = rec

    def __call__(self, step: int, stats: dict[str, Any], lr: float, save: Callable[[], Path],
                 evaluate_before_stop: Callable[[], None] | None = None):
        rec = self.rec
        due = rec.step_done(step, stats, lr)
        if due.checkpoint:
            with rec.paused():
                rec.check_finite(step)
                rec.checkpointed(step, save())
        if due.stop:
            if due.evaluate and evaluate_before_stop is not None:
                evaluate_before_stop()
            rec.end_if_stopping(step)
        return due


# ---------------------------------------------------------------------------------------------------------------
# the run around an implementation's own wiring and loop


@dataclass
class RunStart:
    """A run's inputs, checked, before an implementation is imported."""

    spec: RunSpec
    files: RunFiles
    run_dir: Path
    checkout: Path
    device: Any  # torch.device
    arrays: Any  # contract.arrays.DataArrays
    split: np.ndarray  # sorted labelled indices
    eval_idx: np.ndarray  # indices into the test set
    save_path: Path  # RUN/<impl>: the implementation's own files
    log: Callable[[str], None]
    t_start: float = field(default_factory=time.perf_counter)


def start_run(spec: RunSpec, files: RunFiles, run_dir: Path, device_name: str, impl: str, checkout: str | None,
              verify: Callable[[Path], Path], t_start: float) -> RunStart | dict:
    """The checks and inputs every adapter's run begins with; a finished run's result.json content instead.
    `checkout`: the spec.json field naming the implementation's checkout; `verify`: its pin's verify_checkout."""
    from contract.arrays import load_run_inputs

    run_dir = Path(run_dir).resolve()
    check_impl(spec, impl)
    done = finished_result(run_dir, spec)
    if done is not None:
        return done
    if spec.channels_last:
        raise ValueError(f"channels_last is not something {impl} does; run {impl} with --no-channels-last")
    if not checkout:
        raise ValueError(f"spec.json names no {impl} checkout ({impl}_checkout); run_all.py makes and names one")
    checkout = verify(Path(checkout))
    device = resolve_device(device_name)
    arrays, split, eval_idx = load_run_inputs(spec, files)
    save_path = run_dir / impl
    save_path.mkdir(parents=True, exist_ok=True)
    return RunStart(spec, files, run_dir, checkout, device, arrays, split, eval_idx, save_path, make_log(run_dir),
                    t_start)


def finish_run(start: RunStart, steps_done: int, rec: RunRecorder, wall_seconds: float, param_count: int,
               problems: Callable[[Path], list[str]], **impl_keys: Any) -> dict:
    """Check the step budget and the checkout after the loop; write result.json (contract/results.write_result)."""
    spec = start.spec
    if steps_done != spec.steps:  # the step budget is a contract
        raise RuntimeError(f"{spec.impl} ran to step {steps_done}, the spec says {spec.steps}")
    found = problems(start.checkout)
    if found:
        start.log(f"warning: the {spec.impl} checkout {start.checkout} changed during the run: {found[0]}")
    return write_result(start.run_dir, spec, start.files, start.log, steps=steps_done,
                        data_sha256=start.arrays.sha256, param_count=param_count, wall_seconds=wall_seconds,
                        train_seconds=rec.train_seconds, device=str(start.device), eval_images=len(start.eval_idx),
                        **{f"{spec.impl}_checkout_clean": not found}, **impl_keys)
