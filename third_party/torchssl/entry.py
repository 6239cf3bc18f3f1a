"""TorchSSL's FixMatch or MixMatch on one of our run folders, in its own process.

    python -m third_party.torchssl.entry --spec RUN/spec.json --run-dir RUN [--device D] [--num-workers N]

Builds TorchSSL's algorithm as its fixmatch.py or mixmatch.py main_worker does (net_builder's WideResNet, its
FixMatch or MixMatch class and train() loop, get_optimizer's weight-decay grouping, get_cosine_schedule_with_warmup,
SSL_Dataset / BasicDataset (FixMatch: weak and RandAugment(3, 5) views; MixMatch: two weak views), get_data_loader
with RandomSampler(num_samples = steps * batch)) on our arrays and our split, with the run-time patches listed in
patches.PATCHES. What differs between the two algorithms is one entry of TORCHSSL_ALGORITHMS. Writes
RUN/metrics.jsonl, RUN/result.json and RUN/log.txt in our schema (contract/); TorchSSL's own log.txt, tensorboard
files, args.json and checkpoints go to RUN/torchssl/.

The checkout is the one spec.json names (torchssl_checkout, made by the harness with checkout.py); it is verified
before the run and checked again after it. No bytecode is read from it or written (adapter.import_from_checkout).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
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
from contract.results import read_evals, truncate_metrics, write_json_atomic
from contract.runtime import StopFlag, StoppedAfter, entry_main
from contract.spec import RunFiles, RunSpec
from third_party import adapter
from third_party.torchssl import patches
from third_party.torchssl.checkout import COMMIT, URL, CheckoutError, problems, verify_checkout

SAVE_NAME = "torchssl"  # TorchSSL's save folder: RUN/torchssl
CHECKPOINT = patches.RESUME_FILE  # TorchSSL's latest_model.pth; its load_model resumes from it
TORCHSSL_NUM_WORKERS = 1  # fixmatch.py's default: 1 worker for labelled and eval batches, 4 for unlabelled ones


# How TorchSSL realises the spec, for the report's side-by-side settings (see README.md here for the sources); each
# algorithm adds its own rows (TORCHSSL_ALGORITHMS).
IMPL_SETTINGS = {
    "weak_augmentation": "flip p=0.5, reflect-pad 4 + random 32x32 crop (torchvision, PIL)",
    "labelled_sampling": "with replacement (RandomSampler)",
    "unlabelled_sampling": "with replacement over all 50,000 train images (RandomSampler)",
    "weight_decay_applies_to": "conv and linear weights (parameter names without 'bn' or 'bias')",
    "ema": "parameters only, decay as spec; BatchNorm running statistics of the live model",
    "evaluated_model": "EMA parameters with the live model's BatchNorm statistics",
    "wrn_first_block_of_groups_2_3": "conv1 sees the raw input (its bn1 is unused)",
    "conv_bias_init": "PyTorch default (uniform)",
    "resume": "reseeds the global RNGs from the spec's seed on every start: a resumed run replays the data order "
              "and augmentations of its first steps",
    "headline_statistic_upstream": "best test accuracy (here: final, median of last 20, and best, as for ours)",
}


def torch_tensor(value: float, device):
    import torch

    return torch.tensor(value, dtype=torch.float32, device=device)


@dataclass
class FixMatchStep:
    """What TorchSSL's FixMatch step shows the wrappers (patches observe_losses), filled anew every step: the
    unlabelled batch's indices (its loader), then the labelled loss and the rate the step uses, then the
    unlabelled loss with its mask."""

    train_y: Any  # (N,) int64 on the device: true labels of the unlabelled images (all train images)
    optimizer: Any
    lambda_u: float
    ulb_idx: Any = None  # (muB,) indices into the unlabelled set
    loss_x: Any = None  # 0-d: mean labelled cross-entropy
    lr: float | None = None  # the rate this step uses: the scheduler steps after the loss
    loss_u: Any = None  # 0-d: the masked unlabelled cross-entropy
    mask_rate: Any = None  # 0-d: the fraction of unlabelled images ACCEPTED (TorchSSL logs 1 - this)
    pseudo_acc: Any = None  # 0-d: accuracy of the accepted pseudo-labels

    def observe(self, module) -> None:
        patches.observe_losses(module, self.sup_loss, self.unsup_loss)

    def unlabelled_batch(self, batch) -> None:
        self.ulb_idx = batch[0]

    def sup_loss(self, loss) -> None:
        self.loss_x, self.lr = loss.detach(), self.optimizer.param_groups[0]["lr"]

    def unsup_loss(self, loss, mask_mean, select, pseudo_label) -> None:
        y = self.train_y[self.ulb_idx.to(self.train_y.device)]
        accepted = select.bool()
        self.loss_u, self.mask_rate = loss.detach(), mask_mean.detach()
        self.pseudo_acc = ((pseudo_label == y) & accepted).sum().float() / accepted.sum().clamp(min=1).float()

    def stats(self, model) -> dict:
        return {"loss": self.loss_x + self.lambda_u * self.loss_u, "loss_x": self.loss_x, "loss_u": self.loss_u,
                "mask_rate": self.mask_rate, "pseudo_acc": self.pseudo_acc}


@dataclass
class MixMatchStep:
    """What TorchSSL's MixMatch step shows the wrappers (patches observe_mixmatch), filled anew every step: the
    unlabelled batch's indices, MixUp's targets and lambda', then the labelled and unlabelled losses."""

    train_y: Any
    optimizer: Any
    args: argparse.Namespace  # its ulb_loss_ratio, ramp_up and num_train_iter ramp lambda_u
    batch_size: int  # B
    uratio: int  # mu
    ulb_idx: Any = None
    guess_acc: Any = None  # 0-d: accuracy of the guessed labels' argmax
    mix_lambda: Any = None  # 0-d: this batch's lambda' = max(lambda, 1 - lambda)
    loss_x: Any = None
    lr: float | None = None
    loss_u: Any = None  # 0-d: squared error between softmax and mixed guesses

    def observe(self, module) -> None:
        patches.observe_mixmatch(module, self.sup_loss, self.unsup_loss, self.mixed)

    def unlabelled_batch(self, batch) -> None:
        self.ulb_idx = batch[0]

    def mixed(self, targets, lam: float) -> None:
        """targets (B + 2 muB, C) = [one-hot labels; q; q]."""
        b, n_u = self.batch_size, self.batch_size * self.uratio
        guess = targets[b:b + n_u].argmax(dim=-1)  # (muB,): the guessed label of each unlabelled image
        truth = self.train_y[self.ulb_idx.to(self.train_y.device)].to(guess.device)
        self.guess_acc, self.mix_lambda = (guess == truth).float().mean(), torch_tensor(lam, guess.device)

    def sup_loss(self, per_example) -> None:
        self.loss_x = per_example.detach().mean()  # train(): sup_loss = ce_loss(...).mean()
        self.lr = self.optimizer.param_groups[0]["lr"]

    def unsup_loss(self, loss) -> None:
        self.loss_u = loss.detach()

    def stats(self, model) -> dict:
        """train() ramps lambda_u inline (models/mixmatch/mixmatch.py: rampup = float(np.clip(self.it /
        (args.ramp_up * args.num_train_iter), 0.0, 1.0))), where no wrapper sees it: the same expression, with
        self.it still this step's index here (end_of_step runs before `self.it += 1`)."""
        a = self.args
        lambda_u = a.ulb_loss_ratio * float(np.clip(model.it / (a.ramp_up * a.num_train_iter), 0.0, 1.0))
        return {"loss": self.loss_x + lambda_u * self.loss_u, "loss_x": self.loss_x, "loss_u": self.loss_u,
                "lambda_u": torch_tensor(lambda_u, self.loss_x.device), "guess_acc": self.guess_acc,
                "mix_lambda": self.mix_lambda}


