"""The identity check: for one algorithm, our step and a reference's unedited training loop in lockstep (TorchSSL's
train(), or USB's AlgorithmBase.train() with its hooks), every quantity compared after every step, in each variant of
our side (own_side.Variant) against one run of the reference. Our side follows the reference's recipe (`torchssl`
or `usb`, own_impl/recipes.py). USB against TorchSSL, two references in lockstep with each other, is cross.py.

What "identical" means here, per mode:
- exact: our code with SGD as the per-parameter loop and the EMA as the reference's expression (the arithmetic both
  references use): every compared tensor bit-equal at every step, and the evaluated logits at the end.
- as shipped: our real training step (fused SGD, multi-tensor EMA). Its differences are held to float noise
  (float_noise): how far one ulp in every starting weight carries through the same K steps of the exact code,
  measured in the same lockstep twice (every weight one ulp up, and one ulp down: the larger of the two, since one
  chaotic trajectory alone underestimates the spread), and for state carried across steps one ulp per step. Which shipped part makes the
  first difference is shown by switching each on alone.
- power: each planted bug (bugs.py) in our side only, with the step and the quantity that caught it.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from contract.arrays import eval_subset_indices
from contract.spec import RunSpec
from identity.compare import Difference, difference
from identity.own_side import EXACT, NOISE, NOISE_DOWN, SHIPPED, SHIPPED_EMA, SHIPPED_SGD, OwnSide, Variant
from identity.torchssl_side import StepState, TorchSSLSide
from own_impl.data import DeviceData, normalization_table, normalize
from own_impl.recipes import RECIPES
from own_impl.train import ALGORITHMS

# The references ours can be checked against: each one's name in words and the class driving its loop (its
# constructor: (modules, spec, device)); our side then follows the recipe of the same name.
REFERENCE_NAMES = {"torchssl": "TorchSSL", "usb": "USB"}


def reference_side(reference: str, modules, spec: RunSpec, device: torch.device):
    """The side driving `reference`'s own training loop, built from its imported modules."""
    if reference == "torchssl":
        return TorchSSLSide(modules, spec, device)
    if reference == "usb":
        from identity.usb_side import USBSide

        return USBSide(modules, spec, device)
    raise ValueError(f"reference {reference!r} is not one of {tuple(REFERENCE_NAMES)}")

# The quantities compared each step, in the order a step computes them (the first to differ names the cause).
QUANTITIES = {
    "fixmatch": ("lr", "logits", "bn_buffers", "loss_x", "loss_u", "mask_rate", "loss", "momentum", "update",
                 "params", "ema"),
    "mixmatch": ("lr", "lambda_u", "lam'", "x_mix", "t_mix", "logits", "bn_buffers", "loss_x", "loss_u", "loss",
                 "momentum", "update", "params", "ema"),
}
ACCUMULATED = ("momentum", "params", "ema")  # state carried across steps, where rounding differences add up
ULP = 2.0 ** -23  # float32's relative spacing at 1
EVAL_PER_CLASS = 5  # the final evaluation's fixed batch: the first 5 test images of each class


@dataclass
class Trace:
    """One variant's differences from the reference, per step (1-based), and at the final evaluation."""

    variant: Variant
    steps: list[dict[str, Difference]] = field(default_factory=list)
    eval_logits: Difference | None = None
    stopped_at: int | None = None  # a planted bug's run stops once caught

    def first_difference(self, tolerance: dict[str, float] | None = None) -> dict | None:
        """The first step with a difference (above `tolerance`, if given) and its first quantity in step order."""
        for k, diffs in enumerate(self.steps, start=1):
            for q, d in diffs.items():
                if not d.equal and (tolerance is None or d.rel > tolerance.get(q, 0.0)):
                    return {"step": k, "quantity": q, **d.to_dict()}
        if self.eval_logits is not None and not self.eval_logits.equal and (
                tolerance is None or self.eval_logits.rel > tolerance.get("eval_logits", 0.0)):
            return {"step": len(self.steps), "quantity": "eval_logits", **self.eval_logits.to_dict()}
        return None

    def max_rel(self) -> dict[str, float]:
        out = {q: max((s[q].rel for s in self.steps), default=0.0) for q in (self.steps[0] if self.steps else {})}
        if self.eval_logits is not None:
            out["eval_logits"] = self.eval_logits.rel
        return out

    def to_dict(self) -> dict:
        return {"variant": self.variant.name, "first_difference": self.first_difference(),
                "max_rel": self.max_rel(), "stopped_at": self.stopped_at,
                "eval_logits": self.eval_logits.to_dict() if self.eval_logits else None,
                "per_step": [{q: d.to_dict() for q, d in s.items()} for s in self.steps]}


