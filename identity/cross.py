"""USB against TorchSSL: USB's unedited AlgorithmBase.train() and TorchSSL's unedited train() in lockstep, from the
same weights on the same batches with TorchSSL's settings, every quantity compared after every step.

TorchSSL's run goes first, every step's state kept; then USB's, compared step by step, twice:
- with TorchSSL's WideResNet class (answering in USB's {'logits', 'feat'} form): USB's loop, hooks, loss, optimizer,
  scheduler and EMA against TorchSSL's. FixMatch: bit-identical. MixMatch: USB's step differs from TorchSSL's (no
  interleaving, the guess not renormalised, L_U's reduction: own_impl/recipes.py), each of which our `usb` recipe
  reproduces bit for bit (check.py against USB) while our `torchssl` recipe reproduces TorchSSL's;
- with USB's own WideResNet, started from TorchSSL's weights less the conv biases USB's blocks do not have: its
  network (those biases, BatchNorm eps 1e-5 in the blocks) makes the first difference at step 1, in the logits.
EXPECTED says which; the check passes when it finds exactly that, and reports which tensors differ and by how much.
MixMatch's lambda and permutation: USB's mixup_one_target starts from the RNG states TorchSSL's started from.
"""
from __future__ import annotations

import dataclasses
import importlib
import time

import torch

from contract.spec import RunSpec
from identity.check import (QUANTITIES_ORDER, Trace, check_spec, compare, exercised, normalized_eval_batch,
                            per_step, reference_batches)
from identity.compare import difference
from identity.own_side import Variant
from identity.torchssl_side import StepState, TorchSSLSide
from identity.usb_side import USBSide
from own_impl.data import DeviceData

NETWORKS = ("torchssl", "usb")  # the network class USB's loop drives
# What each lockstep is known to find: None, identical at every step; 1, a first difference at step 1
EXPECTED = {("fixmatch", "torchssl"): None, ("fixmatch", "usb"): 1,
            ("mixmatch", "torchssl"): 1, ("mixmatch", "usb"): 1}
WHY = {
    ("mixmatch", "torchssl"): "USB's MixMatch step is not TorchSSL's: no interleaving (mixmatch.py:91-92, 109-110), "
                              "the guess not renormalised (mixmatch.py:68), L_U averaged over classes then examples "
                              "(consistency.py:29, 40); our `usb` recipe reproduces each, bit for bit",
    ("fixmatch", "usb"): "USB's WideResNet: no conv biases in the residual blocks, BatchNorm eps 1e-5 there "
                         "(semilearn/nets/wrn/wrn.py:33-44)",
}
WHY[("mixmatch", "usb")] = WHY[("fixmatch", "usb")] + "; and its MixMatch step, as above"


def snapshot(st: StepState) -> StepState:
    """A copy of a step's state that later steps cannot change (the live parameters, buffers and momentum)."""
    def cloned(d: dict) -> dict:
        return {k: v.detach().clone() for k, v in d.items()}

    return StepState(lr=st.lr, forwards=[f.clone() for f in st.forwards], losses=cloned(st.losses),
                     mixed=cloned(st.mixed), params=cloned(st.params), ema=cloned(st.ema),
                     buffers=cloned(st.buffers), momentum=cloned(st.momentum))


def restricted(st: StepState, names: set[str]) -> StepState:
    """st with its per-tensor quantities limited to `names` (the tensors both networks have)."""
    def keep(d: dict) -> dict:
        return {k: v for k, v in d.items() if k in names}

    return dataclasses.replace(st, params=keep(st.params), ema=keep(st.ema), buffers=keep(st.buffers),
                               momentum=keep(st.momentum))


def largest_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], top: int = 5) -> list[dict]:
    """The `top` tensors with the largest relative difference, each with it and its count of differing elements."""
    rows = [{"tensor": n, **difference({n: ours[n]}, {n: theirs[n]}).to_dict()} for n in ours]
    return sorted((r for r in rows if r["n_diff"]), key=lambda r: -r["rel"])[:top]


def usb_run(usb, tssl_wrn, spec: RunSpec, network: str, initial: dict, recorded: list[StepState],
            draws: list | None, batches: list, eval_batch: tuple, device) -> dict:
    """USB's train() on `batches` from `initial` (TorchSSL's weights), compared after every step with TorchSSL's
    recorded states, on the tensors both networks have."""
    side = USBSide(usb, spec, device, network, tssl_wrn, draws_from=draws)
    only_torchssl = side.load_state(initial)
    names = set(initial) - set(only_torchssl)
    trace = Trace(Variant(f"USB's loop, {network} network"))
    first_detail: dict = {}
    before = {"usb": {n: v.clone() for n, v in initial.items() if n in names}, "torchssl": dict(initial)}

    def on_step(k: int, st: StepState) -> None:
        theirs = restricted(recorded[k], names)
        diffs = compare(spec.algorithm, restricted(st, names), theirs, before["usb"], before["torchssl"])
        trace.steps.append(diffs)
        if not first_detail and any(not d.equal for d in diffs.values()):
            first_detail.update({"step": k + 1, "parameters": largest_tensors(st.params, theirs.params),
                                 "logits": [{"forward": i, **difference({"": a}, {"": b}).to_dict()}
                                            for i, (a, b) in enumerate(zip(st.forwards, theirs.forwards))]})
        before["usb"] = {n: p.clone() for n, p in st.params.items() if n in names}
        before["torchssl"] = recorded[k].params

    logits = side.run(batches, eval_batch, on_step)
    return {"trace": trace, "eval_logits": logits, "only_in_torchssl": only_torchssl, "first_detail": first_detail,
            "unused_forwards": sum(len(u) for u in side.unused)}


