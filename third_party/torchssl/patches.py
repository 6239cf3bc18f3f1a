"""Every run-time change to how TorchSSL's FixMatch and MixMatch run, in one table (PATCHES), and the code of each.

TorchSSL's files are never edited. Each patch below is a subclass, a wrapper that returns TorchSSL's own result
unchanged, or an argument TorchSSL already accepts. None of them touches the loss, the model, the optimizer, the
schedule, the EMA or the augmentation. result.json lists the patches applied to each run under "patches", each
target named for the run's algorithm (`{script}`, `{module}`, `{cls}` below: fixmatch.py, models.fixmatch.fixmatch,
FixMatch; or mixmatch.py, models.mixmatch.mixmatch, MixMatch).

This module imports neither torch nor TorchSSL at import time, so the table can be read anywhere. How TorchSSL's
recipe itself differs from the paper's is in README.md here.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from third_party.adapter import (Patch, WallClockEvent, amp_bf16, applied_patches,  # noqa: F401 (re-exported)
                                 cpu_device_shim, described_patches, refuse_non_finite, save_atomically,
                                 set_bn_momentum, torch_load_to)

RESUME_FILE = "latest_model.pth"  # the save TorchSSL's load_model resumes from: its previous version is kept too


# Patch.when: "always", "cpu" (a device without CUDA), "bf16" (spec.precision == "bf16"), "bn_momentum"
# (spec.bn_momentum is not the 0.001 TorchSSL's network hard-codes), or an algorithm ("fixmatch", "mixmatch").
PATCHES: tuple[Patch, ...] = (
    Patch("entry_replaces_main", "{script} main() / main_worker()", "always",
          "entry.py repeats main_worker's wiring line by line for ONE device (no mp.spawn, DDP or DataParallel; "
          "the GPU index comes from the device string) and skips main(): main() deletes or refuses an existing "
          "save folder, which would defeat resuming. Its save folder is RUN/torchssl, and the process runs there "
          "so its relative writes (./data_statistics/) stay in the run folder. No YAML config is read: the "
          "arguments come from the spec (see entry.torchssl_args) and are saved to RUN/torchssl/args.json."),
    Patch("our_arrays", "datasets.ssl_dataset.SSL_Dataset.get_data", "always",
          "A subclass returns our cached uint8 arrays (train: all images; test: the spec's test set or fixed "
          "subset) instead of torchvision's CIFAR10 download, which cannot run offline and would not be the data "
          "the other implementation sees. TorchSSL's BasicDataset, transforms and RandAugment(3, 5) are unchanged."),
    Patch("our_split", "SSL_Dataset.get_ssl_dset(index=...)", "always",
          "The labelled indices come from our split file through TorchSSL's own `index` argument, instead of "
          "np.random.choice on the global numpy state (or its hard-coded list for cifar10@10). entry.py then "
          "checks that the labelled dataset TorchSSL built holds exactly train[split] (pixels and labels, in "
          "order) and refuses to run otherwise."),
    Patch("exact_step_budget", "the zip of train loaders in {cls}.train()", "always",
          "Its loaders are built as in main_worker (RandomSampler, num_samples = steps * batch) and wrapped to "
          "yield at most the steps still to do. A fresh run stops after spec.steps either way; a resumed run "
          "would otherwise take one extra step, because train() stops only when self.it > num_train_iter."),
    Patch("spec_schedule", "{cls}.num_eval_iter (subclass property)", "always",
          "train() reads self.num_eval_iter once per step, after the update, scheduler and EMA and before "
          "self.it += 1. The property answers it from the spec: evaluate every eval_every steps (the final "
          "evaluation is train()'s own closing one), instead of after steps 1, E+1, 2E+1, ... and every 1000 "
          "steps in the last 20%, so that both implementations are evaluated at the same steps and "
          "'median of the last 20' means the same thing. The same read is the end-of-step hook that writes "
          "training statistics every log_every steps and checkpoints (its own save_model) every "
          "checkpoint_every steps and at the end; TorchSSL's own save every 10000 steps still happens."),
    Patch("observe_losses", "models.fixmatch.fixmatch.ce_loss / consistency_loss", "fixmatch",
          "Wrappers return TorchSSL's own results unchanged and keep the supervised loss, the unsupervised loss "
          "and the per-sample confidence mask of each step: train() logs them only at evaluations, and logs "
          "mask_ratio = 1 - mask, the REJECTED fraction. metrics.jsonl gets mask_rate = the accepted fraction."),
    Patch("observe_mixmatch", "models.mixmatch.mixmatch.ce_loss / consistency_loss / mixup_one_target", "mixmatch",
          "Wrappers return TorchSSL's own results unchanged and keep, per step: the labelled cross-entropy (per "
          "example there; its mean, as train() takes it, here), the unlabelled squared error, and from the MixUp "
          "call its lambda' (one per batch) and the targets it mixes, whose rows B..B+muB are the guessed labels "
          "(guess_acc: their argmax against the true labels). train() logs losses only at evaluations. Its ramped "
          "lambda_u is computed inline in train(); the adapter recomputes it with the same expression from self.it."),
    Patch("observe_evaluate", "{cls}.evaluate (subclass)", "always",
          "Calls TorchSSL's evaluate (EMA weights, its metrics) and records top-1/top-5 (fractions there, percent "
          "here) and the mean loss into metrics.jsonl, at the spec's evaluation steps only."),
    Patch("atomic_checkpoint", "{cls}.save_model (subclass)", "always",
          "TorchSSL's save_model writes to a temporary name that is then renamed, so a kill during a save leaves "
          "the previous latest_model.pth intact; the one it replaces is kept as latest_model.prev.pth, which "
          "entry.py puts in its place before TorchSSL's load_model reads it if the latest cannot be read. Its "
          "content is TorchSSL's own; progress.json beside it keeps "
          "the step and seconds so far for resumes. main_worker's final save after train() (which stores "
          "it = steps + 1) is replaced by the end-of-step save at the last step. A save of non-finite weights "
          "(TorchSSL's own save every 10,000 steps runs before our loss check) is refused, keeping the last good "
          "checkpoint."),
    Patch("checkpoint_to_run_device", "{cls}.load_model (subclass)", "always",
          "load_model calls torch.load(load_path) without map_location, so every tensor would go back to the "
          "device it was saved from: a checkpoint written on cuda:1 (run_all.py --gpus 0 1) could not be resumed "
          "where fewer GPUs are visible. The subclass runs TorchSSL's load_model with torch.load mapping the "
          "checkpoint to the device its model is on; what it loads is unchanged."),
    Patch("precision_as_spec", "torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32", "always",
          "TorchSSL leaves cuDNN's default, which lets float32 convolutions use TF32 on CUDA, so its fp32 would not "
          "be full fp32. The entry sets both TF32 switches from spec.precision before TorchSSL's loop, as our "
          "entry does (contract/precision.py: off for fp32 and bf16, on for tf32); result.json records them as the "
          "run left them. A CPU computes in full fp32 either way."),
    Patch("checkpoint_below_1m_steps", "MixMatch.save_model below step 1,000,000 (subclass)", "mixmatch",
          "MixMatch.save_model returns without writing while self.it < 1,000,000 (models/mixmatch/mixmatch.py, "
          "save_model), so a shorter run could never checkpoint or resume. The end-of-step checkpoint "
          "(spec_schedule) writes the dict its save_model writes past that guard (model, optimizer, scheduler, "
          "it = self.it + 1, ema_model = the model with the EMA shadow applied), atomically as atomic_checkpoint "
          "does; its load_model reads it unchanged. TorchSSL's own saves (every 10,000 steps, model_best.pth) keep "
          "its guard."),
    Patch("cpu_device_shim", "Tensor.cuda, Module.cuda, torch.cuda.Event, torch.cuda.synchronize", "cpu",
          "TorchSSL calls .cuda() and CUDA events throughout and refuses to run without a GPU. For tests and CPU "
          "comparisons, .cuda(...) moves to the chosen device, the event is a wall-clock stand-in and "
          "synchronize does nothing. Not applied on CUDA devices."),
    Patch("amp_bf16", "{module}.autocast, {module}.GradScaler", "bf16",
          "TorchSSL's amp is fp16 autocast with a GradScaler. For spec.precision == 'bf16' its autocast name is "
          "bound to torch.autocast(device, bfloat16) and args.amp is set, and its GradScaler name to a disabled "
          "scaler: bf16 needs no loss scaling, and an enabled scaler doubles its scale until a gradient overflows, "
          "then skips that optimizer step while the scheduler and EMA still advance (about one step in 2000 late "
          "in a long run), so the two implementations would not apply the same number of updates. The updates "
          "applied are counted for both and recorded in result.json. Not applied for fp32."),
    Patch("bn_momentum", "models.nets.wrn BatchNorm2d modules (momentum attribute)", "bn_momentum",
          "TorchSSL's WideResNet hard-codes BatchNorm momentum 0.001 whatever bn_momentum its builder is given. "
          "When the spec asks for another value, every BatchNorm2d of the built network gets spec.bn_momentum "
          "before training (the EMA model is copied after), as ours does, so both implementations honour the "
          "spec. Not applied at 0.001."),
)
TORCHSSL_BN_MOMENTUM = 0.001  # models/nets/wrn.py


# The names a patch's target uses, per algorithm: its script, its module, its class.
TARGET_NAMES = {"fixmatch": dict(script="fixmatch.py", module="models.fixmatch.fixmatch", cls="FixMatch"),
                "mixmatch": dict(script="mixmatch.py", module="models.mixmatch.mixmatch", cls="MixMatch")}


def applied(device_type: str, precision: str, bn_momentum: float = TORCHSSL_BN_MOMENTUM,
            algorithm: str = "fixmatch") -> list[str]:
    """Names of the patches a run of `algorithm` on `device_type` ("cpu", "cuda", ...) with `precision` and
    `bn_momentum` gets, in table order."""
    return applied_patches(PATCHES, {"always": True, "cpu": device_type != "cuda", "bf16": precision == "bf16",
                                     "bn_momentum": bn_momentum != TORCHSSL_BN_MOMENTUM,
                                     **{a: a == algorithm for a in TARGET_NAMES}})


def described(names: list[str], algorithm: str) -> list[dict[str, str]]:
    """The patches `names`, as result.json lists them: name, target (named for `algorithm`), why."""
    return described_patches(PATCHES, names, TARGET_NAMES[algorithm])


# cpu_device_shim, amp_bf16 and bn_momentum (set_bn_momentum) are third_party/adapter.py's, shared with USB's adapter.


# ---------------------------------------------------------------------------------------------------------------
# observe_losses


def observe_losses(fixmatch_module, on_sup_loss, on_unsup_loss) -> None:
    """Wrap the two loss functions train() calls; each wrapper passes TorchSSL's result through unchanged.

    on_sup_loss(sup_loss): the mean labelled cross-entropy (a 0-d tensor). In models/fixmatch/fixmatch.py the name
    ce_loss is called only there (consistency_loss uses its own module's ce_loss).
    on_unsup_loss(unsup_loss, mask_mean, select, pseudo_label): consistency_loss's four results; select (muB,) is
    1 where the weak view's confidence reached the threshold, pseudo_label (muB,) the weak view's argmax.
    """
    ce_loss, consistency_loss = fixmatch_module.ce_loss, fixmatch_module.consistency_loss

    def observed_ce_loss(*args, **kwargs):
        out = ce_loss(*args, **kwargs)
        on_sup_loss(out)
        return out

    def observed_consistency_loss(*args, **kwargs):
        out = consistency_loss(*args, **kwargs)
        on_unsup_loss(*out)
        return out

    fixmatch_module.ce_loss = observed_ce_loss
    fixmatch_module.consistency_loss = observed_consistency_loss


# ---------------------------------------------------------------------------------------------------------------
# observe_mixmatch


def observe_mixmatch(mixmatch_module, on_sup_loss, on_unsup_loss, on_mixup) -> None:
    """Wrap the three functions MixMatch.train() calls by module-level name, once per step each; every wrapper
    passes TorchSSL's result through unchanged.

    on_sup_loss(per_example): ce_loss(logits_x, mixed targets, use_hard_labels=False), shape (B,); train() takes
    its mean. on_unsup_loss(loss): consistency_loss, the mean squared error (a 0-d tensor).
    on_mixup(targets, lam): mixup_one_target's y argument, (B + 2 muB, C) = [one-hot labels; q; q] with q the
    sharpened guesses, and its third result lam' = max(lam, 1 - lam), a float, one per batch.
    """
    ce_loss, consistency_loss, mixup = (mixmatch_module.ce_loss, mixmatch_module.consistency_loss,
                                        mixmatch_module.mixup_one_target)

    def observed_ce_loss(*args, **kwargs):
        out = ce_loss(*args, **kwargs)
        on_sup_loss(out)
        return out

    def observed_consistency_loss(*args, **kwargs):
        out = consistency_loss(*args, **kwargs)
        on_unsup_loss(out)
        return out

    def observed_mixup(x, y, *args, **kwargs):
        out = mixup(x, y, *args, **kwargs)
        on_mixup(y, out[2])
        return out

    mixmatch_module.ce_loss = observed_ce_loss
    mixmatch_module.consistency_loss = observed_consistency_loss
    mixmatch_module.mixup_one_target = observed_mixup


# ---------------------------------------------------------------------------------------------------------------
# our_arrays


def arrays_dataset_class(SSL_Dataset, train: tuple, test: tuple):
    """SSL_Dataset whose get_data returns our arrays: train = (x, y) of all train images, test = (x, y) to evaluate.

    x is (N, 32, 32, 3) uint8 (HWC, like torchvision's CIFAR10.data), y is (N,) int64.
    """

    class ArraysSSLDataset(SSL_Dataset):
        def get_data(self, svhn_extra=True):
            return train if self.train else test

    return ArraysSSLDataset


# ---------------------------------------------------------------------------------------------------------------
# exact_step_budget


class LimitedBatches:
    """A loader's batches, unchanged, at most `limit` of them.

    on_fetch(batch, t_request) hears of each batch when it arrives; t_request is time.perf_counter() at the moment
    the batch was asked for, so the caller can tell time spent waiting for data.
    """

    def __init__(self, loader, limit: int, on_fetch=None):
        self.loader, self.limit, self.on_fetch = loader, limit, on_fetch
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return min(self.limit, len(self.loader))

    def __iter__(self):
        if self.limit <= 0:
            return
        batches = iter(self.loader)
        for _ in range(self.limit):  # never asks the loader for a batch it will not yield
            t_request = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            if self.on_fetch is not None:
                self.on_fetch(batch, t_request)
            yield batch


# ---------------------------------------------------------------------------------------------------------------
# spec_schedule, observe_evaluate, atomic_checkpoint


def bench_class(Algorithm, own_checkpoint: bool = False):  # a class factory: its length is the short methods below
    """TorchSSL's FixMatch or MixMatch class with the spec's schedule, evaluations observed, atomic saves that keep
    the previous checkpoint, and its checkpoint loaded onto the model's device; train() is its own.
    bench_save(name, path) is the end-of-step checkpoint: its own save_model, or with own_checkpoint (patch
    checkpoint_below_1m_steps) the dict its save_model writes, written here.

    Needs `hooks` set before train(): an object with end_of_step(model) -> bool (evaluate now?),
    evaluated(result_dict, seconds), saved(save_name, step, seconds) and paused() (a context manager for time that
    is not training).
    """
    class Bench(Algorithm):
        hooks = None

        @property
        def num_eval_iter(self):
            # train(): `if self.it % self.num_eval_iter == 0: evaluate`. it % 1 == 0 always; it % nan is nan and
            # nan == 0 is False, so no evaluation (also none after the first step, where self.it == 0).
            return 1 if self.hooks.end_of_step(self) else math.nan

        @num_eval_iter.setter
        def num_eval_iter(self, value):
            pass  # its own schedule (set in __init__, switched to 1000 late in train()): the spec's replaces it

        def evaluate(self, eval_loader=None, args=None):
            with self.hooks.paused():  # evaluation is not training time
                t0 = time.perf_counter()
                out = super().evaluate(eval_loader=eval_loader, args=args)
                self.hooks.evaluated(out, time.perf_counter() - t0)
            return out

        def load_model(self, load_path):
            with torch_load_to(next(self.model.parameters()).device):  # checkpoint_to_run_device
                return super().load_model(load_path)

        def save_model(self, save_name, save_path):
            refuse_non_finite(self.model, self.it + 1)  # its own save every 10,000 steps precedes our loss check
            with self.hooks.paused():  # saving is not training time
                t0 = time.perf_counter()
                # latest_model.pth: the one it replaces stays as latest_model.prev.pth, read if the latest is damaged
                if save_atomically(super().save_model, save_name, save_path, keep_previous=save_name == RESUME_FILE):
                    # save_model stores it = self.it + 1: the steps done when called inside the loop, as it is here
                    self.hooks.saved(save_name, self.it + 1, time.perf_counter() - t0)

        def bench_save(self, save_name, save_path):
            if not own_checkpoint:
                return self.save_model(save_name, save_path)
            import torch

            refuse_non_finite(self.model, self.it + 1)
            with self.hooks.paused():
                t0 = time.perf_counter()
                save_atomically(lambda name, folder: torch.save(torchssl_checkpoint(self), Path(folder) / name),
                                save_name, save_path, keep_previous=save_name == RESUME_FILE)
                self.hooks.saved(save_name, self.it + 1, time.perf_counter() - t0)

    Bench.__name__ = Bench.__qualname__ = f"Bench{Algorithm.__name__}"
    return Bench


def torchssl_checkpoint(alg) -> dict:
    """The dict MixMatch.save_model writes past its guard (models/mixmatch/mixmatch.py, save_model), built the same
    way: the EMA weights are put into the live model, copied, and taken back out."""
    from copy import deepcopy

    alg.model.eval()
    alg.ema.apply_shadow()
    ema_model = deepcopy(alg.model)
    alg.ema.restore()
    alg.model.train()
    return {"model": alg.model.state_dict(), "optimizer": alg.optimizer.state_dict(),
            "scheduler": alg.scheduler.state_dict(), "it": alg.it + 1, "ema_model": ema_model.state_dict()}
