"""Training entry point: python -m own_impl.train --spec RUN/spec.json --run-dir RUN [--device D] [--[no-]compile].

Reads the run folder's spec.json and the arrays it names, trains the spec's algorithm (own_impl/fixmatch.py or
own_impl/mixmatch.py) for exactly spec.steps optimizer steps, and writes metrics.jsonl, result.json, log.txt and
checkpoint.pt into the run folder (see contract/).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from contract.checkpoints import previous_path, read_with_fallback, save_rotating
from contract.recorder import RunRecorder, check_belongs, check_finite_weights, check_impl
from contract.results import append_metrics, finished_result, truncate_metrics, write_result
from contract.runtime import StopFlag, StoppedAfter, entry_main, make_log, resolve_device
from contract.spec import RunFiles, RunSpec
from own_impl import fixmatch, mixmatch
from own_impl.compile import compile_step, make_probe_fn
from own_impl.ctaugment import proximity
from own_impl.data import DeviceData, Samplers, load_device_data, normalization_table, normalize
from own_impl.device import restore_cuda_rng, use_device
from own_impl.model import WideResNet
from own_impl.optim import EMA, cosine_lr, param_groups
from own_impl.recipes import RECIPES

CHECKPOINT_FILE = "checkpoint.pt"  # and checkpoint.prev.pt, the one before it
CHECKPOINT_KEYS = ("spec_hash", "step", "model", "ema", "optimizer", "rng", "train_seconds", "wall_seconds")
FUSED_SGD_DEVICES = ("cpu", "cuda")  # where torch.optim.SGD(fused=True) exists (CPU since torch 2.4)
# The algorithms, one module each, with what the loop needs: make_batch, forward_loss, augmenter, stand_ins,
# STATISTICS, SETTINGS.
ALGORITHMS = {"fixmatch": fixmatch, "mixmatch": mixmatch}
# How this implementation realises the spec whatever the recipe, for the report's side-by-side settings (TorchSSL's
# entry writes the same keys; third_party/torchssl/README.md explains each difference). The recipe's own rows are
# in own_impl/recipes.py.
IMPL_SETTINGS = {
    "weak_augmentation": "flip p=0.5, reflect-pad 4 + random 32x32 crop (batched on the device)",
    "weight_decay_applies_to": "conv and linear weights (chosen by module type)",
    "ema": "parameters, decay as spec; BatchNorm buffers copied from the live model",
    "evaluated_model": "EMA parameters with the live model's BatchNorm statistics",
    "resume": "every RNG state and the sampler positions are restored: bit-exact on the CPU; on CUDA equal "
              "within float tolerance (cuDNN's autotuned algorithms and atomic adds may differ between processes)",
    "headline_statistic_upstream": "median of the last 20 evaluations (the paper's)",
    "data_pipeline": "uint8 data set on the device, batched tensor augmentation, no DataLoader",
}


# ---------------------------------------------------------------------------------------------------------------
# The model, one step, one evaluation


def build(spec: RunSpec, device: torch.device,
          reference_arithmetic: bool = False) -> tuple[torch.nn.Module, EMA, torch.optim.Optimizer]:
    """The live model (train mode, wired as the recipe says), its EMA copy and the SGD optimizer, freshly initialized
    from the global RNG. reference_arithmetic: SGD as the per-parameter loop and the EMA as one expression per
    tensor, the arithmetic of TorchSSL's (the identity check's exact mode; one kernel per tensor, slow on a GPU)."""
    recipe = RECIPES[spec.recipe]
    model = WideResNet(spec.num_classes, spec.depth, spec.widen_factor, bn_momentum=spec.bn_momentum,
                       wiring=recipe.wiring, conv_bias_init=recipe.conv_bias_init,
                       block_conv_bias=recipe.block_conv_bias, block_bn_eps=recipe.block_bn_eps).to(device)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    ema = EMA(model, spec.ema_decay, per_tensor=reference_arithmetic)
    # fused: one multi-tensor kernel for the whole update, the same formula as the per-parameter loop, rounded
    # differently (its vectorised body and its tail can fuse a multiply-add: ~1 ulp on some elements; the identity
    # check measures it). Parameters stay float32 (bf16 is autocast only): fused CPU SGD skipped bf16/fp16 updates
    # in torch 2.12-2.13 (pytorch#191763).
    fused = device.type in FUSED_SGD_DEVICES and not reference_arithmetic
    optimizer = torch.optim.SGD(param_groups(model, spec.weight_decay), lr=spec.lr, momentum=spec.momentum,
                                nesterov=spec.nesterov, fused=fused, foreach=False if reference_arithmetic else None)
    return model, ema, optimizer


def train_step(model: torch.nn.Module, ema: EMA, optimizer: torch.optim.Optimizer, loss_fn, inputs: tuple,
               lr: float) -> dict[str, torch.Tensor]:
    """One optimizer step: loss_fn(*inputs) (forward + the algorithm's loss, maybe compiled), backward, SGD at `lr`,
    EMA. inputs: the algorithm's make_batch (FixMatch: (x, y_x, y_u))."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, stats = loss_fn(*inputs)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    ema.update(model)
    return stats


def advance(s: "RunState", spec: RunSpec, loss_fn, inputs: tuple,
            probe_fn=None) -> tuple[dict[str, torch.Tensor], float]:
    """Optimizer step s.step + 1 of the run on `inputs`, at the schedule's rate; returns its statistics and the rate.
    With CTAugment, the EMA model's predictions on the batch's probe images (probe_fn; its weights before the step,
    as the official code runs the probe beside the training op) update the rates after the step."""
    lr = cosine_lr(spec.lr, s.step, spec.steps)
    cta = s.samplers.cta
    probe = cta.probe if cta is not None else None
    if probe is not None:
        closeness = proximity((probe_fn or make_probe_fn(s.ema.model, spec, False))(probe.images), probe.labels)
    stats = train_step(s.model, s.ema, s.optimizer, loss_fn, inputs, lr)
    if probe is not None:
        cta.update_rates(probe.policy, closeness)
        cta.probe = None
    s.step += 1
    return stats, lr


@torch.inference_mode()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, spec: RunSpec) -> dict[str, float]:
    """top-1 and top-5 accuracy (%) and mean cross-entropy of `model` (in eval mode) on uint8 images x."""
    model.eval()
    table = normalization_table(x.device, RECIPES[spec.recipe].normalization)
    totals = torch.zeros(3, device=x.device)  # top-1 hits, top-5 hits, summed cross-entropy
    for i in range(0, len(x), spec.eval_batch_size):
        xb, yb = normalize(x[i:i + spec.eval_batch_size], spec.channels_last, table), y[i:i + spec.eval_batch_size]
        logits = model(xb).float()  # (b, C); fp32 whatever the training precision, as TorchSSL evaluates
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == yb[:, None]  # (b, 5)
        totals += torch.stack([hits[:, 0].sum().float(), hits.any(dim=1).sum().float(),
                               F.cross_entropy(logits, yb, reduction="sum")])
    top1, top5, loss = totals.tolist()
    n = len(y)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n}


