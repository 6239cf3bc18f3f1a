"""USB's FixMatch or MixMatch on one of our run folders, in its own process.

    python -m third_party.usb.entry --spec RUN/spec.json --run-dir RUN [--device D] [--num-workers N]

Builds USB's algorithm as its train.py main_worker does (get_net_builder's WideResNet, its FixMatch or MixMatch
class with AlgorithmBase's get_cifar data sets, DistributedSampler loaders, get_optimizer, cosine schedule, and its
hooks: parameter update, EMA, evaluation, checkpoint, timing, logging) on our arrays and our split, and runs its
own AlgorithmBase.train() for exactly spec.steps optimizer steps, with the run-time patches listed in
patches.PATCHES. What differs between the two algorithms is one entry of USB_ALGORITHMS. Writes RUN/metrics.jsonl,
RUN/result.json and RUN/log.txt in our schema (contract/); USB's own log.txt, tensorboard files, args.json and
checkpoints go to RUN/usb/.

The checkout is the one spec.json names (usb_checkout, made by the harness with checkout.py); it is verified before
the run and checked again after it. No bytecode is read from it or written (adapter.import_from_checkout).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from contract.checkpoints import previous_path, restore_readable
from contract.precision import apply_precision
from contract.recorder import RunRecorder
from contract.results import truncate_metrics, write_json_atomic
from contract.runtime import StopFlag, StoppedAfter, entry_main
from contract.spec import RunFiles, RunSpec
from third_party import adapter
from third_party.usb import patches, stand_ins
from third_party.usb.checkout import COMMIT, URL, CheckoutError, problems, verify_checkout

SAVE_NAME = "usb"  # USB's save folder: RUN/usb
CHECKPOINT = patches.RESUME_FILE  # the adapter's resume checkpoint, RUN/usb/resume.pth
USB_NUM_WORKERS = 1  # its CIFAR-10 configs' num_workers: 1 for labelled and eval batches, 2 for unlabelled ones
USB_EPOCH_ITERS = 1024  # its CIFAR-10 configs: epoch 1024, num_train_iter 1048576 -> 1024 iterations per epoch
# Imported before the checkout, while their own bytecode caches may still be used (adapter.import_from_checkout).
PRELOAD = ("torch", "torchvision", "sklearn.metrics", "torch.utils.tensorboard", "PIL.Image", "yaml")


# How USB realises the spec, for the report's side-by-side settings (README.md here gives the sources); each
# algorithm adds its own rows (USB_ALGORITHMS).
IMPL_SETTINGS = {
    "weak_augmentation": "reflect-pad 4 + random 32x32 crop, then flip p=0.5 (torchvision, PIL)",
    "normalization": "ImageNet mean/std (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225)",
    "labelled_sampling": "per-epoch shuffles without replacement (randperm of the labelled set, repeated), from a "
                         "generator seeded with the epoch index, not the run's seed",
    "unlabelled_sampling": "per-epoch shuffles without replacement over all 50,000 train images, from a generator "
                           "seeded with the epoch index, not the run's seed",
    "weight_decay_applies_to": "conv and linear weights (parameters with ndim > 1; no BatchNorm, no bias)",
    "ema": "parameters only, decay as spec; BatchNorm running statistics of the live model",
    "evaluated_model": "EMA parameters with the live model's BatchNorm statistics",
    "wrn_first_block_of_groups_2_3": "conv1 sees the raw input (its bn1 is unused)",
    "wrn_conv_bias": "none in the residual blocks (the stem conv and the classifier have one)",
    "wrn_batchnorm_eps": "1e-5 in the residual blocks, 1e-3 in the final BatchNorm",
    "nesterov": "always (AlgorithmBase.set_optimizer); spec nesterov=False via patch nesterov_as_spec",
    "resume": "reseeds the global RNGs from the spec's seed on every start (augmentation draws replay); the data "
              "order continues exactly where it stopped (patch resume_mid_epoch)",
    "headline_statistic_upstream": "best test accuracy (here: final, median of last 20, and best, as for ours)",
}


@dataclass
class FixMatchStep:
    """What USB's FixMatch step shows the observers (patch observe_fixmatch), filled anew every step: the batch's
    unlabelled indices, then the mask and pseudo-labels its hooks return inside train_step."""

    train_y: Any  # (N,) int64 on the device: true labels of the unlabelled images (all train images)
    idx_ulb: Any = None  # (muB,)
    mask: Any = None  # (muB,) 1.0 where the weak view's confidence reached the threshold
    pseudo_label: Any = None  # (muB,) the weak view's argmax

    def observe(self, module) -> None:
        pass  # its losses are in USB's log_dict

    def batch(self, kwargs: dict) -> None:
        self.idx_ulb = kwargs["idx_ulb"]

    def hook_result(self, fn_name: str, out) -> None:
        if fn_name == "masking":
            self.mask = out
        elif fn_name == "gen_ulb_targets":
            self.pseudo_label = out

    def stats(self, alg) -> dict:
        """USB's own values of the step (train_step's log_dict, floats it took with .item()), and pseudo_acc."""
        import torch

        log = alg.log_dict
        accepted = self.mask.bool()
        y = self.train_y[self.idx_ulb.to(self.train_y.device)].to(self.pseudo_label.device)
        correct = ((self.pseudo_label == y) & accepted).sum().float() / accepted.sum().clamp(min=1).float()
        value = lambda k: torch.tensor(float(log[k]))  # noqa: E731
        # on the host, with USB's floats: train_step already waited for this step's results (.item())
        return {"loss": value("train/total_loss"), "loss_x": value("train/sup_loss"),
                "loss_u": value("train/unsup_loss"), "mask_rate": value("train/util_ratio"),
                "pseudo_acc": correct.cpu()}


@dataclass
class MixMatchStep:
    """What USB's MixMatch step shows the observers (patch observe_mixmatch), filled anew every step: the batch's
    unlabelled indices, then MixUp's targets and lambda'."""

    train_y: Any
    batch_size: int  # B
    uratio: int  # mu
    idx_ulb: Any = None
    guess_acc: Any = None  # 0-d: accuracy of the guessed labels' argmax
    mix_lambda: float | None = None  # lambda' = max(lambda, 1 - lambda), one per batch

    def observe(self, module) -> None:
        patches.observe_mixup(module, self.mixed)

    def batch(self, kwargs: dict) -> None:
        self.idx_ulb = kwargs["idx_ulb"]

    def hook_result(self, fn_name: str, out) -> None:
        pass

    def mixed(self, targets, lam: float) -> None:
        """targets (B + 2 muB, C) = [one-hot labels; q; q]."""
        b, n_u = self.batch_size, self.batch_size * self.uratio
        guess = targets[b:b + n_u].argmax(dim=-1)  # (muB,): the guessed label of each unlabelled image
        truth = self.train_y[self.idx_ulb.to(self.train_y.device)].to(guess.device)
        self.guess_acc, self.mix_lambda = (guess == truth).float().mean(), float(lam)

    def stats(self, alg) -> dict:
        """USB's own losses (log_dict). train_step ramps lambda_u inline (semilearn/algorithms/mixmatch/
        mixmatch.py:118-119: unsup_warmup = float(np.clip(self.it / (self.unsup_warm_up * self.num_train_iter),
        0.0, 1.0))), where no observer sees it: the same expression, self.it still this step's index here."""
        import torch

        log = alg.log_dict
        lambda_u = alg.lambda_u * float(np.clip(alg.it / (alg.unsup_warm_up * alg.num_train_iter), 0.0, 1.0))
        value = lambda x: torch.tensor(float(x))  # noqa: E731
        return {"loss": value(log["train/total_loss"]), "loss_x": value(log["train/sup_loss"]),
                "loss_u": value(log["train/unsup_loss"]), "lambda_u": value(lambda_u),
                "guess_acc": self.guess_acc.cpu(), "mix_lambda": value(self.mix_lambda)}


