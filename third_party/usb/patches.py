"""Every run-time change to how USB's FixMatch and MixMatch run, in one table (PATCHES), and the code of each.

USB's files are never edited. Each patch below is a subclass, a wrapper that returns USB's own result unchanged, a
module-level name bound to our data, a hook registered through USB's own register_hook, or an argument USB already
accepts. None of them touches the loss, the model's computation, the optimizer's update, the schedule, the EMA or
the augmentation. result.json lists the patches applied to each run under "patches", each target named for the
run's algorithm ({module}, {cls}: semilearn.algorithms.fixmatch.fixmatch, FixMatch; or ...mixmatch.mixmatch,
MixMatch).

This module imports neither torch nor USB at import time, so the table can be read anywhere. How USB's recipe
differs from TorchSSL's and from the paper's is in README.md here.
"""
from __future__ import annotations

import itertools
import time
import types
from pathlib import Path

import numpy as np

from third_party.adapter import (Patch, amp_bf16, applied_patches, cpu_device_shim,  # noqa: F401 (re-exported)
                                 described_patches, refuse_non_finite, save_atomically, set_bn_momentum)

RESUME_FILE = "resume.pth"  # the adapter's resume checkpoint (USB's save_model content); USB's own latest_model.pth
# and model_best.pth stay as USB writes them
USB_BN_MOMENTUM = 0.001  # semilearn/nets/wrn/wrn.py:33,37,97
USB_NETWORKS = {(28, 2): "wrn_28_2", (28, 8): "wrn_28_8"}  # semilearn/nets/wrn/wrn.py:160-171

