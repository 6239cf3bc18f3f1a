"""own_impl.optim: the cosine schedule, EMA arithmetic by hand, weight-decay groups."""
import math

import pytest
import torch
import torch.nn as nn

from own_impl.model import WideResNet
from own_impl.optim import EMA, cosine_lr, param_groups

from conftest import cuda_param


def test_schedule_values():
    K = 1000
    assert cosine_lr(0.03, 0, K) == 0.03
    # cos(7 pi / 32) = cos(39.375 deg) = 0.7730104534; cos(7 pi / 16) = cos(78.75 deg) = sin(11.25 deg) = 0.1950903220
    assert cosine_lr(0.03, K // 2, K) == pytest.approx(0.03 * 0.7730104534, rel=1e-9)
    assert cosine_lr(0.03, K, K) == pytest.approx(0.03 * 0.1950903220, rel=1e-9)
    lrs = [cosine_lr(0.03, k, K) for k in range(K + 1)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_ema_arithmetic_and_bn_buffers():
    live = nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        live[0].weight.fill_(1.0), live[0].bias.fill_(-2.0)
    ema = EMA(live, decay=0.9)
    with torch.no_grad():
        live[0].weight.fill_(2.0), live[0].bias.fill_(0.0)
    live[1].running_mean.fill_(5.0), live[1].running_var.fill_(7.0), live[1].num_batches_tracked.fill_(3)
    ema.update(live)
    # 0.9 * 1 + 0.1 * 2 = 1.1 ; 0.9 * -2 + 0.1 * 0 = -1.8
    assert ema.model[0].weight.item() == pytest.approx(1.1, abs=1e-6)
    assert ema.model[0].bias.item() == pytest.approx(-1.8, abs=1e-6)
    ema.update(live)
    # 0.9 * 1.1 + 0.1 * 2 = 1.19
    assert ema.model[0].weight.item() == pytest.approx(1.19, abs=1e-6)
    # BN statistics are copied from the live model, not averaged
    assert ema.model[1].running_mean.item() == 5.0 and ema.model[1].running_var.item() == 7.0
    assert ema.model[1].num_batches_tracked.item() == 3
    assert live[0].weight.item() == 2.0  # the live model is untouched
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training


def test_weight_decay_only_on_conv_and_linear_weights():
    model = WideResNet(num_classes=10)
    decay, no_decay = param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    # TorchSSL's rule, by name: no decay for anything named 'bn' or 'bias'
    by_name = {id(p) for n, p in model.named_parameters() if "bn" not in n and "bias" not in n}
    assert {id(p) for p in decay["params"]} == by_name
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert all(p.dim() == 1 for p in no_decay["params"]) and all(p.dim() > 1 for p in decay["params"])
    assert math.isclose(sum(p.numel() for p in decay["params"]), 1_463_984)


def plain_loop_twin(model: nn.Module, spec) -> tuple[nn.Module, torch.optim.Optimizer]:
    twin = WideResNet(spec.num_classes, spec.depth, spec.widen_factor)
    twin.load_state_dict(model.state_dict())
    return twin, torch.optim.SGD(param_groups(twin, spec.weight_decay), lr=spec.lr, momentum=spec.momentum,
                                 nesterov=spec.nesterov, foreach=False)


@pytest.mark.parametrize("reference", [False, True])
def test_training_optimizer_against_the_per_parameter_loop(reference):
    """As shipped, SGD is fused: the loop's formula, rounded differently (equal within float tolerance, not bit for
    bit: its vectorised body and tail may fuse a multiply-add). With reference_arithmetic it is the loop itself."""
    from contract.spec import RunSpec
    from own_impl.train import build

    spec = RunSpec(impl="own", n_labels=40, seed=0, data_kind="-", data_sha256="-", split_sha256="-", depth=10,
                   widen_factor=1)
    torch.manual_seed(0)
    model, _, opt = build(spec, torch.device("cpu"), reference_arithmetic=reference)
    assert all(g["fused"] is (not reference) for g in opt.param_groups)
    twin, plain = plain_loop_twin(model, spec)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step(), plain.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        if reference:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)


def test_per_tensor_ema_is_torchssls_expression_bit_for_bit():
    """EMA(per_tensor=True) computes TorchSSL's (1 - d) * p + d * s (train_utils.EMA.update) to the last bit; the
    default lerp differs from it by at most a few ulps per step."""
    torch.manual_seed(0)
    live = WideResNet(num_classes=10, depth=10, widen_factor=1)
    exact, fast = EMA(live, 0.9, per_tensor=True), EMA(live, 0.9)
    shadow = {n: p.detach().clone() for n, p in live.named_parameters()}
    g = torch.Generator().manual_seed(2)
    for _ in range(10):
        with torch.no_grad():
            for p in live.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        exact.update(live), fast.update(live)
        for n, p in live.named_parameters():
            shadow[n] = ((1.0 - 0.9) * p.data + 0.9 * shadow[n]).clone()
    for (n, e), f in zip(exact.model.named_parameters(), fast.model.parameters()):
        assert torch.equal(e, shadow[n]), n
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", cuda_param()])
def test_ema_copies_buffers_in_groups_of_one_dtype(device):
    """The buffer copy runs per (dtype, device) group: each group homogeneous, every buffer in exactly one, and the
    copied values those of a per-tensor copy (float32 statistics and int64 counters alike)."""
    live = WideResNet(num_classes=10, depth=10, widen_factor=1).to(device)
    ema = EMA(live, decay=0.999)
    buffers = list(ema.model.buffers())
    assert sorted(i for g in ema.buffer_groups for i in g) == list(range(len(buffers)))
    assert len(ema.buffer_groups) == 2  # float32 running statistics, int64 num_batches_tracked
    for group in ema.buffer_groups:
        assert len({(buffers[i].dtype, buffers[i].device) for i in group}) == 1
    live.train()(torch.randn(4, 3, 32, 32, device=device))  # moves every BatchNorm's statistics and counter
    ema.update(live)
    for got, want in zip(ema.model.buffers(), live.buffers(), strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ema_buffer_copy_launches_few_kernels_on_cuda():
    """On CUDA the grouped copy is a few multi-tensor kernels; the mixed list would be one kernel per buffer."""
    from torch.profiler import ProfilerActivity, profile

    live = WideResNet(num_classes=10).to("cuda")
    ema = EMA(live, decay=0.999)

    def kernels(copy) -> int:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            copy()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type.name == "CUDA")

    ema_b, live_b = list(ema.model.buffers()), list(live.buffers())
    mixed = kernels(lambda: torch._foreach_copy_(ema_b, live_b))
    grouped = kernels(lambda: [torch._foreach_copy_([ema_b[i] for i in g], [live_b[i] for i in g])
                               for g in ema.buffer_groups])
    print(f"EMA buffer copy on CUDA: {grouped} kernels grouped by dtype, {mixed} for the mixed list "
          f"({len(ema_b)} buffers)")
    assert grouped < mixed and grouped <= 8