@dataclass(frozen=True)
class USBAlgorithm:
    """What differs between USB's algorithms as this adapter runs them; the rest is main_worker's common wiring."""

    module: str  # the module of its class, whose module-level functions train_step calls
    class_name: str
    config: str  # its CIFAR-10 config in the checkout; {n}: the label budget (40, 250 or 4000)
    args: Callable[[RunSpec], dict]  # its get_argument() arguments, from the spec
    step: Callable[..., Any]  # (train_y, spec) -> its per-step observer
    settings: dict[str, str]  # its rows of impl_settings


USB_ALGORITHMS = {
    "fixmatch": USBAlgorithm(
        module="semilearn.algorithms.fixmatch.fixmatch", class_name="FixMatch",
        config="config/classic_cv/fixmatch/fixmatch_cifar10_{n}_0.yaml",
        # hard_label True as its cifar10 configs, so T (0.5 there) is unused
        args=lambda spec: dict(hard_label=True, T=0.5, p_cutoff=spec.threshold),
        step=lambda train_y, spec: FixMatchStep(train_y),
        settings={"strong_augmentation": "reflect-pad 4 + random crop, flip, THEN RandAugment(3, 5): 3 of 14 ops "
                                         "with replacement, each always applied, magnitude uniform in its range; "
                                         "then Cutout of side U[0, 16] px, fill (125, 123, 114)"}),
    "mixmatch": USBAlgorithm(
        module="semilearn.algorithms.mixmatch.mixmatch", class_name="MixMatch",
        config="config/classic_cv/mixmatch/mixmatch_cifar10_{n}_0.yaml",
        args=lambda spec: dict(T=spec.temperature, unsup_warm_up=spec.ramp_up, mixup_alpha=spec.mixup_alpha,
                               mixup_manifold=False),
        step=lambda train_y, spec: MixMatchStep(train_y, spec.batch_size, spec.uratio),
        settings={
            "mixup_lambda": "ONE lambda ~ Beta(alpha, alpha) per batch (numpy's global RNG), lambda' = max(lambda, "
                            "1 - lambda)",
            "label_guessing": "K = 2 weak views; mean of the live model's softmax over them, sharpened at T; no "
                              "gradient; train-mode passes, BatchNorm running statistics restored",
            "extra_forward": "one train-mode pass of the labelled batch per step whose output only feeds a "
                             "feature dict (BatchNorm running statistics restored)",
            "mixup_pairing": "one shuffle over Concat(labelled, view 1, view 2), inputs and targets mixed alike",
            "batchnorm_of_the_mixed_batch": "NOT interleaved: 1 + K mu passes of B rows in order (the mixed "
                                            "labelled rows first), running statistics from the first pass only",
            "unlabelled_loss": "squared error between softmax and mixed guesses, mean over classes, then over "
                               "examples",
            "lambda_u_ramp_up": "linear from 0 at step 0 to lambda_u at step ramp_up x steps",
        }),
}