def compare(algorithm: str, ours: StepState, theirs: StepState, ours_before: dict, theirs_before: dict
            ) -> dict[str, Difference]:
    """Every quantity of one step, ours against theirs. *_before: each side's parameters before the step."""
    def scalar(x) -> dict:
        return {"": torch.as_tensor(x, dtype=torch.float64)}

    def listed(ts: list[torch.Tensor]) -> dict:
        return {f"forward {i}": t for i, t in enumerate(ts)}

    out = {"lr": difference(scalar(ours.lr), scalar(theirs.lr))}
    if len(ours.forwards) != len(theirs.forwards):
        out["logits"] = Difference(1.0, f"{len(ours.forwards)} forwards vs {len(theirs.forwards)}", 1, 1)
    else:
        out["logits"] = difference(listed(ours.forwards), listed(theirs.forwards))
    out["bn_buffers"] = difference(ours.buffers, theirs.buffers)
    for q in QUANTITIES[algorithm]:
        if q in ("lam'", "x_mix", "t_mix"):
            ours_q, theirs_q = ours.mixed[q], theirs.mixed[q]
            if q == "lam'":  # a reference's is one float64 for the batch (a Python float there), used in float32
                ours_q = ours_q.float().reshape(-1)  # ours: (N,) float32; USB's, against TorchSSL's: 0-d float64
                theirs_q = theirs_q.float().expand(ours_q.shape)
            out[q] = difference({"": ours_q}, {"": theirs_q})
        elif q in theirs.losses:
            out[q] = difference(scalar(ours.losses[q]), scalar(theirs.losses[q]))
    out["momentum"] = difference(ours.momentum, theirs.momentum)
    out["update"] = difference({n: p - ours_before[n] for n, p in ours.params.items()},
                               {n: p - theirs_before[n] for n, p in theirs.params.items()})
    out["params"] = difference(ours.params, theirs.params)
    out["ema"] = difference(ours.ema, theirs.ema)
    return {q: out[q] for q in QUANTITIES[algorithm]}


def reference_batches(spec: RunSpec, data: DeviceData) -> list[tuple]:
    """The K batches our side will make (its make_batch, its recipe's seeded samplers), cut as the references'
    loaders yield them: (x_lb, y_lb, x_ulb_1, x_ulb_2)."""
    algorithm = ALGORITHMS[spec.algorithm]
    samplers = RECIPES[spec.recipe].samplers(spec, data)
    b, n_u = spec.batch_size, spec.batch_size * spec.uratio
    out = []
    for k in range(spec.steps):
        x, y_x = algorithm.make_batch(data, samplers, spec, k)[:2]
        out.append((x[:b], y_x, x[b:b + n_u], x[b + n_u:]))
    return out


torchssl_batches = reference_batches  # its earlier name


