"""What every entry point records the same way: when to log, evaluate and checkpoint; the log window's named
statistics (metrics.jsonl, and the same numbers as TensorBoard events); training time; the stop that ends a
process's share of a run; and the checks that a run folder belongs to this run.

A training loop calls, per step: begin_step(), data_ready(), then step_done(step, stats, lr), which writes the
training record when one is due and says what else is due (evaluate, checkpoint, stop). Evaluations, checkpoints
and logging run inside `paused()`, so training time counts training only. The statistics are whatever named 0-d
tensors a step returns; their names are shared by every implementation (so that the report and TensorBoard set them
side by side), and the one rule about names that this module holds is WEIGHTED_BY: a ratio over a subset of the
batch is averaged over a window weighted by the statistic that sizes the subset.
"""
from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from contract.results import append_metrics
from contract.runtime import NonFiniteLoss, RunInterrupted, StopFlag, StoppedAfter

HEARTBEAT_S, SUSPENDED_S = 0.5, 5.0  # a gap this long in a tick this short: the process was stopped
TENSORBOARD_DIR = "tensorboard"  # in the run folder: event files of every record, tags train/<name>, eval/<name>
# A statistic reported as a weighted mean over the window: pseudo_acc (FixMatch, every implementation) is the accuracy
# among ACCEPTED pseudo-labels, so each step's value counts with that step's accepted fraction (a window where none
# was accepted gives None).
WEIGHTED_BY = {"pseudo_acc": "mask_rate"}


@dataclass(frozen=True)
class Due:
    """What is due after a step, besides its training record."""

    evaluate: bool
    checkpoint: bool
    stop: bool  # a signal arrived, or stop_after was reached: checkpoint, then end this process's share


def check_impl(spec, impl: str) -> None:
    if spec.impl != impl:
        raise ValueError(f"this is the {impl!r} implementation's entry; the spec says impl={spec.impl!r}")


def check_belongs(found_hash: str | None, spec, path: Path) -> None:
    """A checkpoint (or its progress file) from another spec is never resumed."""
    if found_hash != spec.hash():
        raise ValueError(f"checkpoint {path} belongs to spec {found_hash}, not {spec.hash()}; move it away to start "
                         f"this run afresh")


def check_finite_weights(parameters, step: int, last_good: str) -> None:
    import torch

    if not bool(torch.stack([p.detach().isfinite().all() for p in parameters]).all()):
        raise NonFiniteLoss(f"non-finite weights after step {step}; stopping; last good checkpoint: {last_good}")


class StepClock:
    """Per-step marks (begin, data ready, done): CUDA events on a GPU, read only when logging; else wall time."""

    def __init__(self, cuda_events: bool):
        self.cuda_events = cuda_events
        self.marks: list[list] = []

    def mark(self, new_step: bool = False, at: float | None = None) -> None:
        if self.cuda_events:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
        else:
            event = time.perf_counter() if at is None else at
        if new_step:
            self.marks.append([])
        self.marks[-1].append(event)

    def data_fraction(self) -> float | None:
        """Share of step time spent preparing data; clears the marks."""
        whole = [m for m in self.marks if len(m) == 3]
        self.marks = []
        if self.cuda_events:
            spans = [(s.elapsed_time(d), s.elapsed_time(e)) for s, d, e in whole]
        else:
            spans = [(d - s, e - s) for s, d, e in whole]
        total = sum(t for _, t in spans)
        return sum(d for d, _ in spans) / total if total > 0 else None


