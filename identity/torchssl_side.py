"""TorchSSL's own FixMatch or MixMatch train(), unedited, on given batches, showing its state after every step.

The loop is TorchSSL's (models/{fixmatch,mixmatch}/*.py train(): forward, loss, backward, optimizer, scheduler, EMA),
built as the adapter's main_worker builds it (third_party/torchssl/entry.py). What the check adds, all of it
observation except the loaders (LOCKSTEP_PATCHES):
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from contract.spec import RunSpec
from third_party.torchssl import patches
from third_party.torchssl.entry import TORCHSSL_ALGORITHMS, network_builder, set_optimizer, torchssl_args

LOCKSTEP_PATCHES = {
    "list_loaders": "train()'s three loaders are lists of the batches our side makes (already augmented and "
                    "normalised), so both sides see the same floats; `ulb_dset` is sized as the unlabelled set",
    "end_of_step": "the num_eval_iter property that train() reads once per step, after the update, scheduler and "
                   "EMA (the adapter's spec_schedule): it shows the state and answers 'no evaluation'",
    "no_saves": "save_model writes nothing (train() saves at step 0 and every 10,000 steps)",
    "observed_losses": "ce_loss and consistency_loss (MixMatch also mixup_one_target) wrapped, returning their "
                       "own results unchanged; mixup_one_target's lambda and permutation are re-drawn from the RNG "
                       "states it started from, so ours can be given the same",
    "observed_outputs": "a forward hook on the network keeps every forward's logits; Tensor.backward is wrapped "
                        "to keep the total loss it is called on",
}
__doc__ += "".join(f"\n    {name}: {why}" for name, why in LOCKSTEP_PATCHES.items()) + "\n"


def ours_name(torchssl_name: str) -> str:
    """TorchSSL's (or USB's) WideResNet parameter or buffer name -> ours: conv1 -> conv, blockG.layer.I ->
    groups.(G-1).I, convShortcut -> shortcut, the head's bn1 -> bn, fc (USB: classifier) -> fc."""
    first, rest = torchssl_name.split(".", 1)
    if first.startswith("block"):
        _, i, rest = rest.split(".", 2)  # "layer", block index, the rest
        return f"groups.{int(first[5:]) - 1}.{i}.{rest.replace('convShortcut', 'shortcut')}"
    return {"conv1": "conv", "bn1": "bn", "fc": "fc", "classifier": "fc"}[first] + "." + rest


@dataclass
class StepState:
    """One side after one step, every name in our WideResNet's terms."""

    lr: float = math.nan
    forwards: list[torch.Tensor] = field(default_factory=list)  # each forward's logits in the step, in order
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # loss, loss_x, loss_u, mask_rate | lambda_u
    mixed: dict[str, torch.Tensor] = field(default_factory=dict)  # MixMatch: x_mix, t_mix, lam'
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    ema: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)


@contextlib.contextmanager
def swapped(obj, **attrs):
    """obj's attributes replaced while active, put back after."""
    saved = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(obj, k, v)


@contextlib.contextmanager
def backward_kept(into: dict):
    """Tensor.backward keeps the tensor it is called on in into["loss"] (detached), then runs as ever."""
    backward = torch.Tensor.backward

    def kept(self, *args, **kwargs):
        into["loss"] = self.detach()
        return backward(self, *args, **kwargs)

    with swapped(torch.Tensor, backward=kept):
        yield


@contextlib.contextmanager
def forwards_kept(model: torch.nn.Module, into: list):
    """Every forward of `model` appends its output (detached) to `into`."""
    handle = model.register_forward_hook(lambda m, inputs, out: into.append(out.detach().clone()))
    try:
        yield
    finally:
        handle.remove()


def momentum_by_name(optimizer: torch.optim.Optimizer, named_params) -> dict[str, torch.Tensor]:
    return {n: optimizer.state[p]["momentum_buffer"] for n, p in named_params
            if "momentum_buffer" in optimizer.state.get(p, {})}


