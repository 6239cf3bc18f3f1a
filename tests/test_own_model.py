"""own_impl.model: WRN-28-2's parameter count by hand and against TorchSSL's network, gradients, BN settings."""
import json
import subprocess
import sys

import torch
import torch.nn as nn

from own_impl.model import WideResNet, _act
from own_impl.optim import param_groups

from conftest import wrn_count_by_hand


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