# Patch.when: "always", "cpu" (a device without CUDA), "bf16" (spec.precision == "bf16"), "bn_momentum"
# (spec.bn_momentum is not the 0.001 USB's network hard-codes), "no_nesterov" (spec.nesterov is False),
# "network_size" (a WideResNet USB has no builder for), or an algorithm ("fixmatch", "mixmatch").
PATCHES: tuple[Patch, ...] = (
    Patch("entry_replaces_main", "train.py main() / main_worker()", "always",
          "entry.py repeats main_worker's wiring line by line for ONE device: no mp.spawn, DDP or DataParallel, "
          "and send_model_cuda (which raises 'ONLY GPU TRAINING IS SUPPORTED' without CUDA) becomes .to(device) "
          "with torch.cuda.set_device as it does for one GPU. main() is skipped: it deletes the save folder "
          "whenever resume is off. No YAML is read by USB (get_config reads it with ruamel.yaml): the arguments, "
          "every one train.py's parser and the algorithm's get_argument define, come from the spec "
          "(entry.usb_args) and are saved to RUN/usb/args.json; entry.py reads USB's CIFAR-10 YAML config with "
          "PyYAML only to list in result.json where the spec's values differ from it. A resume checkpoint that "
          "fails to load stops the run, where main_worker would log 'Fail to resume' and silently train from step "
          "0. The process runs in RUN/usb."),
    Patch("import_stand_ins", "sys.meta_path: skimage, torchaudio, timm, transformers, ruamel.yaml, wandb, aim, "
          "progress", "always",
          "semilearn/__init__.py imports every algorithm, network and data set of USB, and with them eight "
          "packages for text, speech, medical images, ViTs and experiment trackers that CIFAR FixMatch and "
          "MixMatch never call and that this project does not depend on. A meta-path finder answers exactly those "
          "names with modules whose every attribute is a stand-in raising ImportError on any use "
          "(stand_ins.py); every use is recorded, and result.json's usb_stand_ins_used shows it stayed empty."),
    Patch("our_arrays", "the torchvision name in semilearn.datasets.cv_datasets.cifar (get_cifar)", "always",
          "get_cifar reads torchvision.datasets.CIFAR10(data_dir, train=..., download=True), which cannot run "
          "offline and would not be the pixels the other implementations see. Its module's torchvision name is "
          "bound to a namespace whose datasets.CIFAR10 holds our cached uint8 arrays (train: all images; test: "
          "the spec's test set or fixed subset). get_cifar's transforms, BasicDataset and RandAugment(3, 5) are "
          "unchanged."),
    Patch("our_split", "the split_ssl_data name in semilearn.datasets.cv_datasets.cifar", "always",
          "The labelled indices come from our split file instead of sample_labeled_unlabeled_data, which draws "
          "them with np.random.shuffle per class from the global numpy state and writes .npy files into the "
          "checkout (data/cifar10/labeled_idx/). The unlabelled set is all training images in their order (USB's "
          "include_lb_to_ulb=True gives the same set with the labelled ones first). entry.py then checks that "
          "the datasets USB built hold exactly our images and refuses to run otherwise."),
    Patch("resume_mid_epoch", "name2sampler['RandomSampler'] in semilearn.core.utils.build; "
          "AlgorithmBase.start_epoch after load_model", "always",
          "USB's load_model restarts at the epoch after the checkpoint's (start_epoch = its epoch + 1): the rest "
          "of a mid-epoch checkpoint's epoch is skipped, so the run ends short of num_train_iter (with one epoch, "
          "no step is taken at all). The sampler is a subclass of USB's DistributedSampler that yields USB's own "
          "indices unchanged, except that in the first epoch after a resume it leaves out the batches the "
          "checkpoint already trained on; start_epoch is set to it // iterations_per_epoch. The resumed run sees "
          "exactly the data order of an uninterrupted one and stops at exactly spec.steps."),
    Patch("bench_hook", "AlgorithmBase.register_hook(BenchHook, 'BenchHook', 'LOWEST')", "always",
          "A hook of USB's own kind, called last at each step (after the update, scheduler, EMA, USB's "
          "evaluation, checkpoint and logging hooks): it records the step's statistics into metrics.jsonl every "
          "log_every steps, writes the resume checkpoint RUN/usb/resume.pth (USB's own save_model) every "
          "checkpoint_every steps, on a stop and at the last step, and stops the run on a signal. USB's own "
          "latest_model.pth and model_best.pth at its evaluation steps are written as it writes them."),
    Patch("observe_fixmatch", "{cls}.process_batch / {cls}.call_hook (subclass)", "fixmatch",
          "Pass-through overrides keep the unlabelled batch's indices (train_step does not take idx_ulb) and the "
          "results of the MaskingHook and PseudoLabelingHook calls train_step makes, to compute pseudo_acc (the "
          "accuracy of the accepted pseudo-labels). The losses and mask_rate are USB's own log_dict values "
          "(its util_ratio is the ACCEPTED fraction, as our mask_rate)."),
    Patch("observe_mixmatch", "{module}.mixup_one_target, {cls}.process_batch (subclass)", "mixmatch",
          "A wrapper returns USB's result unchanged and keeps the targets it mixes (rows B..B+muB are the "
          "sharpened guesses: guess_acc) and its lambda' = max(lambda, 1 - lambda); the losses are USB's own "
          "log_dict values. Its ramped lambda_u is computed inline in train_step; the hook recomputes it with "
          "the same expression from self.it."),
    Patch("observe_evaluate", "{cls}.evaluate (subclass)", "always",
          "Calls USB's evaluate (EMA weights, its metrics) and records top-1/top-5 (fractions there, percent "
          "here) and the mean loss into metrics.jsonl. USB's EvaluationHook already evaluates exactly at the "
          "spec's steps ((it + 1) % eval_every == 0 and the last step), so no schedule is changed."),
    Patch("atomic_checkpoint", "{cls}.save_model (subclass)", "always",
          "USB's save_model writes to a temporary name that is then renamed into place, so a kill during a save "
          "leaves the previous file intact; for the resume checkpoint the one it replaces is kept as "
          "resume.prev.pth, which entry.py puts in its place if the latest cannot be read. The content is USB's "
          "own. A save of non-finite weights is refused, keeping the last good checkpoint."),
    Patch("numpy_scalars_in_checkpoint", "{cls}.load_model (subclass)", "always",
          "USB's checkpoint stores best_eval_acc as sklearn returned it, a numpy float64, and its load_model "
          "calls torch.load without weights_only, whose default since torch 2.6 refuses numpy scalars: USB cannot "
          "resume its own checkpoint under this project's torch. The subclass runs USB's load_model with numpy's "
          "scalar and dtype types allowed (torch.serialization.safe_globals); loading still runs no code."),
    Patch("precision_as_spec", "torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32", "always",
          "USB leaves cuDNN's default, which lets float32 convolutions use TF32 on CUDA. The entry sets both TF32 "
          "switches from spec.precision before USB's loop (contract/precision.py), as for the other "
          "implementations; result.json records them as the run left them."),
    Patch("nesterov_as_spec", "the nesterov flag of the optimizer's param groups", "no_nesterov",
          "AlgorithmBase.set_optimizer calls get_optimizer without nesterov, whose default is True: USB's SGD is "
          "always Nesterov. When the spec says nesterov=False, every param group's flag is set to False after "
          "USB built the optimizer. Not applied for nesterov=True."),
    Patch("network_size_from_spec", "get_net_builder(net) (a builder for USB's WideResNet class)", "network_size",
          "USB names WideResNets only at depth 28, width 2 or 8 (wrn_28_2, wrn_28_8). For another depth or width "
          "the builder calls the same WideResNet class (semilearn/nets/wrn/wrn.py) with the spec's depth and "
          "widen_factor and first_stride=1, as wrn_28_2 does. Not applied at 28x2 or 28x8."),
    Patch("cpu_device_shim", "Tensor.cuda, Module.cuda, torch.cuda.Event, torch.cuda.synchronize", "cpu",
          "USB calls .cuda(self.gpu) on every batch and CUDA events and synchronize in its timing hooks. For tests "
          "and CPU comparisons, .cuda(...) moves to the chosen device, the event is a wall-clock stand-in and "
          "synchronize does nothing. Not applied on CUDA devices."),
    Patch("amp_bf16", "semilearn.core.algorithmbase.autocast, semilearn.core.algorithmbase.GradScaler", "bf16",
          "USB's amp is torch.cuda.amp's fp16 autocast with a GradScaler. For spec.precision == 'bf16' its "
          "autocast name is bound to torch.autocast(device, bfloat16) and args.amp is set, and its GradScaler name "
          "to a disabled scaler: bf16 needs no loss scaling, and an enabled scaler skips optimizer steps after an "
          "overflow while the scheduler and EMA still advance. Not applied for fp32."),
    Patch("bn_momentum", "semilearn.nets.wrn BatchNorm2d modules (momentum attribute)", "bn_momentum",
          "USB's WideResNet hard-codes BatchNorm momentum 0.001. When the spec asks for another value, every "
          "BatchNorm2d of the model (and of its EMA copy) gets spec.bn_momentum before training, as for the other "
          "implementations. Not applied at 0.001."),
)