@dataclass(frozen=True)
class TorchSSLAlgorithm:
    """What differs between TorchSSL's algorithms as this adapter runs them; the rest is main_worker's common wiring
    (the same lines in fixmatch.py and mixmatch.py)."""

    module: str  # the module of its class, whose module-level functions train() calls
    class_name: str
    args: Callable[[RunSpec], dict]  # its own arguments of its main script
    constructor: Callable[[argparse.Namespace], tuple]  # its class's arguments after (net_builder, num_classes, ema_m)
    dataset_alg: str  # BasicDataset's alg: what an unlabelled item holds
    set_dset: bool  # main_worker hands the unlabelled data set to the model
    own_checkpoint: bool  # the adapter writes its checkpoint dict (patch checkpoint_below_1m_steps)
    step: Callable[..., Any]  # (train_y, optimizer, args, spec) -> its per-step observer (FixMatchStep, ...)
    settings: dict[str, str]  # its rows of impl_settings


TORCHSSL_ALGORITHMS = {
    "fixmatch": TorchSSLAlgorithm(
        module="models.fixmatch.fixmatch", class_name="FixMatch",
        # hard_label True as TorchSSL's cifar10 configs, so T is unused (set to 1)
        args=lambda spec: dict(hard_label=True, T=1.0, p_cutoff=spec.threshold),
        constructor=lambda a: (a.T, a.p_cutoff, a.ulb_loss_ratio, a.hard_label),
        dataset_alg="fixmatch", set_dset=True, own_checkpoint=False,
        step=lambda train_y, optimizer, args, spec: FixMatchStep(train_y, optimizer, spec.lambda_u),
        settings={"strong_augmentation": "RandAugment(3, 5): 3 of 14 ops with replacement, each always applied, "
                                         "magnitude uniform in its range; then Cutout of side U[0, 16] px, fill "
                                         "(125, 123, 114); all of it BEFORE the flip and crop"}),
    "mixmatch": TorchSSLAlgorithm(
        module="models.mixmatch.mixmatch", class_name="MixMatch",
        args=lambda spec: dict(alpha=spec.mixup_alpha, T=spec.temperature, ramp_up=spec.ramp_up),
        constructor=lambda a: (a.T, a.ulb_loss_ratio),
        dataset_alg="mixmatch", set_dset=False, own_checkpoint=True,
        step=lambda train_y, optimizer, args, spec: MixMatchStep(train_y, optimizer, args, spec.batch_size,
                                                                 spec.uratio),
        settings={
            "mixup_lambda": "ONE lambda ~ Beta(alpha, alpha) per batch, lambda' = max(lambda, 1 - lambda)",
            "label_guessing": "K = 2 weak views; mean of the live model's softmax over them, sharpened at T; no "
                              "gradient; one train-mode pass per view, BatchNorm running statistics untouched",
            "mixup_pairing": "one shuffle over Concat(labelled, view 1, view 2), inputs and targets mixed alike",
            "batchnorm_of_the_mixed_batch": "interleaved: 1 + K mu passes of B rows, each mixing labelled and "
                                            "unlabelled rows; running statistics from the first pass only",
            "unlabelled_loss": "squared error between softmax and mixed guesses, mean over examples and classes",
            "lambda_u_ramp_up": "linear from 0 at step 0 to lambda_u at step ramp_up x steps",
        }),
}


