"""own_impl.train with torch.compile: the same step as eager within float tolerance, and a resumable run."""
import json

import numpy as np
import pytest
import torch

from contract.spec import RunSpec, read_spec
from own_impl import augment as A
from own_impl import ctaugment
from own_impl import compile as compile_mod
from own_impl import data as data_mod
from own_impl import fixmatch
from own_impl import train as train_mod

from conftest import copy_run, cuda_param

CPU = torch.device("cpu")
CUDA = cuda_param()
# WRN-10-1 keeps compilation short; the code paths are those of WRN-28-2.
TINY = {"depth": 10, "widen_factor": 1}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (inductor's disk cache keeps that quick): compiled code of one test cannot
    stand in for another's, and no test runs into dynamo's limit on recompilations of the same function."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def tiny_spec(**overrides) -> RunSpec:
    # threshold 0.18 with mu=4: the three batches below accept 0, 1 and 8 of 8 unlabelled images (max q from 0.14
    # to 0.25, none within 0.002 of the threshold), so both branches of the loss count
    values = dict(impl="own", n_labels=40, seed=0, data_kind="synthetic", data_sha256="-", split_sha256="-",
                  batch_size=2, uratio=4, threshold=0.18, **TINY)
    values.update(overrides)
    return RunSpec(**values)


def batch(spec: RunSpec, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_x, n_u = spec.batch_size, spec.batch_size * spec.uratio
    x = data_mod.normalize(torch.randint(0, 256, (n_x + 2 * n_u, 3, 32, 32), dtype=torch.uint8, generator=g),
                            spec.channels_last)
    return x, torch.randint(0, 10, (n_x,), generator=g), torch.randint(0, 10, (n_u,), generator=g)


def three_steps(spec: RunSpec, compiled: bool, dtype=torch.float32, device: str = "cpu"):
    """Stats of three training steps, and the weights and EMA after them (on the CPU), from the same init."""
    torch.manual_seed(0)
    model, ema, optimizer = train_mod.build(spec, CPU)
    model, ema.model = model.to(device), ema.model.to(device)  # same initial weights on every device
    if dtype == torch.float64:  # the reference: eager, every tensor in float64
        model.double(), ema.model.double()
        optimizer = torch.optim.SGD(train_mod.param_groups(model, spec.weight_decay), lr=spec.lr,
                                    momentum=spec.momentum, nesterov=spec.nesterov)
    loss_fn = compile_mod.make_loss_fn(fixmatch.forward_loss, model, spec, compiled)
    if compiled:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        compile_mod.warm_up_loss(fixmatch, model, loss_fn, spec, torch.Size((3, 32, 32)))
        # the warm-up leaves weights, BatchNorm statistics and gradients as they were
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert all(p.grad is None for p in model.parameters())
    stats = []
    for k in range(3):
        x, y_x, y_u = batch(spec, k)
        x, y_x, y_u = x.to(device, dtype), y_x.to(device), y_u.to(device)
        stats.append({k: v.cpu() for k, v in
                      train_mod.train_step(model, ema, optimizer, loss_fn, (x, y_x, y_u), 0.03).items()})
    on_cpu = lambda state: {k: v.cpu() for k, v in state.items()}  # noqa: E731
    return stats, on_cpu(model.state_dict()), on_cpu(ema.state_dict())


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_steps_match_a_float64_reference(channels_last, device, monkeypatch):
    # Against an independent float64 eager run, not against eager float32: on the CPU, eager BatchNorm in
    # channels_last is itself ~1e-6 off in its statistics (one-pass variance), compiled code is not.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # full float32 convolutions on a GPU
    spec = tiny_spec(channels_last=channels_last)
    s_ref, m_ref, e_ref = three_steps(spec, False, torch.float64)
    s_c, m_c, e_c = three_steps(spec, True, device=device)
    assert [float(s["mask_rate"]) for s in s_ref] == [0.0, 0.125, 1.0]
    assert m_c.keys() == m_ref.keys()  # the module is never wrapped: no "_orig_mod." prefix
    # float32 rounding lands near 2e-7 here; lambda_u 1.1 for 1.0 moves a weight by 5e-3, threshold 0.17 by 1e-2
    close = {"rtol": 0, "atol": 1e-5}
    for a, b in zip(s_ref, s_c):
        for k in a:
            torch.testing.assert_close(b[k].double(), a[k].double(), **close, msg=lambda m, k=k: f"{k}: {m}")
    for k in m_ref:  # three SGD steps later: weights, BN statistics, the EMA
        if m_ref[k].is_floating_point():
            torch.testing.assert_close(m_c[k].double(), m_ref[k], **close, msg=lambda m, k=k: f"{k}: {m}")
            torch.testing.assert_close(e_c[k].double(), e_ref[k], **close, msg=lambda m, k=k: f"EMA {k}: {m}")
        else:
            assert torch.equal(m_c[k], m_ref[k])


def test_compile_choice():
    use = compile_mod.use_compile
    assert use(CPU, None, 999) == (False, False)  # the CPU's default for short runs
    assert use(CPU, None, compile_mod.CPU_COMPILE_MIN_STEPS) == (True, False)  # and for long ones
    assert use(torch.device("cuda"), None, 3) == (True, False)  # the GPU's default
    assert use(CPU, True, 3) == (True, True)
    assert use(torch.device("cuda"), False, 3) == (False, True)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_compiled_run_resumes_like_a_straight_run(make_run_dir, tmp_path, device):
    straight = make_run_dir("own", steps=4, eval_every=2, checkpoint_every=2, log_every=1, **TINY)
    spec, files = read_spec(straight / "spec.json")
    dev = torch.device(device)
    resumed = copy_run(straight, tmp_path / "resumed")
    train_mod.train(spec, files, straight, dev, compile=True)
    assert train_mod.train(spec, files, resumed, dev, stop_after=2, compile=True) is None
    first = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in first["model"]) and first["compile_seconds"] > 0
    train_mod.train(spec, files, resumed, dev, compile=True)

    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    worst = 0.0
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            # the CPU repeats itself exactly; a GPU's atomics and algorithm choices may differ in the last bits
            torch.testing.assert_close(b[part][k], a[part][k], rtol=0, atol=0 if device == "cpu" else 1e-4,
                                       msg=lambda m, k=k, part=part: f"{part} {k}: {m}")
            worst = max(worst, float((b[part][k].double() - a[part][k].double()).abs().max()))
    print(f"resumed on {device}: largest |resumed - straight| over weights, statistics and EMA: {worst:.3g}")
    result = json.loads((resumed / "result.json").read_text())
    assert result["compiled"] is result["augmentation_compiled"] is True
    assert result["compile_seconds"] > first["compile_seconds"]
    log = (resumed / "log.txt").read_text()
    # once per process each, kept out of train_seconds
    assert log.count("compiled the augmentation in") == log.count("compiled forward + loss + backward in") == 2
    # an eager process picks up a compiled run's checkpoint: same keys, same state
    eager = copy_run(straight, tmp_path / "eager")
    assert train_mod.train(spec, files, eager, dev, stop_after=2, compile=True) is None
    result = train_mod.train(spec, files, eager, dev, compile=False)
    assert result["compiled"] is result["augmentation_compiled"] is False and result["steps"] == 4


def test_step_and_augmentation_trace_as_one_graph_each():
    """A graph break would split the compiled step and cost launches on a GPU, silently: there is none."""
    spec = tiny_spec()
    torch.manual_seed(0)
    model, _, _ = train_mod.build(spec, CPU)
    x, y_x, y_u = batch(spec)
    explained = torch._dynamo.explain(lambda *a: fixmatch.forward_loss(model, *a, spec))(x, y_x, y_u)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    args = (images, A.sample_weak_params(6, g), images[2:], A.sample_strong_params(4, 32, 32, g),
            data_mod.normalization_table(CPU), False)
    explained = torch._dynamo.explain(fixmatch.augmenter("paper"))(*args)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def tiny_data(device: str = "cpu") -> data_mod.DeviceData:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, 10, (64,), generator=g).to(device)
    return data_mod.DeviceData(images, labels, np.arange(40), images[:0], labels[:0], "-")