# ---------------------------------------------------------------------------------------------------------------
# A run's state: what a checkpoint holds


@dataclass
class RunState:
    data: DeviceData
    samplers: Samplers
    model: torch.nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    step: int = 0  # optimizer steps done
    prior_train_s: float = 0.0  # earlier processes' training time
    prior_wall_s: float = 0.0  # and their whole time
    prior_compile_s: float = 0.0  # and their compilation time

    def checkpoint(self, spec: RunSpec, train_s: float, wall_s: float, compile_s: float) -> dict:
        device = self.data.train_x.device
        return {"spec_hash": spec.hash(), "step": self.step, "model": self.model.state_dict(),
                "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": {"torch": torch.get_rng_state(),
                        # the run's own GPU only: the checkpoint resumes on any device count
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                        **self.samplers.state_dict()},
                "train_seconds": train_s, "wall_seconds": wall_s, "compile_seconds": compile_s}

    def restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        restore_cuda_rng(ckpt["rng"]["cuda"], self.data.train_x.device)
        self.samplers.load_state_dict(ckpt["rng"])
        self.step = ckpt["step"]
        self.prior_train_s, self.prior_wall_s = ckpt["train_seconds"], ckpt["wall_seconds"]
        self.prior_compile_s = ckpt.get("compile_seconds", 0.0)


def start(spec: RunSpec, files: RunFiles, run_dir: Path, device: torch.device, log) -> RunState:
    """The run's state: freshly seeded and initialized, or restored from the run folder's checkpoint."""
    use_device(spec, device)
    torch.manual_seed(spec.seed)  # the one global seeding: model initialization
    data = load_device_data(spec, files, device)
    recipe = RECIPES[spec.recipe]
    state = RunState(data, recipe.samplers(spec, data), *build(spec, device))
    path = run_dir / CHECKPOINT_FILE
    if path.exists() or previous_path(path).exists():
        ckpt, path = read_with_fallback(path, read_checkpoint, log)  # the previous one if the latest is damaged
        check_belongs(ckpt["spec_hash"], spec, path)
        state.restore(ckpt)
        log(f"resuming {spec.name} from {path} at step {state.step} of {spec.steps}")
    else:
        log(f"starting {spec.name}: {spec.steps} steps on {device}, "
            f"{sum(p.numel() for p in state.model.parameters()):,} parameters, "
            f"recipe {spec.recipe}, {spec.precision}{', channels_last' if spec.channels_last else ''}")
    truncate_metrics(run_dir, state.step)  # drop records a killed process wrote past its last checkpoint
    return state