def torchssl_args(spec: RunSpec, run_dir: Path, gpu: int | None, num_workers: int) -> argparse.Namespace:
    """fixmatch.py's or mixmatch.py's arguments (every one its parser defines) for this spec. Spec -> TorchSSL:

    steps -> num_train_iter, eval_every -> num_eval_iter (schedule: see patches spec_schedule), n_labels ->
    num_labels, batch_size, uratio, eval_batch_size, lr, momentum, weight_decay, depth, widen_factor, seed,
    num_classes, dataset: same names; lambda_u -> ulb_loss_ratio; ema_decay -> ema_m; the algorithm's own
    (TORCHSSL_ALGORITHMS args): FixMatch threshold -> p_cutoff; MixMatch mixup_alpha -> alpha, temperature -> T,
    ramp_up -> ramp_up;
    nesterov -> get_optimizer(nesterov=...) (main_worker leaves it at its default True); precision "bf16" -> amp
    (with patch amp_bf16). Fixed, as TorchSSL's cifar10 configs: FixMatch's hard_label True (T unused; set to 1),
    net WideResNet built by net_builder (not torchvision), leaky_slope 0.1, dropout 0, bn_momentum 1 - 0.999
    (set by main_worker; its WRN hard-codes BatchNorm momentum 0.001 anyway), optim SGD, clip 0,
    train_sampler RandomSampler, use_tensorboard True. One process on one device: gpu from the device string,
    world_size 1, rank 0, multiprocessing_distributed False.
    """
    return argparse.Namespace(
        save_dir=str(run_dir), save_name=SAVE_NAME, resume=False, load_path=None, overwrite=True,
        use_tensorboard=True, epoch=1,
        num_train_iter=spec.steps, num_eval_iter=spec.eval_every, num_labels=spec.n_labels,
        batch_size=spec.batch_size, uratio=spec.uratio, eval_batch_size=spec.eval_batch_size,
        **TORCHSSL_ALGORITHMS[spec.algorithm].args(spec), ema_m=spec.ema_decay, ulb_loss_ratio=spec.lambda_u,
        optim="SGD", lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
        amp=spec.precision == "bf16", clip=0.0,
        net="WideResNet", net_from_name=False, depth=spec.depth, widen_factor=spec.widen_factor, leaky_slope=0.1,
        dropout=0.0,
        data_dir="./data", dataset=spec.dataset, train_sampler="RandomSampler", num_classes=spec.num_classes,
        num_workers=num_workers,
        world_size=1, rank=0, dist_url="tcp://127.0.0.1:11111", dist_backend="nccl", seed=spec.seed, gpu=gpu,
        multiprocessing_distributed=False, distributed=False, c="",
    )


