"""TorchSSL's FixMatch on one of our run folders, in its own process.

    python -m third_party.torchssl.entry --spec RUN/spec.json --run-dir RUN [--device D] [--num-workers N]

Builds TorchSSL's FixMatch as its fixmatch.py main_worker does (net_builder's WideResNet, its FixMatch class and
train() loop, get_optimizer's weight-decay grouping, get_cosine_schedule_with_warmup, SSL_Dataset / BasicDataset
with RandAugment(3, 5), get_data_loader with RandomSampler(num_samples = steps * batch)) on our arrays and our
split, with the run-time patches listed in patches.PATCHES. Writes RUN/metrics.jsonl, RUN/result.json and RUN/log.txt
in our schema (contract/); TorchSSL's own log.txt, tensorboard files, args.json and checkpoints go to RUN/torchssl/.

The checkout comes from spec.json's extra["torchssl_checkout"], else the verified cached one (checkout.py); it is
verified before the run and checked again after it. Bytecode is not written, so the checkout stays clean.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import random
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from contract.arrays import load_run_inputs
from contract.results import (append_metrics, finished_result, read_evals, read_json, train_log_line, train_record,
                              truncate_metrics, write_json_atomic, write_result)
from contract.runtime import NonFiniteLoss, RunInterrupted, StopFlag, make_log, resolve_device, run_entry
from contract.spec import RunFiles, RunSpec, read_spec
from third_party.torchssl import patches
from third_party.torchssl.checkout import COMMIT, URL, CheckoutError, ensure_checkout, problems, verify_checkout

SAVE_NAME = "torchssl"  # TorchSSL's save folder: RUN/torchssl
CHECKPOINT = "latest_model.pth"  # TorchSSL's name; its load_model resumes from it
PROGRESS = "progress.json"  # beside the checkpoint: the step it holds and the seconds spent so far
TORCHSSL_NUM_WORKERS = 1  # fixmatch.py's default: 1 worker for labelled and eval batches, 4 for unlabelled ones


class StoppedAfter(Exception):
    """stop_after=k (tests): the run stopped after step k as an interruption would, with a checkpoint."""


# How TorchSSL realises the spec, for the report's side-by-side settings (see README.md here for the sources).
IMPL_SETTINGS = {
    "strong_augmentation": "RandAugment(3, 5): 3 of 14 ops with replacement, each always applied, magnitude uniform "
                           "in its range; then Cutout of side U[0, 16] px, fill (125, 123, 114); all of it BEFORE "
                           "the flip and crop",
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


def torchssl_args(spec: RunSpec, run_dir: Path, gpu: int | None, num_workers: int) -> argparse.Namespace:
    """fixmatch.py's arguments (every one its parser defines) for this spec. Spec -> TorchSSL:

    steps -> num_train_iter, eval_every -> num_eval_iter (schedule: see patches spec_schedule), n_labels ->
    num_labels, batch_size, uratio, eval_batch_size, lr, momentum, weight_decay, depth, widen_factor, seed,
    num_classes, dataset: same names; threshold -> p_cutoff; lambda_u -> ulb_loss_ratio; ema_decay -> ema_m;
    nesterov -> get_optimizer(nesterov=...) (main_worker leaves it at its default True); precision "bf16" -> amp
    (with patch amp_bf16). Fixed, as TorchSSL's cifar10 configs: hard_label True (so T is unused; set to 1),
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
        hard_label=True, T=1.0, p_cutoff=spec.threshold, ema_m=spec.ema_decay, ulb_loss_ratio=spec.lambda_u,
        optim="SGD", lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
        amp=spec.precision == "bf16", clip=0.0,
        net="WideResNet", net_from_name=False, depth=spec.depth, widen_factor=spec.widen_factor, leaky_slope=0.1,
        dropout=0.0,
        data_dir="./data", dataset=spec.dataset, train_sampler="RandomSampler", num_classes=spec.num_classes,
        num_workers=num_workers,
        world_size=1, rank=0, dist_url="tcp://127.0.0.1:11111", dist_backend="nccl", seed=spec.seed, gpu=gpu,
        multiprocessing_distributed=False, distributed=False, c="",
    )