def read_checkpoint(path: Path) -> dict:
    """A checkpoint file's content; raises if the file is not a whole checkpoint of this implementation."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise KeyError(f"no {missing} in it")
    return ckpt


def save_checkpoint(path: Path, ckpt: dict) -> None:
    """Atomically and durably; the checkpoint it replaces is kept as checkpoint.prev.pt (contract.checkpoints)."""
    save_rotating(path, lambda tmp: torch.save(ckpt, tmp))


# ---------------------------------------------------------------------------------------------------------------
# The run


def train(spec: RunSpec, files: RunFiles, run_dir: Path, device: torch.device | str,
          stop_after: int | None = None, compile: bool | None = None, compile_binding: bool = True) -> dict | None:
    """Run (or resume, or recognize as done) one run in run_dir. Returns result.json's content, or None when
    stop_after=k (tests) stopped it after step k as an interruption would, with a checkpoint.
    compile: torch.compile the augmentation and forward + loss + backward (None: own_impl.compile's policy);
    compile_binding: whether an asked-for compile that fails fails the run (else it falls back to eager)."""
    t_start = time.perf_counter()
    run_dir, device = Path(run_dir), resolve_device(str(device))
    check_impl(spec, "own")
    run_dir.mkdir(parents=True, exist_ok=True)
    done = finished_result(run_dir, spec)
    if done is not None:
        return done
    log = make_log(run_dir)
    s = start(spec, files, run_dir, device, log)
    algorithm = ALGORITHMS[spec.algorithm]
    c = compile_step(algorithm, s.model, spec, device, s.data.train_x.shape[1:], compile, log, compile_binding,
                     ema_model=s.ema.model)
    ckpt_path = run_dir / CHECKPOINT_FILE

    def wall_s() -> float:
        return s.prior_wall_s + time.perf_counter() - t_start

    with StopFlag() as stop:
        rec = RunRecorder(spec, run_dir, log, stop, start_step=s.step, prior_train_seconds=s.prior_train_s,
                          stop_after=stop_after, device=device, cuda_events=device.type == "cuda")
        rec.count_optimizer_steps(s.optimizer)
        try:
            while s.step < spec.steps:  # the one place that bounds the number of optimizer steps
                rec.begin_step()
                # FixMatch: x = [weak x; weak u; strong u], y_x, y_u; MixMatch: x = [weak x; weak u; weak u], y_x,
                # y_u, MixUp's lam and perm, the ramped lambda_u
                inputs = algorithm.make_batch(s.data, s.samplers, spec, s.step, c.augment_fn)
                rec.data_ready()
                stats, lr = advance(s, spec, c.loss_fn, inputs, c.probe_fn)
                due = rec.step_done(s.step, stats, lr)
                if due.evaluate:
                    with rec.paused():
                        rec.record_eval(s.step, evaluate(s.ema.model, s.data.eval_x, s.data.eval_y, spec),
                                        f"EMA model, {len(s.data.eval_y)} test images")
                        if s.samplers.cta is not None:  # the learnt policy, as it stands at each evaluation
                            append_metrics(run_dir, {"kind": "cta", "step": s.step,
                                                     "rates": s.samplers.cta.rate_table()})
                if due.checkpoint:
                    with rec.paused():
                        rec.check_finite(s.step)
                        check_finite_weights(s.model.parameters(), s.step, rec.last_good)
                        save_checkpoint(ckpt_path, s.checkpoint(spec, rec.train_seconds, wall_s(),
                                                                s.prior_compile_s + c.seconds))
                        rec.checkpointed(s.step, ckpt_path)
                if due.stop:
                    rec.end_if_stopping(s.step)
        except StoppedAfter:
            return None
    return write_result(
        run_dir, spec, files, log, steps=s.step, data_sha256=s.data.sha256,
        param_count=sum(p.numel() for p in s.model.parameters()), wall_seconds=wall_s(),
        train_seconds=rec.train_seconds, device=str(device), eval_images=len(s.data.eval_y),
        compiled=c.step_compiled,  # torch.compile of forward + loss + backward in the last process
        augmentation_compiled=c.augmentation_compiled,  # and of the augmentation
        compile_seconds=s.prior_compile_s + c.seconds,  # summed over processes, kept out of train_seconds
        # the recipe's rows last: where a recipe changes how the algorithm is realised (`usb` MixMatch), its row holds
        impl_settings={**IMPL_SETTINGS, **algorithm.SETTINGS, **RECIPES[spec.recipe].settings_for(spec.algorithm)},
        **({"cta_rates": s.samplers.cta.rate_table()} if s.samplers.cta is not None else {}))


def main(argv: list[str] | None = None) -> int:
    def add_flags(parser) -> None:
        import argparse

        parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                            help="torch.compile the augmentation and forward + loss (default: spec.json's "
                                 "compile, else own_impl.compile's policy)")

    def run(spec: RunSpec, files: RunFiles, run_dir: Path, device: str, args) -> None:
        if args.compile is not None:  # the flag is binding
            train(spec, files, run_dir, device, stop_after=args.stop_after, compile=args.compile)
        else:
            train(spec, files, run_dir, device, stop_after=args.stop_after, compile=files.compile,
                  compile_binding=files.compile_binding)

    return entry_main("own_impl.train", __doc__.splitlines()[0], run, argv, add_flags)


if __name__ == "__main__":
    sys.exit(main())
