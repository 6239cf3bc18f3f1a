"""USB's own FixMatch or MixMatch AlgorithmBase.train(), unedited, on given batches, showing its state after every
step.

The loop, hooks, optimizer, scheduler and EMA are USB's (semilearn/core/algorithmbase.py train(); its hooks
ParamUpdateHook: backward, SGD, scheduler; EMAHook; EvaluationHook at the last step), built as the adapter's
main_worker builds it (third_party/usb/entry.py: usb_args, its seeds, its network builder, its algorithm class,
optimizer and cosine schedule from the algorithm's own constructor). The network is USB's WideResNet, or, for the
USB-against-TorchSSL check, TorchSSL's WideResNet class answering in USB's {'logits', 'feat'} form. What the check
adds, all of it observation except the data (LOCKSTEP_PATCHES):
"""
from __future__ import annotations

import contextlib
import logging
import random
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from contract.spec import RunSpec
from identity.torchssl_side import StepState, momentum_by_name, ours_name, swapped
from third_party.usb import patches
from third_party.usb.entry import USB_ALGORITHMS, usb_args

LOCKSTEP_PATCHES = {
    "no_data_sets": "the algorithm class's set_dataset returns None (USB's own guard then skips set_data_loader): no "
                    "CIFAR-10 is built or downloaded; loader_dict is then lists of the batches our side makes "
                    "(already augmented and normalised), so both sides see the same floats",
    "recording_hook": "a hook of USB's own kind, registered with priority LOWEST: it reads the learning rate before "
                      "each step and, after ParamUpdateHook (backward, SGD, scheduler), EMAHook and the other hooks, "
                      "the step's state",
    "no_saves": "save_model writes nothing (CheckpointHook and EvaluationHook save at the evaluation step and the "
                "end)",
    "observed_losses": "the algorithm's ce_loss and consistency_loss, its masking hook result (FixMatch) and "
                       "mixup_one_target (MixMatch) observed, returning their own results unchanged; mixup_one_"
                       "target's lambda and permutation are re-drawn from the RNG states it started from, so ours "
                       "can be given the same (against TorchSSL: it starts from the RNG states TorchSSL's started "
                       "from, so both draw the same)",
    "observed_outputs": "a forward hook on the network keeps every forward's logits; during evaluate, apart",
    "network_size_from_spec": "the adapter's patch of that name where USB has no builder for the size (WRN-10-1)",
    "bn_momentum": "the adapter's patch of that name where the check's setting is not 0.001",
    "torchssl_network": "(USB against TorchSSL only) the network class is TorchSSL's WideResNet, its forward "
                        "returning USB's {'logits', 'feat'}",
}
__doc__ += "".join(f"\n    {name}: {why}" for name, why in LOCKSTEP_PATCHES.items()) + "\n"

# USB's MixMatch makes one extra train-mode forward of the labelled batch per step whose output only fills a feature
# dict, BatchNorm restored (semilearn/algorithms/mixmatch/mixmatch.py:74-78): the third forward of its step. Neither
# TorchSSL nor our `usb` recipe makes it; it is kept apart (StepState.forwards leaves it out).
UNUSED_FORWARDS = {"fixmatch": (), "mixmatch": (2,)}


def ours_to_theirs(model: torch.nn.Module) -> dict[str, str]:
    """Our state-dict name -> the name in `model` (USB's or TorchSSL's WideResNet: blockG.layer.I, convShortcut,
    bn1, classifier or fc)."""
    return {ours_name(n): n for n in model.state_dict()}


def torchssl_network_class(tssl_wrn_module):
    """TorchSSL's WideResNet (models/nets/wrn.py) with USB's network interface: forward returns {'logits', 'feat'}
    (its ood_test output: the logits and the pooled features), no_weight_decay as USB's wrn.py:152-157."""
    Base = tssl_wrn_module.WideResNet

    class TorchSSLWideResNetForUSB(Base):
        def forward(self, x, only_fc=False, only_feat=False, **kwargs):
            logits, feat = super().forward(x, ood_test=True)
            return feat if only_feat else {"logits": logits, "feat": feat}

        def no_weight_decay(self):
            return [n for n, _ in self.named_parameters() if "bn" in n or "bias" in n]

    return TorchSSLWideResNetForUSB