def samplers(data: data_mod.DeviceData, cta: bool = False) -> data_mod.Samplers:
    device = data.train_x.device
    return data_mod.Samplers(data_mod.EpochSampler(data.labelled, 1),
                             data_mod.EpochSampler(np.arange(len(data.train_y)), 2),
                             torch.Generator(device=device).manual_seed(3),
                             ctaugment.CTAugment(device=device) if cta else None)


def batches(data: data_mod.DeviceData, spec: RunSpec, augment_fn, n: int = 2) -> list:
    """n batches; with CTAugment, each batch's probe images appended."""
    s = samplers(data, cta=spec.recipe == "paper-cta")
    out = []
    for _ in range(n):
        batch = fixmatch.make_batch(data, s, spec, augment_fn=augment_fn)
        out.append((*batch, s.cta.probe.images) if s.cta else batch)
    return out


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("channels_last, recipe", [(False, "paper"), (True, "paper"), (False, "torchssl"),
                                                   (False, "paper-cta"), (False, "usb")])
def test_compiled_batches_are_the_eager_batches(channels_last, recipe, device):
    """make_batch with the compiled augmentation: the same random draws, the same float inputs, bit for bit (on a
    GPU against the GPU's eager batches, which draw from a CUDA generator), for either recipe."""
    spec = tiny_spec(channels_last=channels_last, recipe=recipe)
    data = tiny_data(device)
    compiled = compile_mod.make_augment_fn(fixmatch, recipe, True)
    eager, comp, again = (batches(data, spec, fn) for fn in (None, compiled, compiled))
    for e, c in zip(eager, comp):
        for a, b in zip(e, c):
            assert torch.equal(a, b) and a.stride() == b.stride()
    assert torch.equal(comp[1][0], again[1][0])  # and repeatable
    assert not torch.equal(eager[0][0], eager[1][0])