def import_torchssl(checkout: Path) -> SimpleNamespace:
    """TorchSSL's modules, imported from `checkout` (its folder goes first on sys.path; no bytecode is written)."""
    sys.dont_write_bytecode = True
    sys.path.insert(0, str(checkout))
    import train_utils
    import utils
    import datasets.data_utils as data_utils
    import datasets.ssl_dataset as ssl_dataset
    import models.fixmatch.fixmatch as fixmatch

    for mod in (utils, train_utils, data_utils, ssl_dataset, fixmatch):
        if not Path(mod.__file__).resolve().is_relative_to(checkout.resolve()):
            raise ImportError(f"module {mod.__name__} came from {mod.__file__}, not from the checkout {checkout}")
    return SimpleNamespace(utils=utils, train_utils=train_utils, data_utils=data_utils, ssl_dataset=ssl_dataset,
                           fixmatch=fixmatch)


class Recorder:
    """The hooks TorchSSL's loop calls (through patches.py): training statistics, evaluations, checkpoints, timing.

    Timing: a step runs from the request for its labelled batch to the end-of-step read of num_eval_iter, minus
    TorchSSL's own checkpoint writes; evaluation, our checkpoints and logging fall outside, as in own_impl.
    """

    def __init__(self, spec: RunSpec, run_dir: Path, save_path: Path, log, stop: StopFlag, start_step: int,
                 prior: dict, train_y, t_start: float, stop_after: int | None = None):
        import torch

        self.torch = torch
        self.spec, self.run_dir, self.save_path, self.log, self.stop = spec, run_dir, save_path, log, stop
        self.steps_done, self.stop_after = start_step, stop_after
        self.train_s, self.prior_wall_s, self.t_start = prior.get("train_seconds", 0.0), prior.get(
            "wall_seconds", 0.0), t_start
        self.train_y = train_y  # (N,) int64 on the device: true labels of the unlabelled images, for pseudo_acc
        self.optimizer = None
        self.lambda_u = spec.lambda_u
        self.recorded = {r["step"] for r in read_evals(run_dir)}
        self.acc = None  # (5,) sums over the log window: loss, loss_x, loss_u, mask_rate, accepted-and-correct
        self.window_first, self.window_s, self.window_data_s = start_step + 1, 0.0, 0.0
        self.t_step, self.t_data, self.ckpt_s_in_step = None, None, 0.0
        self.sup = self.lr = self.unsup = self.ulb_idx = None

    # loaders (patches.LimitedBatches) -----------------------------------------------------------------------
    def labelled_fetched(self, batch, t_request: float) -> None:
        self.t_step, self.ckpt_s_in_step = t_request, 0.0

    def unlabelled_fetched(self, batch, t_request: float) -> None:
        self.t_data = time.perf_counter()
        self.ulb_idx = batch[0]  # (muB,) indices into the unlabelled set = all train images

    # losses (patches.observe_losses) ------------------------------------------------------------------------
    def sup_loss(self, loss) -> None:
        self.sup = loss.detach()
        self.lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses: the scheduler steps after it

    def unsup_loss(self, loss, mask_mean, select, pseudo_label) -> None:
        y = self.train_y[self.ulb_idx.to(self.train_y.device)]
        correct = ((pseudo_label == y) & select.bool()).float().mean()
        self.unsup = self.torch.stack([loss.detach(), mask_mean.detach(), correct])

    # end of step (patches.spec_schedule) --------------------------------------------------------------------
    def end_of_step(self, model) -> bool:
        t_end = time.perf_counter()
        spec = self.spec
        step = self.steps_done = model.it + 1
        step_s = t_end - self.t_step - self.ckpt_s_in_step
        self.train_s += step_s
        self.window_s += step_s
        self.window_data_s += self.t_data - self.t_step
        loss_u, mask, correct = self.unsup
        stats = self.torch.stack([self.sup + self.lambda_u * loss_u, self.sup, loss_u, mask, correct]).float()
        self.acc = stats if self.acc is None else self.acc + stats
        last = step == spec.steps
        stopping = self.stop.signum is not None or (step == self.stop_after and not last)
        if step % spec.log_every == 0 or last or stopping:  # a stop logs its partial window too
            self._log_train(step)
        if step % spec.checkpoint_every == 0 or last or stopping:
            if self.acc is not None and not math.isfinite(float(self.acc[0])):
                raise NonFiniteLoss(f"non-finite loss between steps {self.window_first} and {step}")
            model.save_model(CHECKPOINT, str(self.save_path))
        if stopping and self.stop.signum is not None:  # a signal during this step's save waits for the next step
            self.log(f"stopped by {signal.Signals(self.stop.signum).name} after step {step}; checkpoint written")
            raise RunInterrupted(self.stop.signum, step)
        if stopping and self.stop.signum is None:
            self.log(f"stopping after step {step} (stop_after); checkpoint written")
            raise StoppedAfter()
        return step % spec.eval_every == 0 and not last  # the last evaluation is train()'s closing one

    def _log_train(self, step: int) -> None:
        s = self.acc.tolist()
        n = step - self.window_first + 1
        if not math.isfinite(s[0]):
            raise NonFiniteLoss(f"non-finite loss between steps {self.window_first} and {step}")
        images = n * self.spec.batch_size * (1 + 2 * self.spec.uratio)  # images through the forward pass
        record = train_record(step, n, self.lr, s, images / self.window_s if self.window_s > 0 else None,
                              self.window_data_s / self.window_s if self.window_s > 0 else None, self.train_s)
        append_metrics(self.run_dir, record)
        self.log(train_log_line(record, self.spec.steps))
        self.acc = None
        self.window_first, self.window_s, self.window_data_s = step + 1, 0.0, 0.0

    # evaluations and saves (patches.observe_evaluate, atomic_checkpoint) -----------------------------------
    def evaluated(self, out: dict, seconds: float) -> None:
        step = self.steps_done
        if not (step % self.spec.eval_every == 0 or step == self.spec.steps) or step in self.recorded:
            return  # off the spec's schedule (TorchSSL's check after a resume), or already recorded
        record = {"kind": "eval", "step": step, "top1": 100.0 * float(out["eval/top-1-acc"]),
                  "top5": 100.0 * float(out["eval/top-5-acc"]), "loss": float(out["eval/loss"])}
        append_metrics(self.run_dir, record)
        self.recorded.add(step)
        self.log(f"eval step {step}: top1 {record['top1']:.2f} top5 {record['top5']:.2f} loss {record['loss']:.4f} "
                 f"(TorchSSL evaluate, EMA weights; {seconds:.1f} s)")

    def saved(self, save_name: str, step: int, seconds: float) -> None:
        self.ckpt_s_in_step += seconds
        if save_name == CHECKPOINT:
            write_json_atomic(self.save_path / PROGRESS, {
                "spec_hash": self.spec.hash(), "step": step, "train_seconds": self.train_s,
                "wall_seconds": self.wall_seconds()})

    def wall_seconds(self) -> float:
        return self.prior_wall_s + time.perf_counter() - self.t_start