def normalized_eval_batch(spec: RunSpec, eval_xy: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed evaluation batch as the reference sees it: normalised as the spec's recipe normalises."""
    x, y = eval_xy
    table = normalization_table(device, RECIPES[spec.recipe].normalization)
    return normalize(x.to(device), False, table), y.to(device)


def eval_batch(data_x: np.ndarray, data_y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed evaluation batch, uint8 (N, 3, 32, 32) and labels: the first EVAL_PER_CLASS test images per class."""
    idx = eval_subset_indices(data_y, EVAL_PER_CLASS * 10)
    x = torch.from_numpy(np.ascontiguousarray(data_x[idx].transpose(0, 3, 1, 2)))
    return x, torch.from_numpy(data_y[idx].astype(np.int64))


def lockstep(ref_modules, spec: RunSpec, data: DeviceData, eval_xy: tuple, variants: list[Variant],
             stop_when_caught: set[str] = frozenset(), reference: str = "torchssl"
             ) -> tuple[list[Trace], list[dict[str, float]]]:
    """The reference's own loop over spec.steps steps, and after each of its steps one step of every variant of ours
    on the same batch; every variant compared with the reference after every step, and at the end their
    evaluations. ref_modules: the reference's imported modules (TorchSSL's or USB's)."""
    device = data.train_x.device
    theirs = reference_side(reference, ref_modules, spec, device)
    initial = theirs.initial_state()
    sides = [OwnSide(spec, data, v, initial) for v in variants]
    traces = [Trace(v) for v in variants]
    scalars: list[dict[str, float]] = []  # the reference's losses, mask rate, lambda_u per step: what was exercised
    before = {"theirs": {k: v for k, v in initial.items()}}
    for side in sides:
        before[side.variant.name] = {n: p.detach().clone() for n, p in side.s.model.named_parameters()}

    def on_step(k: int, st: StepState) -> None:
        scalars.append({q: float(v) for q, v in st.losses.items()})
        drawn = getattr(theirs, "drawn", None) if spec.algorithm == "mixmatch" else None
        for side, trace in zip(sides, traces):
            if trace.stopped_at is not None:
                continue
            mine = side.step(drawn)
            trace.steps.append(compare(spec.algorithm, mine, st, before[side.variant.name], before["theirs"]))
            before[side.variant.name] = {n: p.clone() for n, p in mine.params.items()}
            if side.variant.name in stop_when_caught and trace.first_difference() is not None:
                trace.stopped_at = k + 1
        before["theirs"] = {n: p.clone() for n, p in st.params.items()}

    x_eval, y_eval = eval_xy
    theirs_logits = theirs.run(reference_batches(spec, data), normalized_eval_batch(spec, eval_xy, device), on_step)
    for side, trace in zip(sides, traces):
        if trace.stopped_at is None:
            trace.eval_logits = difference({"": side.evaluate(x_eval.to(device), y_eval.to(device))},
                                           {"": theirs_logits})
    return traces, scalars


def check_spec(base: RunSpec, setting: str, steps: int, depth: int, widen: int, recipe: str = "torchssl") -> RunSpec:
    """The spec of one lockstep: `base`'s algorithm and settings ("spec"), or settings where every path shows
    ("stress": a threshold that accepts most pseudo-labels, MixMatch's ramp-up within the steps, weight decay, EMA
    and BatchNorm momentum large enough that their errors show), at a small size: B 4, our recipe `recipe` (the
    reference's)."""
    values = dict(impl="own", recipe=recipe, steps=steps, eval_every=steps, batch_size=4, depth=depth,
                  widen_factor=widen, precision="fp32", channels_last=False, checkpoint_every=steps, log_every=1)
    if base.algorithm == "fixmatch":
        values["uratio"] = 2
    if setting == "stress":
        values.update(weight_decay=0.05, ema_decay=0.9, bn_momentum=0.1)
        if base.algorithm == "fixmatch":
            values["threshold"] = 0.35
        else:
            values["ramp_up"] = 0.5
    elif setting != "spec":
        raise ValueError(f"setting {setting!r} is not one of 'stress', 'spec'")
    return dataclasses.replace(base, **values)


# ---------------------------------------------------------------------------------------------------------------
# The whole check of one algorithm, and its verdict


def network_name(depth: int, widen: int) -> str:
    return f"WRN-{depth}-{widen}"


def running_max(values: list[float]) -> list[float]:
    out, m = [], 0.0
    for v in values:
        m = max(m, v)
        out.append(m)
    return out


def per_step(trace: Trace) -> dict[str, list[float]]:
    return {q: [s[q].rel for s in trace.steps] for q in (trace.steps[0] if trace.steps else {})}


def envelope(traces: list[Trace]) -> Trace:
    """One trace holding, per step and quantity (and for the evaluated logits), the largest difference of `traces`:
    the float noise of several measurements at once."""
    def larger(ds: list[Difference | None]) -> Difference | None:
        ds = [d for d in ds if d is not None]
        return max(ds, key=lambda d: d.rel) if ds else None

    steps = [{q: larger([s.get(q) for s in at]) for q in at[0]} for at in zip(*(t.steps for t in traces))]
    return Trace(Variant("float noise: " + " or ".join(t.variant.name for t in traces)), steps,
                 larger([t.eval_logits for t in traces]))


def float_noise(noise: Trace) -> dict[str, list[float]]:
    """Per quantity and step k (0-based), the float noise a difference is held to: the larger of what one ulp in
    every starting weight did to the quantity by step k + 1 (measured: the NOISE variant, running maximum), and, for
    the state carried from step to step (parameters, momentum, EMA), k + 1 ulps: two implementations of one update
    rounding once per step each can drift apart by up to an ulp per step. The evaluated logits: eval_noise."""
    bound = {q: running_max(v) for q, v in per_step(noise).items()}
    for q in ACCUMULATED:
        if q in bound:
            bound[q] = [max(b, (k + 1) * ULP) for k, b in enumerate(bound[q])]
    return bound


def within(trace: Trace, noise: Trace) -> dict | None:
    """The first (step, quantity) where `trace` differs from the reference by more than float noise (float_noise);
    None if it never does."""
    bound = float_noise(noise)
    for k, diffs in enumerate(trace.steps):
        for q, d in diffs.items():
            if d.rel > bound[q][k]:
                return {"step": k + 1, "quantity": q, "rel": d.rel, "noise": bound[q][k], "where": d.where}
    if trace.eval_logits and noise.eval_logits and trace.eval_logits.rel > eval_noise(noise, bound):
        return {"step": len(trace.steps), "quantity": "eval_logits", "rel": trace.eval_logits.rel,
                "noise": eval_noise(noise, bound), "where": ""}
    return None


def eval_noise(noise: Trace, bound: dict[str, list[float]]) -> float:
    """The evaluated logits' float noise: the reference's, scaled by how much further the EMA weights they come from
    may drift (one ulp per step) than the reference moved them."""
    moved = running_max(per_step(noise)["ema"])[-1]
    return noise.eval_logits.rel * max(1.0, bound["ema"][-1] / moved) if moved > 0 else math.inf


def exercised(algorithm: str, scalars: list[dict[str, float]]) -> dict:
    """What the reference computed, so a reader sees the paths were live: FixMatch's mask rate per step (accepted
    fraction), MixMatch's ramped lambda_u, and the unlabelled loss."""
    key = "mask_rate" if algorithm == "fixmatch" else "lambda_u"
    values = [s[key] for s in scalars]
    out = {key: values, "loss_u": [s["loss_u"] for s in scalars]}
    if algorithm == "fixmatch":
        out["steps_with_some_accepted"] = sum(v > 0 for v in values)
        out["steps_with_some_rejected"] = sum(v < 1 for v in values)
    return out


def case(ref_modules, base: RunSpec, setting: str, network: tuple[int, int], steps: int, data: DeviceData,
         eval_xy: tuple, bugs: list, shipped_mode: bool = True, reference: str = "torchssl") -> dict:
    """One lockstep (one setting, one network) with every variant (shipped_mode False: exact mode and the bugs
    only); its summary."""
    spec = check_spec(base, setting, steps, *network, recipe=reference)
    bug_variants = [Variant(f"planted: {b.name}", bug=b.plant) for b in bugs]
    variants = [EXACT, *((SHIPPED, SHIPPED_SGD, SHIPPED_EMA, NOISE, NOISE_DOWN) if shipped_mode else ()),
                *bug_variants]
    t0 = time.perf_counter()
    traces, scalars = lockstep(ref_modules, spec, data, eval_xy, variants, {v.name for v in bug_variants}, reference)
    by = {t.variant.name: t for t in traces}
    exact, shipped = by[EXACT.name], by.get(SHIPPED.name)
    noise = envelope([by[NOISE.name], by[NOISE_DOWN.name]]) if shipped_mode else None
    first = shipped.first_difference() if shipped else None
    causes = [part for part, v in (("fused SGD", SHIPPED_SGD), ("multi-tensor EMA (lerp)", SHIPPED_EMA))
              if first and (f := by[v.name].first_difference()) and (f["step"], f["quantity"]) == (
                  first["step"], first["quantity"])]
    power = []
    for b, v in zip(bugs, bug_variants):
        f = by[v.name].first_difference()
        above = within(by[v.name], noise) if f and noise else None
        power.append({"bug": b.name, "caught": f is not None, "first_difference": f,
                      "above_noise": above is not None and f is not None and above["step"] == f["step"]})
    return {
        "setting": setting, "network": network_name(*network), "steps": steps,
        "spec": {k: v for k, v in spec.to_dict().items() if v is not None and k not in (
            "impl", "n_labels", "seed", "data_kind", "data_sha256", "split_sha256", "dataset", "num_classes",
            "eval_every", "eval_subset", "eval_batch_size", "checkpoint_every", "log_every", "channels_last")},
        "seconds": round(time.perf_counter() - t0, 1),
        "exercised": exercised(base.algorithm, scalars),
        "exact": {"identical": exact.first_difference() is None, "first_difference": exact.first_difference(),
                  "eval_logits_identical": bool(exact.eval_logits and exact.eval_logits.equal)},
        "shipped": {"first_difference": first, "from": causes, "above_noise": within(shipped, noise),
                    "max_rel": shipped.max_rel()} if shipped else None,
        "attribution": {v.name: by[v.name].first_difference() for v in (SHIPPED_SGD, SHIPPED_EMA)} if shipped
        else None,
        "noise": {"max_rel": noise.max_rel()} if noise else None,
        "power": power,
        "per_step": {name: per_step(t) for name, t in (("exact", exact), ("as shipped", shipped), ("noise", noise))
                     if t is not None},
        "eval_logits": {t.variant.name: (t.eval_logits.rel if t.eval_logits else None)
                        for t in (exact, shipped, noise) if t is not None},
    }


def verdict(cases: list[dict], reference: str = "torchssl") -> dict:
    """The algorithm's verdict over its cases, in words and as booleans."""
    exact_ok = all(c["exact"]["identical"] for c in cases)
    shipped_ok = all(c["shipped"]["above_noise"] is None for c in cases if c["shipped"])
    power = [p for c in cases for p in c["power"]]
    caught = sum(p["caught"] for p in power)
    steps = cases[0]["steps"]
    nets = sorted({c["network"] for c in cases})
    settings = list(dict.fromkeys(c["setting"] for c in cases))
    where = f"{', '.join(nets)}; {' and '.join(settings)} settings"
    against = f"{REFERENCE_NAMES[reference]}'s {'train()' if reference == 'torchssl' else 'AlgorithmBase.train()'}"
    if exact_ok:
        exact = (f"identical to {against} in exact mode for {steps} steps ({where}): every compared tensor "
                 f"bit-equal at every step")
    else:
        bad = next(c for c in cases if not c["exact"]["identical"])
        f = bad["exact"]["first_difference"]
        exact = (f"DIFFERENT in exact mode: first at step {f['step']} in {f['quantity']} ({f['where'] or 'scalar'}, "
                 f"relative {f['rel']:.1e}; {bad['network']}, {bad['setting']})")
    firsts = [(c["shipped"]["first_difference"], c) for c in cases if c["shipped"] and c["shipped"]["first_difference"]]
    if not any(c["shipped"] for c in cases):
        shipped = "as shipped: not run"
    elif not firsts:
        shipped = "as shipped: identical too"
    else:
        f, c = min(firsts, key=lambda fc: (fc[0]["step"], QUANTITIES_ORDER.get(fc[0]["quantity"], 99)))
        cause = " and ".join(c["shipped"]["from"]) or "an unattributed part"
        shipped = (f"as shipped, first difference at step {f['step']} in {f['quantity']} ({f['where'] or 'scalar'}, "
                   f"relative {f['rel']:.1e}), from {cause}; "
                   + ("within one-ulp float noise at every step" if shipped_ok else "ABOVE one-ulp float noise"))
    power_text = f"{caught} of {len(power)} planted bugs caught" if power else "no planted bugs run"
    return {"exact_identical": exact_ok, "shipped_within_noise": shipped_ok, "bugs_caught": caught,
            "bugs_planted": len(power), "passed": exact_ok and shipped_ok and caught == len(power),
            "exact": exact, "shipped": shipped, "power": power_text}


QUANTITIES_ORDER = {q: i for i, q in enumerate(dict.fromkeys(QUANTITIES["fixmatch"] + QUANTITIES["mixmatch"]))}


def run_check(ref_modules, base: RunSpec, data: DeviceData, eval_xy: tuple, steps: int,
              networks: list[tuple[int, int]], settings: list[str], power: bool = True, shipped: bool = True,
              reference: str = "torchssl") -> dict:
    """Every (setting, network) case of base.algorithm, ours (the reference's recipe) against `reference` (its
    modules: ref_modules); the planted bugs in the first setting (stress, where every path is live), on each network
    where they apply."""
    from identity.bugs import BUGS

    cases = []
    for setting in settings:
        for network in networks:
            bugs = [b for b in BUGS if b.applies(base.algorithm, network, reference)] if (
                power and setting == settings[0]) else []
            cases.append(case(ref_modules, base, setting, network, steps, data, eval_xy, bugs, shipped, reference))
    return {"algorithm": base.algorithm, "subject": "own", "reference": reference,
            "verdict": verdict(cases, reference), "cases": cases}