# Imported before the checkout, while their own bytecode caches may still be used (adapter.import_from_checkout).
PRELOAD = ("torch", "torchvision", "sklearn.metrics", "pandas", "torch.utils.tensorboard", "PIL.Image")


def import_torchssl(checkout: Path, algorithm: str = "fixmatch") -> SimpleNamespace:
    """TorchSSL's modules, imported from `checkout` (first on sys.path; no bytecode read from it or written);
    `algorithm`: the module of the algorithm's class (models.fixmatch.fixmatch or models.mixmatch.mixmatch)."""
    utils, train_utils, data_utils, ssl_dataset, alg = adapter.import_from_checkout(
        checkout, ["utils", "train_utils", "datasets.data_utils", "datasets.ssl_dataset",
                   TORCHSSL_ALGORITHMS[algorithm].module], preload=PRELOAD)
    return SimpleNamespace(utils=utils, train_utils=train_utils, data_utils=data_utils, ssl_dataset=ssl_dataset,
                           alg=alg)


class Hooks:
    """What TorchSSL's loop calls through the patches: batch arrivals, the end of each step, its evaluations and
    saves; its losses go to `step` (the algorithm's FixMatchStep or MixMatchStep). Cadence, statistics, timing and
    stops are the shared RunRecorder's (through adapter.StepEnd)."""

    def __init__(self, rec: RunRecorder, spec: RunSpec, save_path: Path, args, step, start_step: int,
                 wall_seconds: Callable[[], float]):
        self.rec, self.spec, self.save_path, self.args, self.step = rec, spec, save_path, args, step
        self.steps_done, self.wall_seconds = start_step, wall_seconds
        self.recorded = {r["step"] for r in read_evals(rec.run_dir)}
        self.step_end = adapter.StepEnd(rec)

    # loaders (patches.LimitedBatches) -----------------------------------------------------------------------
    def labelled_fetched(self, batch, t_request: float) -> None:
        self.rec.begin_step(at=t_request)  # the step's time starts when its batch is asked for

    def unlabelled_fetched(self, batch, t_request: float) -> None:
        self.rec.data_ready()
        self.step.unlabelled_batch(batch)  # batch[0]: (muB,) indices into the unlabelled set = all train images

    # end of step (patches.spec_schedule) --------------------------------------------------------------------
    def end_of_step(self, model) -> bool:
        """After the update, scheduler and EMA of step model.it + 1: record it; True if TorchSSL should evaluate
        now (its closing evaluation after the last step is its own)."""
        step = self.steps_done = model.it + 1

        def save() -> Path:
            model.bench_save(CHECKPOINT, str(self.save_path))  # patches.atomic_checkpoint refuses bad weights
            return self.save_path / CHECKPOINT

        def evaluate_now() -> None:  # TorchSSL would evaluate after this read, which a stop never reaches
            if step not in self.recorded:
                model.evaluate(args=self.args)

        due = self.step_end(step, self.step.stats(model), self.step.lr, save, evaluate_now)
        return due.evaluate and step != self.spec.steps

    # evaluations and saves (patches.observe_evaluate, atomic_checkpoint) -----------------------------------
    def evaluated(self, out: dict, seconds: float) -> None:
        step = self.steps_done
        if not (step % self.spec.eval_every == 0 or step == self.spec.steps) or step in self.recorded:
            return  # off the spec's schedule (TorchSSL's check after a resume), or already recorded
        self.rec.record_eval(step, {"top1": 100.0 * float(out["eval/top-1-acc"]),
                                    "top5": 100.0 * float(out["eval/top-5-acc"]), "loss": float(out["eval/loss"])},
                             f"TorchSSL evaluate, EMA weights; {seconds:.1f} s")
        self.recorded.add(step)

    def saved(self, save_name: str, step: int, seconds: float) -> None:
        if save_name == CHECKPOINT:
            adapter.write_progress(self.save_path, self.spec, step, self.rec.train_seconds, self.wall_seconds())

    def paused(self):
        return self.rec.paused()