def verify_data(lb_dset, ulb_dset, eval_dset, arrays, split: np.ndarray, eval_idx: np.ndarray) -> None:
    """Refuse to run unless TorchSSL's datasets hold exactly our images: train[split], all train, the eval set."""
    checks = [
        ("labelled images", lb_dset.data, arrays.train_x[split]),
        ("labelled labels", np.asarray(lb_dset.targets), arrays.train_y[split]),
        ("unlabelled images", ulb_dset.data, arrays.train_x),
        ("evaluation images", eval_dset.data, arrays.test_x[eval_idx]),
        ("evaluation labels", np.asarray(eval_dset.targets), arrays.test_y[eval_idx]),
    ]
    for what, held, ours in checks:
        if np.shape(held) != ours.shape or not np.array_equal(held, ours):
            raise ValueError(f"TorchSSL's {what} differ from ours (shape {np.shape(held)} vs {ours.shape}); "
                             f"refusing to run")


def run(spec: RunSpec, files: RunFiles, run_dir: Path, device_name: str, num_workers: int | None = None,
        stop_after: int | None = None) -> dict | None:
    """Run (or resume, or recognize as done) one run in run_dir with TorchSSL. Returns result.json's content.

    stop_after=k (tests): stop after step k as an interruption would, with a checkpoint; returns None.
    """
    t_start = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    if spec.impl != "torchssl":
        raise ValueError(f"this is the TorchSSL entry; the spec says impl={spec.impl!r}")
    done = finished_result(run_dir, spec)
    if done is not None:
        return done
    if spec.channels_last:
        raise ValueError("channels_last is not something TorchSSL does; run TorchSSL with --no-channels-last")
    if num_workers is None:
        num_workers = int(files.extra.get("num_workers", TORCHSSL_NUM_WORKERS))
    given = files.extra.get("torchssl_checkout")
    checkout = verify_checkout(Path(given)) if given else ensure_checkout()  # ensure_checkout verifies its own

    import torch
    import torch.backends.cudnn as cudnn

    device = resolve_device(device_name)
    arrays, split, eval_idx = load_run_inputs(spec, files)

    save_path = run_dir / SAVE_NAME
    save_path.mkdir(parents=True, exist_ok=True)
    log = make_log(run_dir)
    tssl = import_torchssl(checkout)
    if spec.dataset not in tssl.ssl_dataset.mean:
        raise ValueError(f"TorchSSL has no normalization constants for data set {spec.dataset!r}")
    os.chdir(save_path)  # TorchSSL writes ./data_statistics/ relative to the working directory

    gpu = device.index if device.type == "cuda" else None
    args = torchssl_args(spec, run_dir, gpu, num_workers)
    ckpt_path = save_path / CHECKPOINT
    if ckpt_path.exists():
        args.resume, args.load_path = True, str(ckpt_path)
    applied = patches.applied(device.type, spec.precision)

    shim = patches.cpu_device_shim(device) if "cpu_device_shim" in applied else contextlib.nullcontext()
    with shim, StopFlag() as stop:
        # ---- fixmatch.py main_worker(), line by line, for one device --------------------------------------
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        cudnn.deterministic = True
        tb_log = tssl.train_utils.TBLog(str(save_path), "tensorboard", use_tensorboard=args.use_tensorboard)
        logger = tssl.utils.get_logger(args.save_name, str(save_path), "INFO")
        logger.warning(f"USE GPU: {args.gpu} for training")
        args.bn_momentum = 1.0 - 0.999
        _net_builder = tssl.utils.net_builder(args.net, args.net_from_name,
                                              {"first_stride": 2 if "stl" in args.dataset else 1,
                                               "depth": args.depth, "widen_factor": args.widen_factor,
                                               "leaky_slope": args.leaky_slope, "bn_momentum": args.bn_momentum,
                                               "dropRate": args.dropout, "use_embed": False, "is_remix": False})
        FixMatch = patches.bench_fixmatch_class(tssl.fixmatch.FixMatch)
        model = FixMatch(_net_builder, args.num_classes, args.ema_m, args.T, args.p_cutoff, args.ulb_loss_ratio,
                         args.hard_label, num_eval_iter=args.num_eval_iter, tb_log=tb_log, logger=logger)
        param_count = tssl.utils.count_parameters(model.model)
        logger.info(f"Number of Trainable Params: {param_count}")
        optimizer = tssl.train_utils.get_optimizer(model.model, args.optim, args.lr, args.momentum,
                                                   args.weight_decay, nesterov=spec.nesterov)
        scheduler = tssl.train_utils.get_cosine_schedule_with_warmup(optimizer, args.num_train_iter,
                                                                     num_warmup_steps=args.num_train_iter * 0)
        model.set_optimizer(optimizer, scheduler)
        if device.type == "cuda":
            torch.cuda.set_device(args.gpu)
        model.model = model.model.to(device)  # main_worker's .cuda(args.gpu), with the device as a parameter
        model.ema_model = copy.deepcopy(model.model)
        logger.info(f"model_arch: {model}")
        logger.info(f"Arguments: {args}")
        write_json_atomic(save_path / "args.json", vars(args))
        cudnn.benchmark = True

        Dataset = patches.arrays_dataset_class(tssl.ssl_dataset.SSL_Dataset, (arrays.train_x, arrays.train_y),
                                               (arrays.test_x[eval_idx], arrays.test_y[eval_idx]))
        train_dset = Dataset(args, alg="fixmatch", name=args.dataset, train=True, num_classes=args.num_classes,
                             data_dir=args.data_dir)
        lb_dset, ulb_dset = train_dset.get_ssl_dset(args.num_labels, index=split)
        eval_dset = Dataset(args, alg="fixmatch", name=args.dataset, train=False, num_classes=args.num_classes,
                            data_dir=args.data_dir).get_dset()
        verify_data(lb_dset, ulb_dset, eval_dset, arrays, split, eval_idx)

        get_data_loader = tssl.data_utils.get_data_loader
        loader_dict = {
            "train_lb": get_data_loader(lb_dset, args.batch_size, data_sampler=args.train_sampler,
                                        num_iters=args.num_train_iter, num_workers=args.num_workers,
                                        distributed=args.distributed),
            "train_ulb": get_data_loader(ulb_dset, args.batch_size * args.uratio, data_sampler=args.train_sampler,
                                         num_iters=args.num_train_iter, num_workers=4 * args.num_workers,
                                         distributed=args.distributed),
            "eval": get_data_loader(eval_dset, args.eval_batch_size, num_workers=args.num_workers,
                                    drop_last=False),
        }
        model.set_dset(ulb_dset)
        start_step, prior = 0, {}
        if args.resume:
            model.load_model(args.load_path)
            start_step = model.it
            prior = _read_progress(save_path, spec, start_step, log)
            log(f"resuming {spec.name} from {ckpt_path} at step {start_step} of {spec.steps}")
        else:
            log(f"starting {spec.name} with TorchSSL {COMMIT[:12]}: {spec.steps} steps on {device}, "
                f"{param_count:,} parameters, {spec.precision}, num_workers {num_workers}; patches: "
                f"{', '.join(applied)}")
        if start_step > spec.steps:
            raise ValueError(f"checkpoint {ckpt_path} holds step {start_step}, past the spec's {spec.steps}")
        truncate_metrics(run_dir, start_step)

        # ---- the patches that observe and bound TorchSSL's own loop -------------------------------------
        rec = Recorder(spec, run_dir, save_path, log, stop, start_step, prior,
                       torch.as_tensor(arrays.train_y).to(device), t_start, stop_after)
        rec.optimizer = optimizer
        model.hooks = rec
        remaining = spec.steps - start_step
        loader_dict["train_lb"] = patches.LimitedBatches(loader_dict["train_lb"], remaining, rec.labelled_fetched)
        loader_dict["train_ulb"] = patches.LimitedBatches(loader_dict["train_ulb"], remaining,
                                                          rec.unlabelled_fetched)
        model.set_data_loader(loader_dict)
        patches.observe_losses(tssl.fixmatch, rec.sup_loss, rec.unsup_loss)
        if "amp_bf16" in applied:
            patches.amp_bf16(tssl.fixmatch, device.type)

        # ---- TorchSSL's training loop, unchanged -----------------------------------------------------------
        try:
            for _ in range(args.epoch):
                model.train(args, logger=logger)
        except StoppedAfter:
            return None

    if rec.steps_done != spec.steps:  # the step budget is a contract
        raise RuntimeError(f"TorchSSL ran to step {rec.steps_done}, the spec says {spec.steps}")
    found = problems(checkout)
    if found:
        log(f"warning: the TorchSSL checkout {checkout} changed during the run: {found[0]}")
    return write_result(
        run_dir, spec, log, steps=rec.steps_done, data_sha256=arrays.sha256, param_count=param_count,
        wall_seconds=rec.wall_seconds(), train_seconds=rec.train_s, device=str(device), eval_images=len(eval_idx),
        patches=[{"name": p.name, "target": p.target, "why": p.why} for p in patches.PATCHES if p.name in applied],
        torchssl_url=URL, torchssl_commit=COMMIT, torchssl_checkout_clean=not found,
        torchssl_args=vars(args), num_workers=num_workers,
        impl_settings={**IMPL_SETTINGS, "data_pipeline": f"PIL transforms in DataLoader workers "
                       f"({num_workers} labelled, {4 * num_workers} unlabelled)"})


