"""own_impl.model: WRN-28-2's parameter count by hand and against TorchSSL's network, gradients, BN settings, and
TorchSSL's wiring against TorchSSL's own WideResNet (outputs, gradients, initial values); USB's blocks (no conv
biases, BatchNorm eps 1e-5) by hand here, against USB's own network in tests/test_usb_recipe.py."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from contract.arrays import load_arrays
from own_impl.model import WideResNet, _act
from own_impl.optim import param_groups

from conftest import cuda_param, randomize_batchnorm, torchssl_modules, wrn_count_by_hand


def test_param_count_matches_hand_count():
    model = WideResNet(num_classes=10, depth=28, widen_factor=2)
    total, decayed = wrn_count_by_hand()
    # 1,467,610 is the count often quoted for WRN-28-2; it leaves out the 2,032 conv biases (16 + 9*32 + 9*64 + 9*128)
    assert total == 1_469_642 == 1_467_610 + 2_032
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in param_groups(model, 5e-4)[0]["params"]) == decayed == 1_463_984


def test_same_parameters_as_torchssl_wideresnet(torchssl_checkout):
    src = torchssl_checkout
    # TorchSSL's code runs in a child process, so its top-level 'models' package never enters this one.
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]);"
        "from models.nets.wrn import WideResNet;"
        "m = WideResNet(first_stride=1, num_classes=10, depth=28, widen_factor=2);"
        "ps = list(m.named_parameters());"
        "print(json.dumps({'total': sum(p.numel() for _, p in ps),"
        " 'decayed': sum(p.numel() for n, p in ps if 'bn' not in n and 'bias' not in n),"
        " 'shapes': [list(p.shape) for _, p in ps]}))"
    )
    r = subprocess.run([sys.executable, "-c", code, str(src)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    theirs = json.loads(r.stdout)
    ours = WideResNet(num_classes=10, depth=28, widen_factor=2)
    assert sum(p.numel() for p in ours.parameters()) == theirs["total"] == 1_469_642
    # Weight decay: TorchSSL skips names with 'bn' or 'bias'; ours selects conv/linear weights by type.
    assert sum(p.numel() for p in param_groups(ours, 5e-4)[0]["params"]) == theirs["decayed"]
    # Same tensors in the same order, so state can be mapped one to one.
    assert [list(p.shape) for p in ours.parameters()] == theirs["shapes"]


def test_every_parameter_receives_a_gradient():
    torch.manual_seed(0)
    model = WideResNet(num_classes=10).train()
    logits = model(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 10)
    nn.functional.cross_entropy(logits, torch.tensor([0, 3, 5, 9])).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_layer_settings_follow_the_official_code():
    model = WideResNet(num_classes=10)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 25 and all(m.momentum == 0.001 and m.eps == 1e-3 for m in bns)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 28 and all(m.bias is not None and not m.bias.any() for m in convs)
    # He fan-out: std sqrt(2 / (k*k*c_out)); the 32->32 3x3 convs hold 9216 weights, enough to see it to ~2%
    w = model.groups[0][1].conv1.weight
    assert abs(w.std().item() / (2.0 / (9 * 32)) ** 0.5 - 1) < 0.05
    assert model.groups[0][0].activate_before_residual and not model.groups[1][0].activate_before_residual
    # leaky ReLU with slope 0.1 between layers
    assert torch.equal(_act(torch.tensor([-1.0, 0.0, 2.0])), torch.tensor([-0.1, 0.0, 2.0]))


# ---------------------------------------------------------------- TorchSSL's wiring, against TorchSSL's own network

@pytest.fixture(scope="module")
def torchssl_wrn(torchssl_checkout):
    """TorchSSL's models/nets/wrn.py, from the checkout."""
    with torchssl_modules(torchssl_checkout, "models.nets.wrn") as (wrn,):
        yield wrn


@pytest.fixture(scope="module")
def real_batch(cifar) -> tuple[torch.Tensor, torch.Tensor]:
    """10 real training images, one of each class, as floats around 0, and their labels."""
    arrays = load_arrays(cifar.data_dir)
    x = torch.from_numpy(arrays.train_x[::5000].copy()).permute(0, 3, 1, 2).float() / 255 - 0.5
    return x.contiguous(), torch.from_numpy(arrays.train_y[::5000].copy())


def ours_name(torchssl_name: str) -> str:
    """TorchSSL's parameter or buffer name -> ours: conv1 -> conv, blockG.layer.I -> groups.(G-1).I,
    convShortcut -> shortcut, the head's bn1 -> bn."""
    first, rest = torchssl_name.split(".", 1)
    if first.startswith("block"):
        _, i, rest = rest.split(".", 2)   # "layer", block index, the rest
        return f"groups.{int(first[5:]) - 1}.{i}.{rest.replace('convShortcut', 'shortcut')}"
    return {"conv1": "conv", "bn1": "bn", "fc": "fc"}[first] + "." + rest