def verify_data(lb_dset, ulb_dset, eval_dset, arrays, split: np.ndarray, eval_idx: np.ndarray) -> None:
    """Refuse to run unless TorchSSL's datasets hold exactly our images: train[split], all train, the eval set."""
    adapter.verify_data("TorchSSL", lb_dset, ulb_dset, eval_dset, arrays, split, eval_idx)


def run(spec: RunSpec, files: RunFiles, run_dir: Path, device_name: str, num_workers: int | None = None,
        stop_after: int | None = None) -> dict | None:
    """Run (or resume, or recognize as done) one run in run_dir with TorchSSL. Returns result.json's content, or
    None when stop_after=k (tests) stopped it after step k as an interruption would, with a checkpoint."""
    start = adapter.start_run(spec, files, run_dir, device_name, "torchssl", files.torchssl_checkout,
                              verify_checkout, time.perf_counter())
    if not isinstance(start, adapter.RunStart):
        return start  # done already: its result
    num_workers = files.num_workers if num_workers is None else num_workers
    num_workers = TORCHSSL_NUM_WORKERS if num_workers is None else num_workers
    device, log = start.device, start.log
    tssl = import_torchssl(start.checkout, spec.algorithm)
    if spec.dataset not in tssl.ssl_dataset.mean:
        raise ValueError(f"TorchSSL has no normalization constants for data set {spec.dataset!r}")
    os.chdir(start.save_path)  # TorchSSL writes ./data_statistics/ relative to the working directory
    args = torchssl_args(spec, start.run_dir, device.index if device.type == "cuda" else None, num_workers)
    applied = patches.applied(device.type, spec.precision, spec.bn_momentum, spec.algorithm)
    apply_precision(spec.precision)  # patch precision_as_spec

    shim = patches.cpu_device_shim(device) if "cpu_device_shim" in applied else contextlib.nullcontext()
    with shim, StopFlag() as stop:
        w = main_worker(tssl, args, spec, device, (start.arrays, start.split, start.eval_idx), start.save_path, log,
                        applied)
        rec = RunRecorder(spec, start.run_dir, log, stop, start_step=w.start_step,
                          prior_train_seconds=w.prior.get("train_seconds", 0.0), stop_after=stop_after, device=device)
        wall_seconds = lambda: w.prior.get("wall_seconds", 0.0) + time.perf_counter() - start.t_start  # noqa: E731
        step = TORCHSSL_ALGORITHMS[spec.algorithm].step(w.train_y, w.optimizer, args, spec)
        hooks = Hooks(rec, spec, start.save_path, args, step, w.start_step, wall_seconds)
        observe_and_bound(tssl, w, hooks, spec.steps - w.start_step, applied, device)
        rec.count_optimizer_steps(w.optimizer)
        try:  # ---- TorchSSL's training loop, unchanged -------------------------------------------------------
            for _ in range(args.epoch):
                w.model.train(args, logger=w.logger)
        except StoppedAfter:
            return None

    return adapter.finish_run(
        start, hooks.steps_done, rec, wall_seconds(), w.param_count, problems,
        patches=patches.described(applied, spec.algorithm),
        torchssl_url=URL, torchssl_commit=COMMIT, torchssl_args=vars(args), num_workers=num_workers,
        impl_settings={**IMPL_SETTINGS, **TORCHSSL_ALGORITHMS[spec.algorithm].settings,
                       "data_pipeline": f"PIL transforms in DataLoader workers "
                       f"({num_workers} labelled, {4 * num_workers} unlabelled)"})