def _read_progress(save_path: Path, spec: RunSpec, step: int, log) -> dict:
    path = save_path / PROGRESS
    if not path.exists():
        log(f"note: no {PROGRESS} beside the checkpoint; time before step {step} is not counted")
        return {}
    progress = read_json(path, "progress file")
    if progress.get("spec_hash") != spec.hash():
        raise ValueError(f"checkpoint in {save_path} belongs to spec {progress.get('spec_hash')}, not {spec.hash()}")
    if progress.get("step") != step:
        log(f"note: {PROGRESS} is for step {progress.get('step')}, the checkpoint for step {step}; times approximate")
    return progress


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m third_party.torchssl.entry", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, required=True, help="the run's spec.json")
    parser.add_argument("--run-dir", type=Path, required=True, help="the run folder (outputs go here)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: spec.json's)")
    parser.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: resume
    parser.add_argument("--num-workers", type=int, default=None,
                        help=f"TorchSSL's num_workers (the unlabelled loader gets 4x); default: spec.json's "
                             f"extra['num_workers'], else TorchSSL's {TORCHSSL_NUM_WORKERS}")
    args = parser.parse_args(argv)
    run_dir = args.run_dir.resolve()

    def body() -> None:
        spec, files = read_spec(args.spec)
        run(spec, files, run_dir, args.device or files.device, args.num_workers, args.stop_after)

    return run_entry("torchssl.entry", run_dir, body, expected=(CheckoutError,))


if __name__ == "__main__":
    sys.exit(main())