def epoch_iters(steps: int) -> int:
    """USB's iterations per epoch for `steps`: its configs' 1024 where it divides the steps, else the largest
    divisor of steps below it. train.py's main() requires num_train_iter % epoch == 0 (each epoch's sampler
    yields num_train_iter // epoch batches), and an epoch's labelled sampler materialises iterations x B indices,
    so one epoch of 2^20 steps is not an option."""
    return max(d for d in range(1, min(steps, USB_EPOCH_ITERS) + 1) if steps % d == 0)


def usb_args(spec: RunSpec, run_dir: Path, gpu: int | None, num_workers: int) -> argparse.Namespace:
    """train.py's arguments (every one its parser and the algorithm's get_argument define, plus `distributed`,
    which main() sets, and `clip`, which its YAML configs set) for this spec. Spec -> USB:

    steps -> num_train_iter, and epoch = steps / epoch_iters(steps) (1024 steps per epoch, as its configs, where
    that divides); eval_every -> num_eval_iter; n_labels -> num_labels; batch_size, uratio, eval_batch_size, lr,
    momentum, weight_decay, seed, num_classes, dataset: same names; lambda_u -> ulb_loss_ratio; ema_decay -> ema_m;
    depth, widen_factor -> net wrn_{depth}_{widen}; the algorithm's own (USB_ALGORITHMS args): FixMatch threshold ->
    p_cutoff; MixMatch mixup_alpha -> mixup_alpha, temperature -> T, ramp_up -> unsup_warm_up; precision "bf16" ->
    amp (with patch amp_bf16); nesterov: patch nesterov_as_spec. Everything else as its CIFAR-10 configs
    (config/classic_cv/{fixmatch,mixmatch}/*_cifar10_*_0.yaml): num_log_iter 256, hard_label True, T 0.5
    (FixMatch), optim SGD, layer_decay 1, clip 0, use_cat True, img_size 32, crop_ratio 0.875, train_sampler
    RandomSampler, include_lb_to_ulb True (train.py's default), no warm-up, use_tensorboard True. One process on one
    device: gpu from the device string, world_size 1, rank 0, multiprocessing_distributed False.
    """
    return argparse.Namespace(
        save_dir=str(run_dir), save_name=SAVE_NAME, resume=False, load_path=None, overwrite=True,
        use_tensorboard=True, use_wandb=False, use_aim=False,
        epoch=spec.steps // epoch_iters(spec.steps), num_train_iter=spec.steps, num_warmup_iter=0,
        num_eval_iter=spec.eval_every, num_log_iter=256, num_labels=spec.n_labels, batch_size=spec.batch_size,
        uratio=spec.uratio, eval_batch_size=spec.eval_batch_size, ema_m=spec.ema_decay,
        ulb_loss_ratio=spec.lambda_u,
        optim="SGD", lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay, layer_decay=1.0,
        net=patches.USB_NETWORKS.get((spec.depth, spec.widen_factor), f"wrn_{spec.depth}_{spec.widen_factor}"),
        net_from_name=False, use_pretrain=False, pretrain_path="",
        algorithm=spec.algorithm, use_cat=True, amp=spec.precision == "bf16", clip_grad=0.0, clip=0.0,
        imb_algorithm=None,
        data_dir="./data", dataset=spec.dataset, num_classes=spec.num_classes, train_sampler="RandomSampler",
        num_workers=num_workers, include_lb_to_ulb=True, lb_imb_ratio=1, ulb_imb_ratio=1, ulb_num_labels=None,
        img_size=32, crop_ratio=0.875, max_length=512, max_length_seconds=4.0, sample_rate=16000,
        world_size=1, rank=0, dist_url="tcp://127.0.0.1:11111", dist_backend="nccl", seed=spec.seed, gpu=gpu,
        multiprocessing_distributed=False, distributed=False, c="",
        **USB_ALGORITHMS[spec.algorithm].args(spec),
    )