def torchssl_pair(wrn, seed: int) -> tuple[nn.Module, WideResNet]:
    """TorchSSL's WRN-28-2 and ours with TorchSSL's wiring, each built after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    theirs = wrn.WideResNet(first_stride=1, num_classes=10, depth=28, widen_factor=2)
    torch.manual_seed(seed)
    ours = WideResNet(num_classes=10, depth=28, widen_factor=2, wiring="torchssl", conv_bias_init="pytorch")
    return theirs, ours


def test_torchssl_wiring_same_seed_same_initial_values(torchssl_wrn):
    """Same construction order and init, PyTorch-default conv biases included: equal state dicts, bit for bit."""
    theirs, ours = torchssl_pair(torchssl_wrn, seed=3)
    mapped = {ours_name(k): v for k, v in theirs.state_dict().items()}
    assert list(mapped) == list(ours.state_dict())
    assert [k for k, v in ours.state_dict().items() if not torch.equal(v, mapped[k])] == []
    biases = [m.bias for m in ours.modules() if isinstance(m, nn.Conv2d)]
    assert all(b.abs().max() > 0 for b in biases)   # not zeroed


def test_torchssl_wiring_same_outputs_and_gradients_as_torchssl(torchssl_wrn, real_batch):
    """TorchSSL's state dict (BatchNorm affine values and running statistics made non-trivial first, so that a
    misplaced tensor shows) loaded into ours: equal logits in train and eval mode, equal gradients for every
    parameter, None for the same two bn1s in both, and equal running statistics after the training pass."""
    theirs, ours = torchssl_pair(torchssl_wrn, seed=4)
    randomize_batchnorm(theirs, seed=5)
    ours.load_state_dict({ours_name(k): v for k, v in theirs.state_dict().items()})
    x, y = real_batch
    logits = [model.train()(x) for model in (theirs, ours)]
    for out in logits:
        nn.functional.cross_entropy(out, y).backward()
    assert torch.equal(logits[0], logits[1])
    grads = {ours_name(n): p.grad for n, p in theirs.named_parameters()}
    no_grad = sorted(n for n, p in ours.named_parameters() if p.grad is None)
    assert no_grad == sorted(n for n, grad in grads.items() if grad is None) == [
        "groups.1.0.bn1.bias", "groups.1.0.bn1.weight", "groups.2.0.bn1.bias", "groups.2.0.bn1.weight"]
    assert [n for n, p in ours.named_parameters() if p.grad is not None and not torch.equal(p.grad, grads[n])] == []
    theirs_buffers = {ours_name(k): v for k, v in theirs.named_buffers()}
    assert [k for k, v in ours.named_buffers() if not torch.equal(v, theirs_buffers[k])] == []
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), theirs.eval()(x))


def test_default_wiring_is_the_official_one(real_batch):
    """The defaults: official wiring, zero conv biases, momentum 0.001; the same seed gives the same values as
    explicit official arguments, and differs from PyTorch-default biases in the conv biases only."""
    torch.manual_seed(6)
    default = WideResNet(num_classes=10)
    torch.manual_seed(6)
    explicit = WideResNet(num_classes=10, bn_momentum=0.001, wiring="official", conv_bias_init="zero")
    torch.manual_seed(6)
    pytorch_biases = WideResNet(num_classes=10, conv_bias_init="pytorch")
    assert sum(p.numel() for p in default.parameters()) == 1_469_642
    conv_biases = {n + ".bias" for n, m in default.named_modules() if isinstance(m, nn.Conv2d)}
    assert len(conv_biases) == 28
    for name, value in default.state_dict().items():
        assert torch.equal(value, explicit.state_dict()[name]), name
        assert torch.equal(value, pytorch_biases.state_dict()[name]) == (name not in conv_biases), name
    assert not any(b.conv1_sees_raw_input for b in default.modules() if hasattr(b, "conv1_sees_raw_input"))
    # Every parameter, both bn1s of the widening blocks included, shapes the official wiring's output.
    x, y = real_batch
    nn.functional.cross_entropy(default.train()(x), y).backward()
    assert [n for n, p in default.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_torchssl_wiring_changes_only_the_widening_blocks(real_batch):
    torch.manual_seed(7)
    official = WideResNet(num_classes=10)
    torch.manual_seed(7)
    torchssl = WideResNet(num_classes=10, wiring="torchssl")
    raw = [n for n, m in torchssl.named_modules() if getattr(m, "conv1_sees_raw_input", False)]
    assert raw == ["groups.1.0", "groups.2.0"]
    assert all(torch.equal(a, b) for a, b in zip(official.state_dict().values(), torchssl.state_dict().values()))
    x, _ = real_batch
    with torch.no_grad():
        assert not torch.allclose(official.eval()(x), torchssl.eval()(x))
    with pytest.raises(ValueError, match="wiring"):
        WideResNet(wiring="TorchSSL")
    with pytest.raises(ValueError, match="conv_bias_init"):
        WideResNet(conv_bias_init="uniform")


@pytest.mark.parametrize("wiring", ["official", "torchssl"])
def test_bn_momentum_is_honoured_by_every_batchnorm(real_batch, wiring):
    """momentum m: after one training pass from running mean 0 and variance 1, every BatchNorm holds
    m * (its input's batch mean) and (1 - m) + m * (its unbiased batch variance), the unused bn1s included."""
    m = 0.25
    torch.manual_seed(8)
    model = WideResNet(num_classes=10, bn_momentum=m, wiring=wiring).train()
    bns = {name: bn for name, bn in model.named_modules() if isinstance(bn, nn.BatchNorm2d)}
    assert len(bns) == 25 and all(bn.momentum == m and bn.eps == 1e-3 for bn in bns.values())
    inputs = {}
    for name, bn in bns.items():
        bn.register_forward_hook(lambda mod, args, out, name=name: inputs.setdefault(name, args[0].detach()))
    with torch.no_grad():
        model(real_batch[0])
    assert set(inputs) == set(bns)
    for name, bn in bns.items():
        mean, var = inputs[name].mean((0, 2, 3)), inputs[name].var((0, 2, 3), unbiased=True)
        torch.testing.assert_close(bn.running_mean, m * mean, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(bn.running_var, (1 - m) + m * var, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("device", ["cpu", cuda_param()])
def test_logits_are_float32_under_bf16_autocast(device):
    """Under bf16 autocast the network runs in bf16 up to its pooled features, and the classifier in float32 on
    them: the logits equal the float32 linear layer applied to the bf16 features, not autocast's bf16 product."""
    torch.manual_seed(0)
    model = WideResNet(num_classes=10, depth=10, widen_factor=1).to(device).eval()
    x = torch.randn(8, 3, 32, 32, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        features, logits = model.features(x), model(x)
        bf16_logits = model.fc(features)  # what the classifier under autocast would give
    assert bf16_logits.dtype == torch.bfloat16 and (features.dtype == torch.bfloat16 or device != "cpu")
    assert logits.dtype == torch.float32
    assert torch.equal(logits, nn.functional.linear(features.float(), model.fc.weight, model.fc.bias))
    assert not torch.equal(bf16_logits.float(), logits)
    assert torch.equal(model(x), model.fc(model.features(x)))  # without autocast: float32 throughout, as before


def test_usb_blocks_drop_exactly_the_block_conv_biases():
    """block_conv_bias=False, block_bn_eps=1e-5 (USB's WideResNet): 2,016 parameters fewer at WRN-28-2 (every conv
    bias but the stem's 16), 1,467,626; eps 1e-5 in the 24 block BatchNorms, 1e-3 in the head's. A bias that is not
    there draws no random numbers, so from the first block on the initial values are others (USB's own, the same
    seed: tests/test_usb_recipe.py); the stem, built first, is the same."""
    torch.manual_seed(9)
    with_biases = WideResNet(num_classes=10, wiring="torchssl", conv_bias_init="pytorch")
    torch.manual_seed(9)
    usb = WideResNet(num_classes=10, wiring="torchssl", conv_bias_init="pytorch", block_conv_bias=False,
                     block_bn_eps=1e-5)
    assert sum(p.numel() for p in usb.parameters()) == 1_469_642 - 2_016 == 1_467_626
    dropped = set(with_biases.state_dict()) - set(usb.state_dict())
    assert len(dropped) == 28 - 1 and all(n.startswith("groups.") and n.endswith(".bias") for n in dropped)
    state = with_biases.state_dict()
    assert torch.equal(usb.conv.bias, state["conv.bias"]) and usb.conv.bias.abs().max() > 0
    assert not torch.equal(usb.fc.weight, state["fc.weight"])
    eps = {n: m.eps for n, m in usb.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert eps.pop("bn") == 1e-3 and set(eps.values()) == {1e-5} and len(eps) == 24
    x = torch.randn(2, 3, 32, 32)
    nn.functional.cross_entropy(usb.train()(x), torch.tensor([1, 2])).backward()
    assert sorted(n for n, p in usb.named_parameters() if p.grad is None) == [
        "groups.1.0.bn1.bias", "groups.1.0.bn1.weight", "groups.2.0.bn1.bias", "groups.2.0.bn1.weight"]