# The names a patch's target uses, per algorithm: its module and its class.
TARGET_NAMES = {"fixmatch": dict(module="semilearn.algorithms.fixmatch.fixmatch", cls="FixMatch"),
                "mixmatch": dict(module="semilearn.algorithms.mixmatch.mixmatch", cls="MixMatch")}


def applied(device_type: str, precision: str, bn_momentum: float = USB_BN_MOMENTUM, algorithm: str = "fixmatch",
            nesterov: bool = True, network: tuple[int, int] = (28, 2)) -> list[str]:
    """Names of the patches a run gets, in table order. network: (depth, widen_factor)."""
    return applied_patches(PATCHES, {"always": True, "cpu": device_type != "cuda", "bf16": precision == "bf16",
                                     "bn_momentum": bn_momentum != USB_BN_MOMENTUM, "no_nesterov": not nesterov,
                                     "network_size": tuple(network) not in USB_NETWORKS,
                                     **{a: a == algorithm for a in TARGET_NAMES}})


def described(names: list[str], algorithm: str) -> list[dict[str, str]]:
    """The patches `names`, as result.json lists them: name, target (named for `algorithm`), why."""
    return described_patches(PATCHES, names, TARGET_NAMES[algorithm])


# ---------------------------------------------------------------------------------------------------------------
# our_arrays, our_split