@dataclass
class Worker:
    """What main_worker built that the loop and the result need."""

    model: Any  # TorchSSL's algorithm object (FixMatch or MixMatch, subclassed by patches.bench_class)
    optimizer: Any
    logger: Any
    param_count: int
    start_step: int  # steps a resumed checkpoint holds (0: a fresh run)
    train_y: Any  # (N,) int64 tensor on the device: every train image's label
    prior: dict = field(default_factory=dict)  # progress.json of earlier processes ({} for a fresh run)


def main_worker(tssl, args, spec: RunSpec, device, inputs, save_path: Path, log, applied) -> Worker:
    """fixmatch.py's (or mixmatch.py's) main_worker(), line by line, for one device: seeds, model, optimizer,
    schedule, data sets, loaders, and the resume from its checkpoint. Returns what the loop needs."""
    import torch
    import torch.backends.cudnn as cudnn

    alg = TORCHSSL_ALGORITHMS[spec.algorithm]
    arrays, split, eval_idx = inputs
    ckpt_path = save_path / CHECKPOINT
    if ckpt_path.exists() or previous_path(ckpt_path).exists():
        args.resume, args.load_path = True, str(ckpt_path)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    cudnn.deterministic = True
    tb_log = tssl.train_utils.TBLog(str(save_path), "tensorboard", use_tensorboard=args.use_tensorboard)
    logger = tssl.utils.get_logger(args.save_name, str(save_path), "INFO")
    logger.warning(f"USE GPU: {args.gpu} for training")
    Algorithm = patches.bench_class(getattr(tssl.alg, alg.class_name), own_checkpoint=alg.own_checkpoint)
    model = Algorithm(network_builder(tssl, args), args.num_classes, args.ema_m, *alg.constructor(args),
                      num_eval_iter=args.num_eval_iter, tb_log=tb_log, logger=logger)
    param_count = tssl.utils.count_parameters(model.model)
    logger.info(f"Number of Trainable Params: {param_count}")
    optimizer = set_optimizer(tssl, model, args, spec)
    if device.type == "cuda":
        torch.cuda.set_device(args.gpu)
    model.model = model.model.to(device)  # main_worker's .cuda(args.gpu), with the device as a parameter
    if "bn_momentum" in applied:
        patches.set_bn_momentum(model.model, spec.bn_momentum)
    model.ema_model = copy.deepcopy(model.model)
    logger.info(f"model_arch: {model}")
    logger.info(f"Arguments: {args}")
    write_json_atomic(save_path / "args.json", vars(args))
    cudnn.benchmark = True

    loaders = data_loaders(tssl, args, arrays, split, eval_idx, alg.dataset_alg)
    ulb_dset = loaders.pop("ulb_dset")
    if alg.set_dset:
        model.set_dset(ulb_dset)
    model.set_data_loader(loaders)
    start_step, prior = 0, {}
    if args.resume:
        restore_readable(ckpt_path, read_checkpoint, log)  # a damaged latest: the previous one put in its place
        model.load_model(args.load_path)
        start_step = model.it
        prior = adapter.read_progress(save_path, ckpt_path, spec, start_step, log)
        log(f"resuming {spec.name} from {ckpt_path} at step {start_step} of {spec.steps}")
    else:
        log(f"starting {spec.name} with TorchSSL {COMMIT[:12]}: {spec.steps} steps on {device}, {param_count:,} "
            f"parameters, {spec.precision}, num_workers {args.num_workers}; patches: {', '.join(applied)}")
    if start_step > spec.steps:
        raise ValueError(f"checkpoint {ckpt_path} holds step {start_step}, past the spec's {spec.steps}")
    truncate_metrics(save_path.parent, start_step)
    return Worker(model=model, optimizer=optimizer, logger=logger, param_count=param_count, start_step=start_step,
                  train_y=torch.as_tensor(arrays.train_y).to(device), prior=prior)


def network_builder(tssl, args):
    """main_worker's net_builder: TorchSSL's WideResNet of the arguments' depth and width."""
    args.bn_momentum = 1.0 - 0.999
    return tssl.utils.net_builder(args.net, args.net_from_name,
                                  {"first_stride": 2 if "stl" in args.dataset else 1,
                                   "depth": args.depth, "widen_factor": args.widen_factor,
                                   "leaky_slope": args.leaky_slope, "bn_momentum": args.bn_momentum,
                                   "dropRate": args.dropout, "use_embed": False, "is_remix": False})