# Arguments that say where and how one process runs, not what it computes: not compared with the YAML config.
PLUMBING = ("save_dir", "save_name", "resume", "load_path", "overwrite", "use_wandb", "world_size", "rank",
            "dist_url", "dist_backend", "gpu", "multiprocessing_distributed", "num_workers", "data_dir")


def config_path(checkout: Path, spec: RunSpec) -> Path:
    """USB's CIFAR-10 config for the spec's algorithm and budget; its 40-label one for other budgets (they differ
    only in num_labels and names)."""
    template = USB_ALGORITHMS[spec.algorithm].config
    path = Path(checkout) / template.format(n=spec.n_labels)
    return path if path.exists() else Path(checkout) / template.format(n=40)


def config_differences(config_file: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Where the arguments differ from USB's YAML config (read with PyYAML: plain data), plumbing aside:
    {name: {"usb_config": its value, "used": ours}}."""
    import yaml

    config = yaml.safe_load(Path(config_file).read_text())
    used = vars(args)
    return {k: {"usb_config": v, "used": used.get(k)} for k, v in sorted(config.items())
            if k not in PLUMBING and used.get(k) != v}


def import_usb(checkout: Path, algorithm: str = "fixmatch") -> SimpleNamespace:
    """USB's modules, imported from `checkout` (first on sys.path; no bytecode read from it or written) with the
    stand-ins installed (patch import_stand_ins); `algorithm`: the module of its class."""
    stand_ins.install()
    (utils, build, hooks, base, cifar, samplers, wrn, alg) = adapter.import_from_checkout(
        checkout, ["semilearn.core.utils", "semilearn.core.utils.build", "semilearn.core.hooks",
                   "semilearn.core.algorithmbase", "semilearn.datasets.cv_datasets.cifar",
                   "semilearn.datasets.samplers.sampler", "semilearn.nets.wrn.wrn", USB_ALGORITHMS[algorithm].module],
        preload=PRELOAD)
    return SimpleNamespace(utils=utils, build=build, hooks=hooks, base=base, cifar=cifar, samplers=samplers, wrn=wrn,
                           alg=alg)


class BenchHook:
    """USB's hook interface (patch bench_hook), last at every step, and the observers' callbacks (patches
    observe_*): batch arrivals, the end of each step, evaluations and saves. Cadence, statistics, timing and stops
    are the shared RunRecorder's (through adapter.StepEnd)."""

    def __init__(self, rec: RunRecorder, spec: RunSpec, save_path: Path, step, wall_seconds: Callable[[], float]):
        self.rec, self.spec, self.save_path, self.step = rec, spec, save_path, step
        self.wall_seconds = wall_seconds
        self.step_end = adapter.StepEnd(rec)
        self.steps_done: int | None = None
        self.t_request: float | None = None  # when the coming step's batch was asked for
        self.lr: float | None = None

    # USB's Hook interface (semilearn/core/hooks/hook.py) ------------------------------------------------------
    def before_run(self, alg) -> None:
        self.steps_done = alg.it
        self.t_request = time.perf_counter()

    def before_train_step(self, alg) -> None:
        # train() fetched the batches just before this call
        self.rec.begin_step(at=self.t_request)
        self.rec.data_ready()
        self.lr = alg.optimizer.param_groups[0]["lr"]  # the rate this step uses: the scheduler steps after it

    def after_train_step(self, alg) -> None:
        """After the update, scheduler, EMA and USB's own evaluation, checkpoint and logging of step alg.it + 1."""
        step = self.steps_done = alg.it + 1

        def save() -> Path:
            alg.save_model(CHECKPOINT, str(self.save_path))  # patches.atomic_checkpoint refuses bad weights
            return self.save_path / CHECKPOINT

        self.step_end(step, self.step.stats(alg), self.lr, save)
        self.t_request = time.perf_counter()

    # observers (patches.bench_class) --------------------------------------------------------------------------
    def batch(self, kwargs: dict) -> None:
        self.step.batch(kwargs)

    def hook_result(self, fn_name: str, out) -> None:
        self.step.hook_result(fn_name, out)

    def evaluated(self, step: int, out: dict, seconds: float) -> None:
        """USB's EvaluationHook evaluated after step `step` (inside after_train_step, before this hook's)."""
        self.rec.record_eval(step, {"top1": 100.0 * float(out["eval/top-1-acc"]),
                                    "top5": 100.0 * float(out["eval/top-5-acc"]), "loss": float(out["eval/loss"])},
                             f"USB evaluate, EMA weights; {seconds:.1f} s")

    def saved(self, save_name: str, step: int) -> None:
        if save_name == CHECKPOINT:
            adapter.write_progress(self.save_path, self.spec, step, self.rec.train_seconds, self.wall_seconds())

    def paused(self):
        return self.rec.paused()


def as_usb_hook(hook_base, bench: BenchHook):
    """BenchHook as an instance of USB's Hook class (register_hook asserts isinstance(hook, Hook))."""

    class UsbBenchHook(hook_base):
        def before_run(self, alg):
            bench.before_run(alg)

        def before_train_step(self, alg):
            bench.before_train_step(alg)

        def after_train_step(self, alg):
            bench.after_train_step(alg)

    return UsbBenchHook()


def run(spec: RunSpec, files: RunFiles, run_dir: Path, device_name: str, num_workers: int | None = None,
        stop_after: int | None = None) -> dict | None:
    """Run (or resume, or recognize as done) one run in run_dir with USB. Returns result.json's content, or None
    when stop_after=k (tests) stopped it after step k as an interruption would, with a checkpoint."""
    start = adapter.start_run(spec, files, run_dir, device_name, "usb", files.usb_checkout, verify_checkout,
                              time.perf_counter())
    if not isinstance(start, adapter.RunStart):
        return start  # done already: its result
    num_workers = files.num_workers if num_workers is None else num_workers
    num_workers = USB_NUM_WORKERS if num_workers is None else num_workers
    device, log = start.device, start.log
    usb = import_usb(start.checkout, spec.algorithm)
    if spec.dataset not in usb.cifar.mean:
        raise ValueError(f"USB has no normalization constants for data set {spec.dataset!r}")
    os.chdir(start.save_path)  # nothing of USB's should land where the entry was started
    args = usb_args(spec, start.run_dir, device.index if device.type == "cuda" else None, num_workers)
    applied = patches.applied(device.type, spec.precision, spec.bn_momentum, spec.algorithm, spec.nesterov,
                              (spec.depth, spec.widen_factor))
    apply_precision(spec.precision)  # patch precision_as_spec
    config = config_path(start.checkout, spec)

    shim = patches.cpu_device_shim(device) if "cpu_device_shim" in applied else contextlib.nullcontext()
    with shim, StopFlag() as stop:
        w = main_worker(usb, args, spec, device, start, applied)
        rec = RunRecorder(spec, start.run_dir, log, stop, start_step=w.start_step,
                          prior_train_seconds=w.prior.get("train_seconds", 0.0), stop_after=stop_after, device=device)
        wall_seconds = lambda: w.prior.get("wall_seconds", 0.0) + time.perf_counter() - start.t_start  # noqa: E731
        step = USB_ALGORITHMS[spec.algorithm].step(w.train_y, spec)
        step.observe(usb.alg)
        bench = BenchHook(rec, spec, start.save_path, step, wall_seconds)
        w.model.bench = bench
        w.model.register_hook(as_usb_hook(usb.hooks.Hook, bench), "BenchHook", "LOWEST")
        rec.count_optimizer_steps(w.model.optimizer)
        try:  # ---- USB's training loop and hooks, unchanged -------------------------------------------------
            w.model.train()
        except StoppedAfter:
            return None

    return adapter.finish_run(
        start, bench.steps_done, rec, wall_seconds(), w.param_count, problems,
        patches=patches.described(applied, spec.algorithm),
        usb_url=URL, usb_commit=COMMIT, usb_args=vars(args), num_workers=num_workers,
        usb_config=str(config.relative_to(start.checkout)), usb_config_overrides=config_differences(config, args),
        usb_stand_ins_used=list(stand_ins.used),
        impl_settings={**IMPL_SETTINGS, **USB_ALGORITHMS[spec.algorithm].settings,
                       "epoch": f"{epoch_iters(spec.steps)} iterations per USB epoch ({args.epoch} epochs)",
                       "data_pipeline": f"PIL transforms in DataLoader workers "
                       f"({num_workers} labelled, {2 * num_workers} unlabelled)"})


@dataclass
class Worker:
    """What main_worker built that the loop and the result need."""

    model: Any  # USB's algorithm object (FixMatch or MixMatch, subclassed by patches.bench_class)
    param_count: int
    start_step: int  # steps a resumed checkpoint holds (0: a fresh run)
    train_y: Any  # (N,) int64 tensor on the device: every train image's label
    prior: dict = field(default_factory=dict)  # progress.json of earlier processes ({} for a fresh run)


def main_worker(usb, args, spec: RunSpec, device, start: adapter.RunStart, applied: list[str]) -> Worker:
    """train.py's main_worker(), line by line, for one device: seeds, logger, network builder, the algorithm (which
    builds its data sets, loaders, optimizer and schedule), the device, and the resume from its checkpoint."""
    import torch
    import torch.backends.cudnn as cudnn

    save_path, log = start.save_path, start.log
    ckpt_path = save_path / CHECKPOINT
    if ckpt_path.exists() or previous_path(ckpt_path).exists():
        args.resume, args.load_path = True, str(ckpt_path)  # before the algorithm: its EMAHook reads args.resume
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    cudnn.deterministic = True
    cudnn.benchmark = True
    tb_log = usb.utils.TBLog(str(save_path), "tensorboard", use_tensorboard=args.use_tensorboard)
    logger = usb.utils.get_logger(args.save_name, str(save_path), "INFO")
    logger.info(f"Use GPU: {args.gpu} for training")

    # the patches the algorithm's constructor must see: it builds data sets, loaders and its GradScaler
    patches.use_our_data(usb.cifar, spec.dataset, (start.arrays.train_x, start.arrays.train_y),
                         (start.arrays.test_x[start.eval_idx], start.arrays.test_y[start.eval_idx]), start.split)
    patches.use_positioned_sampler(usb.build, usb.samplers.DistributedSampler)
    if "amp_bf16" in applied:
        patches.amp_bf16(usb.base, device.type)
    if "network_size_from_spec" in applied:
        net_builder = patches.wrn_builder(usb.wrn, spec.depth, spec.widen_factor)
    else:
        net_builder = usb.utils.get_net_builder(args.net, args.net_from_name)
    Algorithm = patches.bench_class(getattr(usb.alg, USB_ALGORITHMS[spec.algorithm].class_name))
    model = Algorithm(args=args, net_builder=net_builder, tb_log=tb_log, logger=logger)
    param_count = usb.utils.count_parameters(model.model)
    logger.info(f"Number of Trainable Params: {param_count}")
    verify_data(model.dataset_dict, start.arrays, start.split, start.eval_idx)
    if "nesterov_as_spec" in applied:
        patches.set_nesterov(model.optimizer, spec.nesterov)

    if device.type == "cuda":  # send_model_cuda for one GPU: set_device, then .cuda(args.gpu)
        torch.cuda.set_device(args.gpu)
    model.model = model.model.to(device)
    model.ema_model = model.ema_model.to(device)
    if "bn_momentum" in applied:
        patches.set_bn_momentum(model.model, spec.bn_momentum)
        patches.set_bn_momentum(model.ema_model, spec.bn_momentum)
    logger.info(f"Arguments: {model.args}")
    write_json_atomic(save_path / "args.json", vars(args))

    start_step, prior = 0, {}
    if args.resume:
        restore_readable(ckpt_path, read_checkpoint, log)  # a damaged latest: the previous one put in its place
        model.load_model(args.load_path)  # raises if it cannot: main_worker would train from step 0 instead
        start_step = model.it
        epoch, skipped = patches.resume_position(model, start_step)  # patch resume_mid_epoch
        prior = adapter.read_progress(save_path, ckpt_path, spec, start_step, log)
        log(f"resuming {spec.name} from {ckpt_path} at step {start_step} of {spec.steps} (USB epoch {epoch}, "
            f"{skipped} of its {model.num_iter_per_epoch} batches done)")
    else:
        log(f"starting {spec.name} with USB {COMMIT[:12]}: {spec.steps} steps on {device}, {param_count:,} "
            f"parameters, {spec.precision}, num_workers {args.num_workers}, {args.epoch} USB epochs of "
            f"{model.num_iter_per_epoch} steps; patches: {', '.join(applied)}")
    if start_step > spec.steps:
        raise ValueError(f"checkpoint {ckpt_path} holds step {start_step}, past the spec's {spec.steps}")
    truncate_metrics(save_path.parent, start_step)
    return Worker(model=model, param_count=param_count, start_step=start_step,
                  train_y=torch.as_tensor(start.arrays.train_y).to(device), prior=prior)


def verify_data(datasets: dict, arrays, split: np.ndarray, eval_idx: np.ndarray) -> None:
    """Refuse to run unless USB's datasets hold exactly our images: train[split], all train, the eval set."""
    adapter.verify_data("USB", datasets["train_lb"], datasets["train_ulb"], datasets["eval"], arrays, split,
                        eval_idx)


def read_checkpoint(path: Path) -> dict:
    """USB's checkpoint file, as its load_model will read it; raises if it is not a whole one."""
    return adapter.read_checkpoint(path, ("model", "ema_model", "optimizer", "loss_scaler", "it", "epoch",
                                          "best_it", "best_eval_acc"), patches.numpy_scalar_types())


def main(argv: list[str] | None = None) -> int:
    def add_flags(parser) -> None:
        parser.add_argument("--num-workers", type=int, default=None,
                            help=f"USB's num_workers (the unlabelled loader gets 2x); default: spec.json's "
                                 f"num_workers, else its CIFAR-10 configs' {USB_NUM_WORKERS}")

    def body(spec: RunSpec, files: RunFiles, run_dir: Path, device: str, args) -> None:
        run(spec, files, run_dir, device, args.num_workers, args.stop_after)

    return entry_main("third_party.usb.entry", __doc__.splitlines()[0], body, argv, add_flags,
                      expected=(CheckoutError,))


if __name__ == "__main__":
    sys.exit(main())
