"""Our FixMatch with the `paper-cta` recipe through own_impl.train: the probe updates the rates every step, the rates
are checkpointed and logged, and a resumed run equals an uninterrupted one bit for bit on the CPU."""
import json

import numpy as np
import torch

from contract.results import read_metrics
from contract.spec import read_spec
from own_impl import ctaugment, fixmatch
from own_impl import data as data_mod
from own_impl import train as train_mod

from conftest import copy_run

CPU = torch.device("cpu")
TINY = {"depth": 10, "widen_factor": 1}


def test_batch_draws_a_probe_of_the_weak_labelled_images():
    """make_batch with CTAugment: the strong view drawn from the rates, and the probe: the probe policy applied to
    exactly the weak labelled images that go into the step (normalised), with their labels."""
    from contract.spec import RunSpec

    spec = RunSpec(impl="own", recipe="paper-cta", n_labels=40, seed=0, data_kind="-", data_sha256="-",
                   split_sha256="-", batch_size=2, uratio=2)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    data = data_mod.DeviceData(images, torch.randint(0, 10, (64,), generator=g), np.arange(40), images[:0],
                               images[:0, 0, 0, 0].long(), "-")
    samplers = data_mod.Samplers.seeded(0, data, cta=True)
    x, y_x, y_u = fixmatch.make_batch(data, samplers, spec)
    probe = samplers.cta.probe
    assert x.shape == (2 + 2 * 4, 3, 32, 32) and probe.images.shape == (2, 3, 32, 32)
    assert torch.equal(probe.labels, y_x)
    weak_labelled = x[:2]  # normalised weak views; the probe is the policy applied to their uint8 source
    table = data_mod.normalization_table(CPU)
    for i in range(2):
        levels = torch.stack([(weak_labelled[i, c] - table[c, 0]).div(table[c, 1] - table[c, 0]).round()
                              for c in range(3)]).to(torch.uint8)  # back to uint8: the table is affine per channel
        policy = ctaugment.CTAPolicy(*(t[i:i + 1] for t in probe.policy))
        want = data_mod.normalize(ctaugment.apply_policy(levels[None], policy), False)
        assert torch.equal(probe.images[i:i + 1], want)


def test_rates_learn_and_a_resumed_run_equals_an_uninterrupted_one(make_run_dir, tmp_path):
    run = make_run_dir("own", recipe="paper-cta", steps=6, eval_every=3, checkpoint_every=3, log_every=1, **TINY)
    spec, files = read_spec(run / "spec.json")
    whole = train_mod.train(spec, files, run, CPU, compile=False)
    initial = ctaugment.CTAugment().rate_table()
    assert whole["cta_rates"] != initial  # 6 steps of B=2 probes moved some bins
    cta_records = [r for r in read_metrics(run) if r["kind"] == "cta"]
    assert [r["step"] for r in cta_records] == [3, 6] and cta_records[-1]["rates"] == whole["cta_rates"]
    assert "CTAugment" in whole["impl_settings"]["strong_augmentation"]

    resumed = copy_run(run, tmp_path / "resumed")
    assert train_mod.train(spec, files, resumed, CPU, stop_after=3, compile=False) is None
    ckpt = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert not torch.equal(ckpt["rng"]["cta"]["rates"], ctaugment.CTAugment().rates)  # the rates are checkpointed
    again = train_mod.train(spec, files, resumed, CPU, compile=False)
    assert again["resumed_at"] == [3]
    assert [e["top1"] for e in again["evals"]] == [e["top1"] for e in whole["evals"]]
    assert again["cta_rates"] == whole["cta_rates"]
    a = torch.load(run / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert json.dumps([r for r in read_metrics(run) if r["kind"] == "cta"]) == \
        json.dumps([r for r in read_metrics(resumed) if r["kind"] == "cta"])