class ArraysDataset:
    """What get_cifar reads from torchvision.datasets.CIFAR10(root, train=..., download=True): .data (N, 32, 32, 3)
    uint8 and .targets, here our arrays."""

    def __init__(self, train: tuple, test: tuple):
        self.train, self.test = train, test

    def __call__(self, root=None, train: bool = True, download: bool = False, **kwargs):
        x, y = self.train if train else self.test
        return types.SimpleNamespace(data=x, targets=y)


def use_our_data(cifar_module, dataset: str, train: tuple, test: tuple, split: np.ndarray) -> None:
    """Patches our_arrays and our_split on semilearn.datasets.cv_datasets.cifar. train = (x, y) of all train images,
    test = (x, y) to evaluate on; split: the sorted labelled indices into train."""
    cifar_module.torchvision = types.SimpleNamespace(
        datasets=types.SimpleNamespace(**{dataset.upper(): ArraysDataset(train, test)}))
    cifar_module.split_ssl_data = our_split_ssl_data(split)


def our_split_ssl_data(split: np.ndarray):
    """split_ssl_data (semilearn/datasets/utils.py) with our labelled indices: (lb_data, lb_targets, ulb_data,
    ulb_targets), the unlabelled set being all images in their order. Refuses the settings it does not serve."""
    split = np.asarray(split, dtype=np.int64)

    def split_ssl_data(args, data, targets, num_classes, lb_num_labels, ulb_num_labels=None,
                       lb_imbalance_ratio=1.0, ulb_imbalance_ratio=1.0, lb_index=None, ulb_index=None,
                       include_lb_to_ulb=True, load_exist=True):
        if lb_num_labels != len(split) or ulb_num_labels is not None or lb_imbalance_ratio != 1 \
                or ulb_imbalance_ratio != 1 or not include_lb_to_ulb or lb_index is not None or ulb_index is not None:
            raise ValueError(f"our split serves {len(split)} balanced labels with every image unlabelled, not "
                             f"lb_num_labels={lb_num_labels}, ulb_num_labels={ulb_num_labels}, imbalance "
                             f"{lb_imbalance_ratio}/{ulb_imbalance_ratio}, include_lb_to_ulb={include_lb_to_ulb}")
        data, targets = np.asarray(data), np.asarray(targets)
        return data[split], targets[split], data, targets

    return split_ssl_data


# ---------------------------------------------------------------------------------------------------------------
# resume_mid_epoch


def positioned_sampler_class(DistributedSampler):
    """USB's DistributedSampler, whose first iteration after skip_batches(n, batch_size) leaves out the first n
    batches of the epoch's indices; every other iteration is USB's, unchanged."""

    class PositionedSampler(DistributedSampler):
        _skip = 0  # indices to leave out at the start of the next iteration only

        def skip_batches(self, batches: int, batch_size: int) -> None:
            self._skip = batches * batch_size

        def __iter__(self):
            indices = super().__iter__()  # the epoch's indices, from its generator seeded with the epoch
            skip, self._skip = self._skip, 0
            return itertools.islice(indices, skip, None)

    return PositionedSampler


def use_positioned_sampler(build_module, DistributedSampler) -> None:
    """get_data_loader (semilearn/core/utils/build.py) looks name2sampler[train_sampler] up at call time."""
    build_module.name2sampler = {**build_module.name2sampler,
                                 "RandomSampler": positioned_sampler_class(DistributedSampler)}


def resume_position(alg, it: int) -> tuple[int, int]:
    """After USB's load_model: start at the checkpoint's epoch (not the next one) and leave out the batches its
    epoch already trained; returns (epoch, batches left out)."""
    epoch, done = divmod(it, alg.num_iter_per_epoch)
    alg.start_epoch = alg.epoch = epoch
    for name in ("train_lb", "train_ulb"):
        loader = alg.loader_dict[name]
        loader.sampler.skip_batches(done, loader.batch_size)
    return epoch, done