def set_optimizer(tssl, model, args, spec: RunSpec):
    """main_worker's get_optimizer (its weight-decay grouping, Nesterov as the spec says) and cosine schedule, set on
    the algorithm object `model`; returns the optimizer."""
    optimizer = tssl.train_utils.get_optimizer(model.model, args.optim, args.lr, args.momentum, args.weight_decay,
                                               nesterov=spec.nesterov)
    scheduler = tssl.train_utils.get_cosine_schedule_with_warmup(optimizer, args.num_train_iter,
                                                                 num_warmup_steps=args.num_train_iter * 0)
    model.set_optimizer(optimizer, scheduler)
    return optimizer


def data_loaders(tssl, args, arrays, split: np.ndarray, eval_idx: np.ndarray, alg: str = "fixmatch") -> dict:
    """main_worker's data sets and loaders, on our arrays and split (patches our_arrays, our_split), checked to
    hold exactly our images; alg: BasicDataset's (its unlabelled items: FixMatch (index, weak, strong), MixMatch
    (index, weak, weak)). Returns its loader_dict plus "ulb_dset"."""
    Dataset = patches.arrays_dataset_class(tssl.ssl_dataset.SSL_Dataset, (arrays.train_x, arrays.train_y),
                                           (arrays.test_x[eval_idx], arrays.test_y[eval_idx]))
    train_dset = Dataset(args, alg=alg, name=args.dataset, train=True, num_classes=args.num_classes,
                         data_dir=args.data_dir)
    lb_dset, ulb_dset = train_dset.get_ssl_dset(args.num_labels, index=split)
    eval_dset = Dataset(args, alg=alg, name=args.dataset, train=False, num_classes=args.num_classes,
                        data_dir=args.data_dir).get_dset()
    verify_data(lb_dset, ulb_dset, eval_dset, arrays, split, eval_idx)
    get_data_loader = tssl.data_utils.get_data_loader
    return {
        "train_lb": get_data_loader(lb_dset, args.batch_size, data_sampler=args.train_sampler,
                                    num_iters=args.num_train_iter, num_workers=args.num_workers,
                                    distributed=args.distributed),
        "train_ulb": get_data_loader(ulb_dset, args.batch_size * args.uratio, data_sampler=args.train_sampler,
                                     num_iters=args.num_train_iter, num_workers=4 * args.num_workers,
                                     distributed=args.distributed),
        "eval": get_data_loader(eval_dset, args.eval_batch_size, num_workers=args.num_workers, drop_last=False),
        "ulb_dset": ulb_dset,
    }


def observe_and_bound(tssl, w: Worker, hooks: Hooks, remaining: int, applied: list[str], device) -> None:
    """The patches that observe TorchSSL's loop and bound it to the steps still to do."""
    w.model.hooks = hooks
    loaders = w.model.loader_dict
    loaders["train_lb"] = patches.LimitedBatches(loaders["train_lb"], remaining, hooks.labelled_fetched)
    loaders["train_ulb"] = patches.LimitedBatches(loaders["train_ulb"], remaining, hooks.unlabelled_fetched)
    hooks.step.observe(tssl.alg)
    if "amp_bf16" in applied:
        patches.amp_bf16(tssl.alg, device.type)


def read_checkpoint(path: Path) -> dict:
    """TorchSSL's checkpoint file, as its load_model will read it; raises if it is not a whole one."""
    return adapter.read_checkpoint(path, ("model", "ema_model", "optimizer", "scheduler", "it"))


def main(argv: list[str] | None = None) -> int:
    def add_flags(parser) -> None:
        parser.add_argument("--num-workers", type=int, default=None,
                            help=f"TorchSSL's num_workers (the unlabelled loader gets 4x); default: spec.json's "
                                 f"num_workers, else TorchSSL's {TORCHSSL_NUM_WORKERS}")

    def body(spec: RunSpec, files: RunFiles, run_dir: Path, device: str, args) -> None:
        run(spec, files, run_dir, device, args.num_workers, args.stop_after)

    return entry_main("third_party.torchssl.entry", __doc__.splitlines()[0], body, argv, add_flags,
                      expected=(CheckoutError,))


if __name__ == "__main__":
    sys.exit(main())