class TorchSSLSide:
    """TorchSSL's algorithm object for `spec` (its network, optimizer, scheduler; EMA made by train()), seeded as its
    main_worker seeds; run(batches, eval_batch, on_step) drives its train() and returns the evaluated logits."""

    def __init__(self, tssl, spec: RunSpec, device: torch.device):
        self.tssl, self.spec, self.device = tssl, spec, device
        self.alg_info = TORCHSSL_ALGORITHMS[spec.algorithm]
        self.module = tssl.alg
        self.args = torchssl_args(spec, Path(tempfile.gettempdir()), None, 0)
        random.seed(self.args.seed)
        torch.manual_seed(self.args.seed)
        np.random.seed(self.args.seed)
        self.state = StepState()
        self.on_step: Callable[[int, StepState], None] | None = None
        Algorithm = self._lockstep_class(getattr(self.module, self.alg_info.class_name))
        logger = logging.getLogger("identity.torchssl")
        logger.addHandler(logging.NullHandler())
        logger.propagate = False
        self.alg = Algorithm(network_builder(tssl, self.args), self.args.num_classes, self.args.ema_m,
                             *self.alg_info.constructor(self.args), num_eval_iter=1, tb_log=None, logger=logger)
        self.optimizer = set_optimizer(tssl, self.alg, self.args, spec)
        self.alg.model = self.alg.model.to(device)
        if spec.bn_momentum != patches.TORCHSSL_BN_MOMENTUM:
            patches.set_bn_momentum(self.alg.model, spec.bn_momentum)
        self.alg.ema_model = copy.deepcopy(self.alg.model)

    def initial_state(self) -> dict[str, torch.Tensor]:
        """Its freshly built network's parameters and buffers, in our names: our side starts from these."""
        return {ours_name(k): v.detach().clone() for k, v in self.alg.model.state_dict().items()}

    def _lockstep_class(self, Algorithm):
        side = self

        class Lockstep(Algorithm):
            @property
            def num_eval_iter(self):
                side._step_done(self)
                return math.nan  # it % nan == 0 is False: no evaluation inside the loop

            @num_eval_iter.setter
            def num_eval_iter(self, value):
                pass

            def save_model(self, save_name, save_path):
                pass

        return Lockstep

    # ---- observers -----------------------------------------------------------------------------------------
    def _observers(self):
        st, module = self, self.module
        if self.spec.algorithm == "fixmatch":
            ce_loss, consistency_loss = module.ce_loss, module.consistency_loss

            def observed_ce_loss(*args, **kwargs):
                out = ce_loss(*args, **kwargs)
                st.state.losses["loss_x"] = out.detach()
                st.state.lr = st.optimizer.param_groups[0]["lr"]
                return out

            def observed_consistency_loss(*args, **kwargs):
                out = consistency_loss(*args, **kwargs)
                st.state.losses["loss_u"], st.state.losses["mask_rate"] = out[0].detach(), out[1].detach()
                return out

            return swapped(module, ce_loss=observed_ce_loss, consistency_loss=observed_consistency_loss)

        ce_loss, consistency_loss, mixup = module.ce_loss, module.consistency_loss, module.mixup_one_target

        def observed_ce_loss(*args, **kwargs):
            out = ce_loss(*args, **kwargs)
            st.state.losses["loss_x"] = out.detach().mean()  # train(): sup_loss = ce_loss(...).mean()
            st.state.lr = st.optimizer.param_groups[0]["lr"]
            return out

        def observed_consistency_loss(*args, **kwargs):
            out = consistency_loss(*args, **kwargs)
            st.state.losses["loss_u"] = out.detach()
            return out

        def observed_mixup(x, y, gpu, alpha=1.0, is_bias=False):
            np_state, torch_state = np.random.get_state(), torch.get_rng_state()
            out = mixup(x, y, gpu, alpha, is_bias)
            # the same draws again, from the states it started from: its lambda before max(lam, 1 - lam), its perm
            rs = np.random.RandomState()
            rs.set_state(np_state)
            g = torch.Generator().manual_seed(0)
            g.set_state(torch_state)
            st.drawn = (float(rs.beta(alpha, alpha)), torch.randperm(x.size(0), generator=g))
            st.rng_states = (np_state, torch_state)  # what another reference's mixup can start from
            st.state.mixed = {"x_mix": out[0].detach(), "t_mix": out[1].detach(),
                              "lam'": torch.tensor(out[2], dtype=torch.float64)}
            return out

        return swapped(module, ce_loss=observed_ce_loss, consistency_loss=observed_consistency_loss,
                       mixup_one_target=observed_mixup)

    def _step_done(self, alg) -> None:
        st = self.state
        if self.spec.algorithm == "mixmatch":  # train() ramps lambda_u inline: its expression, from self.it
            a = self.args
            st.losses["lambda_u"] = torch.tensor(
                a.ulb_loss_ratio * float(np.clip(alg.it / (a.ramp_up * a.num_train_iter), 0.0, 1.0)))
        st.losses["loss"] = self._kept["loss"]
        named = [(ours_name(n), p) for n, p in alg.model.named_parameters()]
        st.params = {n: p.detach() for n, p in named}
        st.ema = {ours_name(n): t for n, t in alg.ema.shadow.items()}
        st.buffers = {ours_name(n): b for n, b in alg.model.named_buffers()}
        st.momentum = momentum_by_name(self.optimizer, named)
        self.on_step(alg.it, st)
        self.state = StepState()
        self._forwards.clear()

    # ---- the run -------------------------------------------------------------------------------------------
    def run(self, batches: list[tuple], eval_batch: tuple[torch.Tensor, torch.Tensor],
            on_step: Callable[[int, StepState], None]) -> torch.Tensor:
        """batches: per step (x_lb, y_lb, x_ulb_1, x_ulb_2) (FixMatch: weak and strong views; MixMatch: two weak
        views); eval_batch (x, y): normalised images its closing evaluation sees. on_step(k, state) after step k
        (0-based). Returns the evaluated model's logits on eval_batch."""
        self.on_step, self._kept, self._forwards = on_step, {}, []
        n = len(batches)
        self.alg.set_data_loader({
            "train_lb": [(torch.arange(len(b[1])), b[0], b[1]) for b in batches],
            "train_ulb": [(torch.arange(len(b[2])), b[2], b[3]) for b in batches],
            "eval": [(torch.arange(len(eval_batch[1])), *eval_batch)],
        })
        if self.alg_info.set_dset:
            self.alg.set_dset(range(len(batches[0][2]) * n))
        if n != self.args.num_train_iter:
            raise ValueError(f"{n} batches for a spec of {self.args.num_train_iter} steps")
        with patches.cpu_device_shim(self.device), self._observers(), backward_kept(self._kept), \
                forwards_kept(self.alg.model, self._forwards_sink()):
            self.alg.train(self.args)  # after its last step, its closing evaluation: one forward of eval_batch
        if len(self.state.forwards) != 1:
            raise RuntimeError(f"TorchSSL's closing evaluation made {len(self.state.forwards)} forwards, not 1")
        return self.state.forwards[0]

    def _forwards_sink(self) -> list:
        side = self

        class Sink(list):
            def append(self, out):
                side.state.forwards.append(out)

        return Sink()