class RunRecorder:
    """The cadence, statistics, timing and stops of one process's share of a run (see the module docstring).

    start_step: the step a resumed run starts after (0 for a fresh one); prior_train_seconds: training time of
    earlier processes. device: where the steps run; on CUDA the clock uses events and pauses first wait for the
    queued work, so that it counts as training.
    """

    def __init__(self, spec, run_dir: Path, log: Callable[[str], None], stop: StopFlag, *, start_step: int = 0,
                 prior_train_seconds: float = 0.0, stop_after: int | None = None, device=None,
                 cuda_events: bool = False):
        self.spec, self.run_dir, self.log, self.stop = spec, Path(run_dir), log, stop
        self.stop_after, self.device = stop_after, device
        self.last_good: str = "none was written"  # where the last checkpoint is, for non-finite messages
        self.clock = StepClock(cuda_events)
        self.prior_train_s, self.paused_s = prior_train_seconds, 0.0
        self._paused_since: float | None = None
        self.t_first: float | None = None  # wall time at this process's first step
        self.window_first, self.window_train_s = start_step + 1, 0.0
        self.names: list[str] | None = None
        self.sums = None  # (len(names),) tensor on the device: the window's sums (weighted ones pre-multiplied)
        self.optimizer_steps = None  # optimizer updates applied in the window, if counted (count_optimizer_steps)
        if start_step > 0:  # a resumed run says where, so a reader knows which steps a restart may have touched
            append_metrics(self.run_dir, {"kind": "resume", "step": start_step})
        self.events = event_writer(self.run_dir / TENSORBOARD_DIR, start_step, log)
        self.suspended_s = 0.0  # time this process was stopped (SIGSTOP, a suspended Slurm job) outside pauses
        threading.Thread(target=self._heartbeat, daemon=True).start()

    def count_optimizer_steps(self, optimizer) -> None:
        """Count the updates `optimizer` actually applies (a post-step hook: a step a gradient scaler skips is not
        one); each training record says how many its window applied."""
        self.optimizer_steps = 0

        def counted(*_) -> None:
            self.optimizer_steps += 1

        optimizer.register_step_post_hook(counted)

    # timing ------------------------------------------------------------------------------------------------------
    @property
    def train_seconds(self) -> float:
        if self.t_first is None:
            return self.prior_train_s
        now = self._paused_since if self._paused_since is not None else time.perf_counter()
        return self.prior_train_s + now - self.t_first - self.paused_s - self.suspended_s

    def _heartbeat(self) -> None:
        """A thread ticking every HEARTBEAT_S: a stopped process stops it too, so a gap of more than SUSPENDED_S
        between two ticks is time the process did not run, taken out of training time."""
        last = time.perf_counter()
        while True:
            time.sleep(HEARTBEAT_S)
            now = time.perf_counter()
            if now - last > SUSPENDED_S and self.t_first is not None and self._paused_since is None:
                self.suspended_s += now - last - HEARTBEAT_S
            last = now

    def begin_step(self, at: float | None = None) -> None:
        """at: when the step began (time.perf_counter()), if earlier than now (e.g. when its batch was asked for)."""
        if self.t_first is None:
            self.t_first = time.perf_counter() if at is None else at
        self.clock.mark(new_step=True, at=at)

    def data_ready(self) -> None:
        self.clock.mark()

    @contextmanager
    def paused(self):
        """Time inside is not training time (evaluation, checkpoints, logging). Nested pauses count once; before the
        first step there is no training time to take it from."""
        if self._paused_since is not None or self.t_first is None:
            yield
            return
        self._sync()
        self._paused_since = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - self._paused_since
            self._paused_since = None

    def _sync(self) -> None:
        if self.device is not None and getattr(self.device, "type", "cpu") == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    # the step ----------------------------------------------------------------------------------------------------
    def step_done(self, step: int, stats: dict[str, Any], lr: float) -> Due:
        """Add the step's statistics (0-d tensors) to the window; write the training record when due."""
        self.clock.mark()
        self._add(stats)
        spec = self.spec
        last = step == spec.steps
        stopping = self.stop.signum is not None or (step == self.stop_after and not last)
        checkpoint = step % spec.checkpoint_every == 0 or last or stopping
        # A checkpoint closes the log window too, so the training records up to a checkpoint cover exactly its steps
        # (a resume drops the records after it; counts summed over records stay exact).
        if step % spec.log_every == 0 or checkpoint:
            with self.paused():
                self._write_train_record(step, lr)
        return Due(evaluate=step % spec.eval_every == 0 or last, checkpoint=checkpoint, stop=stopping)

    def _add(self, stats: dict[str, Any]) -> None:
        import torch

        if self.names is None:
            self.names = list(stats)
        values = [stats[k] * stats[WEIGHTED_BY[k]] if k in WEIGHTED_BY else stats[k] for k in self.names]
        row = torch.stack([v.detach().float() for v in values])
        self.sums = row if self.sums is None else self.sums + row

    def _write_train_record(self, step: int, lr: float) -> None:
        n = step - self.window_first + 1
        sums = dict(zip(self.names, self.sums.tolist())) if self.sums is not None else {}  # the sync point
        self.check_finite(step, sums)
        means = {k: (v / sums[WEIGHTED_BY[k]] if sums[WEIGHTED_BY[k]] > 0 else None) if k in WEIGHTED_BY else v / n
                 for k, v in sums.items()}
        window_s = self.train_seconds - self.window_train_s
        record = {"kind": "train", "step": step, "window_steps": n, "lr": lr, **means,
                  "images_per_s": n * self.spec.images_per_step / window_s if window_s > 0 else None,
                  "data_frac": self.clock.data_fraction(),
                  "train_seconds": self.train_seconds}  # training time so far, all processes
        if self.optimizer_steps is not None:
            record["optimizer_steps"] = self.optimizer_steps
            self.optimizer_steps = 0
        append_metrics(self.run_dir, record)
        self._events("train", record)
        self.log(train_log_line(record, self.spec.steps))
        self.window_first, self.window_train_s, self.sums = step + 1, record["train_seconds"], None

    def check_finite(self, upto: int, sums: dict[str, float] | None = None) -> None:
        """The window's loss so far must be finite (read from the device unless given)."""
        if sums is None:
            if self.sums is None:
                return
            sums = dict(zip(self.names, self.sums.tolist()))
        if "loss" in sums and not math.isfinite(sums["loss"]):
            raise NonFiniteLoss(f"non-finite loss between steps {self.window_first} and {upto}; stopping; "
                                f"last good checkpoint: {self.last_good}")

    # evaluations, checkpoints, stops -----------------------------------------------------------------------------
    def record_eval(self, step: int, metrics: dict[str, float], what: str) -> dict[str, Any]:
        """metrics: top1, top5 (percent) and loss (mean cross-entropy); `what` says which model and images."""
        record = {"kind": "eval", "step": step, "top1": metrics["top1"], "top5": metrics["top5"],
                  "loss": metrics["loss"]}
        append_metrics(self.run_dir, record)
        self._events("eval", record)
        self.log(f"eval step {step}: top1 {record['top1']:.2f} top5 {record['top5']:.2f} loss {record['loss']:.4f} "
                 f"({what})")
        return record

    def _events(self, kind: str, record: dict[str, Any]) -> None:
        """The record's numbers as TensorBoard scalars, tag kind/name, at its step; flushed so a live view shows them
        (metrics.jsonl stays the source of truth)."""
        if self.events is None:
            return
        for name, value in record.items():
            if name not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.events.add_scalar(f"{kind}/{name}", value, record["step"])
        self.events.flush()

    def checkpointed(self, step: int, path: Path) -> None:
        self.last_good = f"step {step} ({path})"

    def end_if_stopping(self, step: int) -> None:
        """After a stopping step's checkpoint: a signal raises RunInterrupted, stop_after raises StoppedAfter."""
        if self.stop.signum is not None:
            self.log(f"stopped by {signal.Signals(self.stop.signum).name} after step {step}; checkpoint written")
            raise RunInterrupted(self.stop.signum, step)
        if step == self.stop_after and step != self.spec.steps:
            self.log(f"stopping after step {step} (stop_after); checkpoint written")
            raise StoppedAfter()


def event_writer(folder: Path, start_step: int, log: Callable[[str], None]):
    """A TensorBoard SummaryWriter on `folder` that drops events past start_step (a resumed run logs those steps
    again); None, with a log line, where tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        log(f"note: no TensorBoard events ({e}); metrics.jsonl has every record")
        return None
    return SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)


def train_log_line(record: dict[str, Any], total_steps: int) -> str:
    parts = [f"step {record['step']}/{total_steps}", f"lr {record['lr']:.5f}"]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    details = [f"{k.removeprefix('loss_')} {record[k]:.4f}" for k in ("loss_x", "loss_u") if k in record]
    if details:
        parts.append(f"({' '.join(details)})")
    if record.get("mask_rate") is not None:
        parts.append(f"mask_rate {record['mask_rate']:.3f}")
    if record.get("lambda_u") is not None:  # MixMatch's ramped weight of its unlabelled loss
        parts.append(f"lambda_u {record['lambda_u']:.2f}")
    parts.append(f"{record['images_per_s'] or 0:.1f} img/s data_frac {record['data_frac'] or 0:.2f}")
    return " ".join(parts)