def test_batches_draw_in_the_order_of_weak_then_strong_augment():
    """make_batch draws what normalize([weak_augment(labelled + unlabelled); strong_augment(unlabelled)]) would
    from one generator, in that order: runs made before the draws were split from the augmentation reproduce."""
    spec = tiny_spec()
    data = tiny_data()
    got = batches(data, spec, None, n=3)
    lab, unl = data_mod.EpochSampler(data.labelled, 1), data_mod.EpochSampler(np.arange(64), 2)
    gen = torch.Generator().manual_seed(3)
    for x, y_x, y_u in got:
        idx_x, idx_u = lab.next(spec.batch_size), unl.next(spec.batch_size * spec.uratio)
        weak = A.weak_augment(data.train_x[torch.cat([idx_x, idx_u])], gen)
        strong = A.strong_augment(data.train_x[idx_u], gen)
        # the reference normalization, per pixel as x * scale + shift
        want = torch.stack([torch.cat([weak, strong])[:, c].float() * (1.0 / (255.0 * s)) + (-m / s)
                            for c, (m, s) in enumerate(zip(data_mod.CIFAR10_MEAN, data_mod.CIFAR10_STD))], 1)
        assert torch.equal(x, want) and torch.equal(y_x, data.train_y[idx_x]) and torch.equal(y_u, data.train_y[idx_u])


@pytest.mark.parametrize("broken", ["warm_up_augment", "warm_up_loss"])
def test_a_default_compile_that_fails_falls_back_part_by_part(make_run_dir, monkeypatch, broken):
    """Compiling by default (not asked for) and one part fails to compile (say, no C++ compiler or no Triton): that
    part runs eager, the other stays compiled, the log says so. Asked for, the failure is the run's."""
    monkeypatch.setattr(compile_mod, "CPU_COMPILE_MIN_STEPS", 1)

    def fail(*args, **kwargs):
        raise RuntimeError("no C++ compiler\n(details)")

    monkeypatch.setattr(compile_mod, broken, fail)
    run = make_run_dir("own", steps=2, eval_every=2, checkpoint_every=2, **TINY)
    spec, files = read_spec(run / "spec.json")
    result = train_mod.train(spec, files, run, CPU)
    aug_broken = broken == "warm_up_augment"
    assert (result["augmentation_compiled"], result["compiled"], result["steps"]) == (not aug_broken, aug_broken, 2)
    log = (run / "log.txt").read_text()
    failed, worked = ("the augmentation", "forward + loss + backward")[::1 if aug_broken else -1]
    assert f"torch.compile of {failed} failed (RuntimeError: no C++ compiler); {failed} runs eager" in log
    assert f"compiled {worked} in" in log and f"compiled {failed} in" not in log

    asked = make_run_dir("own", seed=1, steps=2, eval_every=2, checkpoint_every=2, **TINY)
    spec, files = read_spec(asked / "spec.json")
    with pytest.raises(RuntimeError, match="no C[+][+] compiler"):
        train_mod.train(spec, files, asked, CPU, compile=True)
