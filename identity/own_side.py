"""Our training step, as own_impl/train.py runs it, on the batches and from the weights the reference's side has
(TorchSSL's or USB's), showing its state after every step in the terms the reference sides use
(torchssl_side.StepState)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from contract.spec import RunSpec
from identity.compare import nudged
from identity.torchssl_side import StepState, forwards_kept, momentum_by_name, swapped
from own_impl import mixmatch
from own_impl.compile import make_loss_fn
from own_impl.data import DeviceData
from own_impl.recipes import RECIPES
from own_impl.train import ALGORITHMS, RunState, advance, build, evaluate


@dataclass(frozen=True)
class Variant:
    """How our side is set up: the arithmetic of its optimizer and EMA, its starting weights, a planted bug."""

    name: str
    sgd_loop: bool = True  # SGD as the per-parameter loop (the references' arithmetic); False: fused, as shipped
    ema_per_tensor: bool = True  # the EMA as the references' expression; False: one multi-tensor lerp, as shipped
    nudge: str = ""  # "away" or "toward": every starting weight one ulp away from zero, or toward it: how far float
    # noise alone carries in K steps
    bug: Callable[[], ContextManager] | None = None  # planted in our code while it builds and steps


EXACT = Variant("exact")
SHIPPED = Variant("as shipped", sgd_loop=False, ema_per_tensor=False)
SHIPPED_SGD = Variant("as shipped, SGD only", sgd_loop=False)
SHIPPED_EMA = Variant("as shipped, EMA only", ema_per_tensor=False)
NOISE = Variant("exact, weights one ulp up", nudge="away")
NOISE_DOWN = Variant("exact, weights one ulp down", nudge="toward")


@contextlib.contextmanager
def mixup_kept(into: dict):
    """own_impl.mixmatch.mixup keeps its mixed inputs and targets and lambda' in `into`; its result is unchanged."""
    mixup = mixmatch.mixup

    def kept(x, y, perm, lam):
        x_mix, t_mix = mixup(x, y, perm, lam)
        into.update({"x_mix": x_mix.detach(), "t_mix": t_mix.detach(),
                     "lam'": torch.maximum(lam, 1 - lam).expand(x.shape[0]).float()})
        return x_mix, t_mix

    with swapped(mixmatch, mixup=kept):
        yield


class OwnSide:
    """One variant of our side: its model, EMA, optimizer and samplers, built by own_impl.train.build."""

    def __init__(self, spec: RunSpec, data: DeviceData, variant: Variant, initial: dict[str, torch.Tensor]):
        self.spec, self.data, self.variant = spec, data, variant
        self.algorithm = ALGORITHMS[spec.algorithm]
        device = data.train_x.device
        with self.planted():
            model, ema, optimizer = build(spec, device, reference_arithmetic=variant.sgd_loop)
            ema.per_tensor = variant.ema_per_tensor
            start = {k: nudged(v, variant.nudge == "toward") if variant.nudge and v.is_floating_point() else v
                     for k, v in initial.items()}
            model.load_state_dict(start)
            ema.model.load_state_dict(start)  # the EMA starts as the live weights, as the references' train() register
            samplers = RECIPES[spec.recipe].samplers(spec, data)
            self.s = RunState(data, samplers, model, ema, optimizer)
            self.loss_fn = make_loss_fn(self.algorithm.forward_loss, model, spec, compile=False)

    def planted(self) -> ContextManager:
        return self.variant.bug() if self.variant.bug else contextlib.nullcontext()

    def step(self, drawn: tuple[float, torch.Tensor] | None = None) -> StepState:
        """One step of own_impl.train's loop: make_batch, then advance. drawn: MixMatch's lambda and permutation as
        the reference's step drew them (from numpy's and torch's global generators, which ours does not use)."""
        s, st = self.s, StepState()
        with self.planted(), forwards_kept(s.model, st.forwards), mixup_kept(st.mixed):
            inputs = self.algorithm.make_batch(s.data, s.samplers, self.spec, s.step)
            if drawn is not None:
                lam, perm = drawn  # one lambda for the batch, as our `torchssl` recipe draws it: a 0-d float64
                inputs = (*inputs[:3], torch.tensor(lam, dtype=torch.float64, device=inputs[0].device),
                          perm.to(inputs[0].device), inputs[5])
            stats, st.lr = advance(s, self.spec, self.loss_fn, inputs)
        st.losses = dict(stats)
        named = list(s.model.named_parameters())
        st.params = {n: p.detach() for n, p in named}
        st.ema = {n: p.detach() for n, p in s.ema.model.named_parameters()}
        st.buffers = dict(s.model.named_buffers())
        st.momentum = momentum_by_name(s.optimizer, named)
        return st

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Our evaluation (own_impl.train.evaluate: the EMA model, eval mode) of uint8 images x; its logits."""
        out: list[torch.Tensor] = []
        with forwards_kept(self.s.ema.model, out):
            evaluate(self.s.ema.model, x, y, self.spec)
        return torch.cat(out)