# ---------------------------------------------------------------------------------------------------------------
# nesterov_as_spec, network_size_from_spec


def set_nesterov(optimizer, nesterov: bool) -> None:
    for group in optimizer.param_groups:
        group["nesterov"] = nesterov


def wrn_builder(wrn_module, depth: int, widen_factor: int):
    """A builder with wrn_28_2's signature (semilearn/nets/wrn/wrn.py) for USB's WideResNet of another size."""

    def wrn(pretrained=False, pretrained_path=None, **kwargs):
        if pretrained:
            raise ValueError("no pretrained WideResNet of this size")
        return wrn_module.WideResNet(first_stride=1, depth=depth, widen_factor=widen_factor, **kwargs)

    return wrn


# ---------------------------------------------------------------------------------------------------------------
# observe_mixmatch


def observe_mixup(mixmatch_module, on_mixup) -> None:
    """Wrap the mixup_one_target name MixMatch.train_step calls; the wrapper passes USB's result through.
    on_mixup(targets, lam): its y argument (B + 2 muB, C) = [one-hot labels; q; q], and its lam' (a float)."""
    mixup = mixmatch_module.mixup_one_target

    def observed_mixup(x, y, *args, **kwargs):
        out = mixup(x, y, *args, **kwargs)
        on_mixup(y, out[2])
        return out

    mixmatch_module.mixup_one_target = observed_mixup


# ---------------------------------------------------------------------------------------------------------------
# observe_fixmatch, observe_mixmatch, observe_evaluate, atomic_checkpoint, numpy_scalars_in_checkpoint


def numpy_scalar_types() -> list:
    """What a USB checkpoint holds besides tensors and Python values: numpy float64 (best_eval_acc)."""
    return [np._core.multiarray.scalar, np.dtype, type(np.dtype(np.float64))]


def bench_class(Algorithm):  # a class factory: its length is the short methods below
    """USB's FixMatch or MixMatch class with its batches, hook results and evaluations observed, atomic saves, and
    loads that accept the numpy scalars of its own checkpoints; train(), train_step and the hooks are its own.

    Needs `bench` set before train(): an object with batch(kwargs), hook_result(fn_name, result),
    evaluated(step, eval_dict, seconds), saved(save_name, step) and paused() (a context manager for time that is not
    training).
    """
    class Bench(Algorithm):
        bench = None

        def process_batch(self, input_args=None, **kwargs):
            self.bench.batch(kwargs)  # idx_lb, x_lb, y_lb, idx_ulb, x_ulb_w, x_ulb_s as the loaders gave them
            return super().process_batch(input_args, **kwargs)

        def call_hook(self, fn_name, hook_name=None, *args, **kwargs):
            out = super().call_hook(fn_name, hook_name, *args, **kwargs)
            if hook_name is not None:  # a call from inside train_step (masking, gen_ulb_targets)
                self.bench.hook_result(fn_name, out)
            return out

        def evaluate(self, eval_dest="eval", out_key="logits", return_logits=False):
            with self.bench.paused():  # evaluation is not training time
                t0 = time.perf_counter()
                out = super().evaluate(eval_dest, out_key, return_logits)
                if eval_dest == "eval":  # inside its loop's after_train_step: self.it + 1 steps done
                    self.bench.evaluated(self.it + 1, out, time.perf_counter() - t0)
            return out

        def load_model(self, load_path):
            import torch

            with torch.serialization.safe_globals(numpy_scalar_types()):  # numpy_scalars_in_checkpoint
                return super().load_model(load_path)

        def save_model(self, save_name, save_path):
            refuse_non_finite(self.model, self.it + 1)
            with self.bench.paused():  # saving is not training time
                Path(save_path).mkdir(parents=True, exist_ok=True)
                save_atomically(super().save_model, save_name, save_path, keep_previous=save_name == RESUME_FILE)
                # get_save_dict stores it = self.it + 1: the steps done when called inside the loop
                self.bench.saved(save_name, self.it + 1)

    Bench.__name__ = Bench.__qualname__ = f"Bench{Algorithm.__name__}"
    return Bench