def cross_case(tssl, usb, base: RunSpec, setting: str, network: tuple[int, int], steps: int, data: DeviceData,
               eval_xy: tuple) -> dict:
    """One setting and size: TorchSSL's run, then USB's loop with each network class, compared with it."""
    spec = check_spec(base, setting, steps, *network, recipe="torchssl")
    device = data.train_x.device
    batches, eval_batch = reference_batches(spec, data), normalized_eval_batch(spec, eval_xy, device)
    t0 = time.perf_counter()
    theirs = TorchSSLSide(tssl, spec, device)
    initial = theirs.initial_state()
    recorded, draws, scalars = [], [], []

    def keep(k: int, st: StepState) -> None:
        recorded.append(snapshot(st))
        draws.append(getattr(theirs, "rng_states", None))
        scalars.append({q: float(v) for q, v in st.losses.items()})

    theirs_logits = theirs.run(batches, eval_batch, keep)
    tssl_wrn = importlib.import_module("models.nets.wrn")  # TorchSSL's, from its checkout (already on sys.path)
    out = {"setting": setting, "network": f"WRN-{network[0]}-{network[1]}", "steps": steps,
           "spec": {k: v for k, v in spec.to_dict().items() if k in (
               "algorithm", "threshold", "weight_decay", "ema_decay", "bn_momentum", "ramp_up", "lambda_u",
               "batch_size", "uratio", "lr")},
           "exercised": exercised(spec.algorithm, scalars)}
    for net in NETWORKS:
        run = usb_run(usb, tssl_wrn, spec, net, initial, recorded,
                      draws if spec.algorithm == "mixmatch" else None, batches, eval_batch, device)
        trace = run["trace"]
        trace.eval_logits = difference({"": run["eval_logits"]}, {"": theirs_logits})
        first = trace.first_difference()
        expected = EXPECTED[(spec.algorithm, net)]
        out[f"{net}_network"] = {
            "identical": first is None, "first_difference": first, "expected_first_step": expected,
            "as_expected": (first is None) if expected is None else (first is not None and first["step"] == expected),
            "eval_logits": trace.eval_logits.to_dict(), "max_rel": trace.max_rel(),
            "only_in_torchssl": run["only_in_torchssl"], "at_first_difference": run["first_detail"],
            "usb_forwards_left_out": run["unused_forwards"], "per_step": per_step(trace)}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def cross_verdict(algorithm: str, cases: list[dict]) -> dict:
    """In words and as booleans, in the keys check.verdict uses: `exact` for USB's loop on TorchSSL's network,
    `shipped` for USB's own network; passed when every lockstep found what EXPECTED says."""
    steps = cases[0]["steps"]
    where = (f"{', '.join(sorted({c['network'] for c in cases}))}; "
             f"{' and '.join(dict.fromkeys(c['setting'] for c in cases))} settings")
    name = "FixMatch" if algorithm == "fixmatch" else "MixMatch"

    def sentence(net: str) -> str:
        found = [c[f"{net}_network"] for c in cases]
        firsts = [f["first_difference"] for f in found if f["first_difference"]]
        what = (f"USB's {name} (AlgorithmBase.train(), its hooks, optimizer, scheduler and EMA) driving TorchSSL's "
                f"WideResNet" if net == "torchssl" else
                f"USB's {name} with its own WideResNet ({len(found[0]['only_in_torchssl'])} conv-bias tensors of "
                f"TorchSSL's left out)")
        if not firsts:
            text = (f"{what}: identical to TorchSSL's train() for {steps} steps ({where}): every compared tensor "
                    f"bit-equal at every step")
        else:
            f = min(firsts, key=lambda f: (f["step"], QUANTITIES_ORDER.get(f["quantity"], 99)))
            params = max(x["max_rel"].get("params", 0.0) for x in found)
            where_in = f"{f['where']}, " if f["where"] else ""
            text = (f"{what}: first difference from TorchSSL's train() at step {f['step']} in {f['quantity']} "
                    f"({where_in}relative {f['rel']:.1e}, {f['n_diff']} of {f['n']} elements); "
                    f"parameters up to {params:.1e} apart by step {steps}")
        why = WHY.get((algorithm, net))
        ok = all(x["as_expected"] for x in found)
        return text + (f" ({why})" if why and firsts else "") + ("" if ok else " — NOT AS EXPECTED")

    ok = all(c[f"{net}_network"]["as_expected"] for c in cases for net in NETWORKS)
    return {"exact_identical": all(c["torchssl_network"]["identical"] for c in cases), "shipped_within_noise": None,
            "bugs_caught": 0, "bugs_planted": 0, "passed": ok, "exact": sentence("torchssl"),
            "shipped": sentence("usb"), "power": "no planted bugs (two references compared with each other)"}


def run_cross_check(tssl, usb, base: RunSpec, data: DeviceData, eval_xy: tuple, steps: int,
                    networks: list[tuple[int, int]], settings: list[str]) -> dict:
    """USB against TorchSSL for base.algorithm, every (setting, network) case."""
    cases = [cross_case(tssl, usb, base, s, n, steps, data, eval_xy) for s in settings for n in networks]
    return {"algorithm": base.algorithm, "subject": "usb", "reference": "torchssl",
            "verdict": cross_verdict(base.algorithm, cases), "cases": cases}