class USBSide:
    """USB's algorithm object for `spec` (its network, optimizer, scheduler; EMA made by train()'s EMAHook), seeded
    as main_worker seeds; run(batches, eval_batch, on_step) drives its train() and returns the evaluated logits.

    network: "usb" (its WideResNet) or "torchssl" (TorchSSL's class; `tssl_wrn` its models.nets.wrn module).
    draws_from: MixMatch against another implementation: per step, the (numpy, torch) global RNG states that side's
    mixup started from; USB's mixup_one_target then starts from them too."""

    def __init__(self, usb, spec: RunSpec, device: torch.device, network: str = "usb", tssl_wrn=None,
                 draws_from: list[tuple] | None = None):
        self.usb, self.spec, self.device = usb, spec, device
        self.module = usb.alg
        self.draws_from = draws_from
        self.args = usb_args(spec, Path(tempfile.gettempdir()), None, 0)
        self.args.num_eval_iter = spec.steps  # evaluation only after the last step
        random.seed(self.args.seed)
        torch.manual_seed(self.args.seed)
        np.random.seed(self.args.seed)
        self.state = StepState()
        self.on_step: Callable[[int, StepState], None] | None = None
        self.evaluating, self.eval_logits, self.unused = False, [], []
        logger = logging.getLogger("identity.usb")
        logger.addHandler(logging.NullHandler())
        logger.propagate = False
        Algorithm = self._lockstep_class(getattr(self.module, USB_ALGORITHMS[spec.algorithm].class_name))
        self.alg = Algorithm(args=self.args, net_builder=self._net_builder(network, tssl_wrn), tb_log=None,
                             logger=logger)
        self.alg.model = self.alg.model.to(device)
        self.alg.ema_model = self.alg.ema_model.to(device)
        if spec.bn_momentum != patches.USB_BN_MOMENTUM:
            patches.set_bn_momentum(self.alg.model, spec.bn_momentum)
            patches.set_bn_momentum(self.alg.ema_model, spec.bn_momentum)
        if not spec.nesterov:
            patches.set_nesterov(self.alg.optimizer, False)
        self.alg.register_hook(self._recording_hook(), "IdentityRecordingHook", "LOWEST")
        self.names = ours_to_theirs(self.alg.model)

    def _net_builder(self, network: str, tssl_wrn):
        spec, usb = self.spec, self.usb
        if network == "torchssl":
            Net = torchssl_network_class(tssl_wrn)

            def build(num_classes, pretrained=False, pretrained_path=None, **kwargs):
                return Net(first_stride=1, num_classes=num_classes, depth=spec.depth, widen_factor=spec.widen_factor)

            return build
        if network != "usb":
            raise ValueError(f"network {network!r} is not 'usb' or 'torchssl'")
        if (spec.depth, spec.widen_factor) in patches.USB_NETWORKS:
            return usb.utils.get_net_builder(self.args.net, False)
        return patches.wrn_builder(usb.wrn, spec.depth, spec.widen_factor)  # patch network_size_from_spec

    # ---- state in our names ----------------------------------------------------------------------------------
    def initial_state(self) -> dict[str, torch.Tensor]:
        """Its freshly built network's parameters and buffers, in our names: our side starts from these."""
        return {ours_name(k): v.detach().clone() for k, v in self.alg.model.state_dict().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Start from `state` (our names) instead: the live and the EMA network. Tensors the network does not have
        (TorchSSL's block conv biases, for USB's own network) are left out; returns their names."""
        mine = {self.names[k]: v for k, v in state.items() if k in self.names}
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise KeyError(f"the state to start from lacks {missing[:5]}")
        for model in (self.alg.model, self.alg.ema_model):
            model.load_state_dict(mine)
        return sorted(k for k in state if k not in self.names)

    # ---- the algorithm class, hooks and observers -----------------------------------------------------------
    def _lockstep_class(self, Algorithm):
        side = self

        class Lockstep(Algorithm):
            def set_dataset(self):
                return None

            def save_model(self, save_name, save_path):
                pass

            def call_hook(self, fn_name, hook_name=None, *args, **kwargs):
                out = super().call_hook(fn_name, hook_name, *args, **kwargs)
                if fn_name == "masking":
                    side.state.losses["mask_rate"] = out.detach().float().mean()
                return out

            def evaluate(self, eval_dest="eval", out_key="logits", return_logits=False):
                side.evaluating = True
                try:
                    return super().evaluate(eval_dest, out_key, return_logits)
                finally:
                    side.evaluating = False

        return Lockstep

    def _recording_hook(self):
        side = self

        class IdentityRecordingHook(self.usb.hooks.Hook):
            def before_train_step(self, alg):
                side.state.lr = alg.optimizer.param_groups[0]["lr"]  # the scheduler steps after the update

            def after_train_step(self, alg):
                side._step_done(alg)

        return IdentityRecordingHook()

    def _observers(self):
        st, alg = self, self.alg
        ce_loss, consistency_loss = alg.ce_loss, alg.consistency_loss

        def observed_ce_loss(*args, **kwargs):
            out = ce_loss(*args, **kwargs)
            st.state.losses["loss_x"] = out.detach()
            return out

        def observed_consistency_loss(*args, **kwargs):
            out = consistency_loss(*args, **kwargs)
            st.state.losses["loss_u"] = out.detach()
            return out

        stack = contextlib.ExitStack()
        stack.enter_context(swapped(alg, ce_loss=observed_ce_loss, consistency_loss=observed_consistency_loss))
        if self.spec.algorithm == "mixmatch":
            stack.enter_context(swapped(self.module, mixup_one_target=self._observed_mixup()))
        return stack

    def _observed_mixup(self):
        st, mixup = self, self.module.mixup_one_target

        def observed_mixup(x, y, alpha=1.0, is_bias=False):
            if st.draws_from is not None:  # start from the other side's RNG states: the same lambda and permutation
                np_state, torch_state = st.draws_from[st.alg.it]
                np.random.set_state(np_state)
                torch.set_rng_state(torch_state)
            np_state, torch_state = np.random.get_state(), torch.get_rng_state()
            out = mixup(x, y, alpha, is_bias)
            rs = np.random.RandomState()
            rs.set_state(np_state)
            g = torch.Generator().manual_seed(0)
            g.set_state(torch_state)
            st.drawn = (float(rs.beta(alpha, alpha)), torch.randperm(x.size(0), generator=g))
            st.rng_states = (np_state, torch_state)
            st.state.mixed = {"x_mix": out[0].detach(), "t_mix": out[1].detach(),
                              "lam'": torch.tensor(out[2], dtype=torch.float64)}
            return out

        return observed_mixup

    def _forward_hook(self, module, inputs, out):
        logits = (out["logits"] if isinstance(out, dict) else out).detach().clone()
        (self.eval_logits if self.evaluating else self._forwards).append(logits)

    def _step_done(self, alg) -> None:
        st = self.state
        if self.spec.algorithm == "mixmatch":  # train_step ramps lambda_u inline (mixmatch.py:118-120): its expression
            st.losses["lambda_u"] = torch.tensor(
                alg.lambda_u * float(np.clip(alg.it / (alg.unsup_warm_up * alg.num_train_iter), 0.0, 1.0)))
        st.losses["loss"] = alg.out_dict["loss"].detach()
        skip = UNUSED_FORWARDS[self.spec.algorithm]
        st.forwards = [f for i, f in enumerate(self._forwards) if i not in skip]
        self.unused.append([f for i, f in enumerate(self._forwards) if i in skip])
        named = [(ours_name(n), p) for n, p in alg.model.named_parameters()]
        st.params = {n: p.detach() for n, p in named}
        params = {n for n, _ in alg.model.named_parameters()}
        st.ema = {ours_name(n): t for n, t in alg.ema.shadow.items() if n in params}  # the shadow holds buffers too
        st.buffers = {ours_name(n): b for n, b in alg.model.named_buffers()}
        st.momentum = momentum_by_name(alg.optimizer, named)
        self.on_step(alg.it, st)
        self.state = StepState()
        self._forwards = []

    # ---- the run -------------------------------------------------------------------------------------------
    def run(self, batches: list[tuple], eval_batch: tuple[torch.Tensor, torch.Tensor],
            on_step: Callable[[int, StepState], None]) -> torch.Tensor:
        """batches: per step (x_lb, y_lb, x_ulb_1, x_ulb_2) (FixMatch: weak and strong views; MixMatch: two weak
        views); eval_batch (x, y): normalised images its evaluation after the last step sees. on_step(k, state)
        after step k (0-based). Returns the evaluated model's logits on eval_batch."""
        self.on_step, self._forwards, self.eval_logits = on_step, [], []
        if len(batches) != self.args.num_train_iter:
            raise ValueError(f"{len(batches)} batches for a spec of {self.args.num_train_iter} steps")
        self.alg.loader_dict = {
            "train_lb": [{"idx_lb": torch.arange(len(b[1])), "x_lb": b[0], "y_lb": b[1]} for b in batches],
            "train_ulb": [{"idx_ulb": torch.arange(len(b[2])), "x_ulb_w": b[2], "x_ulb_s": b[3]} for b in batches],
            "eval": [{"x_lb": eval_batch[0], "y_lb": eval_batch[1]}],
        }
        handle = self.alg.model.register_forward_hook(self._forward_hook)
        try:
            with patches.cpu_device_shim(self.device), self._observers():
                self.alg.train()  # its EvaluationHook evaluates after the last step: one forward of eval_batch
        finally:
            handle.remove()
        if self.alg.it != len(batches) or len(self.eval_logits) != 1:
            raise RuntimeError(f"USB's train() ran {self.alg.it} steps and {len(self.eval_logits)} evaluation "
                               f"forwards, not {len(batches)} and 1")
        return self.eval_logits[0]
