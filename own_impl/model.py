"""WideResNet-28-2 as in the official FixMatch code (libml/models.py, class ResNet), in PyTorch, or wired as TorchSSL's
or as USB's.

Same parameters as TorchSSL's models/nets/wrn.py (conv biases included: 1,469,642 for WRN-28-2 and 10 classes;
the often quoted 1,467,610 is the count without conv biases), created in the same order, so the same seed draws
the same initial values wherever the two inits agree.

TorchSSL's WideResNet against the official code's (the defaults here), part by part:

| part                         | official: wiring="official", conv_bias_init="zero"  | TorchSSL's wrn.py               |
|------------------------------|-----------------------------------------------------|---------------------------------|
| conv1 of the first block of  | leaky_relu(bn1(x))                                  | the raw x; bn1 still runs (its  |
| groups 2 and 3               |                                                     | running statistics move in      |
|                              |                                                     | training) but gets no gradient  |
| group 1's shortcut           | leaky_relu(bn1(x)) (activate_before_residual), at   | the same where group 1 widens   |
|                              | every width                                         | (16 -> 16w, w > 1); the raw x   |
|                              |                                                     | at w = 1 (16 -> 16: BasicBlock  |
|                              |                                                     | activates only when not         |
|                              |                                                     | equalInOut)                     |
| conv biases                  | 0                                                   | nn.Conv2d's default: U(-b, b),  |
|                              |                                                     | b = 1 / sqrt(fan_in)            |
| conv weights                 | He normal, fan-out, gain sqrt(2)                    | the same ('leaky_relu', a = 0)  |
| BatchNorm momentum, eps;     | 0.001, 1e-3; weight 1, bias 0                       | the same                        |
| affine init                  |                                                     |                                 |
| activation                   | leaky ReLU 0.1                                      | the same                        |
| shortcut                     | 1x1 conv with bias on a width change, else identity | the same                        |
| head                         | leaky_relu(bn(x)), mean over H and W, linear        | the same (adaptive_avg_pool2d   |
|                              |                                                     | to 1x1 computes that mean)      |
| classifier init              | Xavier normal weight, bias 0                        | the same                        |
| dropout                      | none                                                | none (drop_rate 0)              |

WideResNet(wiring="torchssl", conv_bias_init="pytorch") is TorchSSL's network: loaded with its state dict it gives
the same outputs and gradients (tests/test_own_model.py).

USB's WideResNet (semilearn/nets/wrn/wrn.py at its pin, third_party/usb) is TorchSSL's but for two things, both in
the residual blocks only (1,467,626 parameters for WRN-28-2 and 10 classes, 2,016 fewer):

| part          | USB's wrn.py                                                   | here                             |
|---------------|----------------------------------------------------------------|----------------------------------|
| conv biases   | none in conv1, conv2 and the 1x1 shortcut of every block        | block_conv_bias=False            |
|               | (bias=False, wrn.py:35-36, 39-40, 43-44); the stem conv keeps   |                                  |
|               | its bias (wrn.py:84-85, PyTorch's default init), so does the    |                                  |
|               | classifier (wrn.py:99, zeroed)                                  |                                  |
| BatchNorm eps | 1e-5 (PyTorch's default) in bn1 and bn2 of every block          | block_bn_eps=1e-5                |
|               | (wrn.py:33, 37); 1e-3 in the head's BatchNorm (wrn.py:97)       |                                  |
| the rest      | TorchSSL's: the same wiring (BasicBlock, NetworkBlock,          | wiring="torchssl",               |
|               | wrn.py:47-56), momentum 0.001, leaky ReLU 0.1 (in place, which  | conv_bias_init="pytorch"         |
|               | changes no value or gradient), He fan-out and Xavier init       |                                  |
|               | (wrn.py:108-116), modules created in the same order             |                                  |

USB's classifier is named `classifier` (ours `fc`) and its forward returns {'logits', 'feat'}; loaded with its state
dict (names mapped) ours gives the same logits and gradients, and the same seed gives the same initial values
(tests/test_usb_recipe.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BN_MOMENTUM = 0.001  # PyTorch convention: running = (1 - m) * running + m * batch; TF's momentum 0.999
BN_EPS = 1e-3  # TF's default, used by the official code
LEAKY_SLOPE = 0.1
WIRINGS = ("official", "torchssl")
CONV_BIAS_INITS = ("zero", "pytorch")


def _bn(channels: int, momentum: float, eps: float = BN_EPS) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=eps, momentum=momentum)


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, LEAKY_SLOPE)


class ResidualBlock(nn.Module):
    """Pre-activation block: x + conv3x3(act(bn(conv3x3(act(bn(x)))))), with a 1x1 conv shortcut on a width change.
    conv1_sees_raw_input: TorchSSL's wiring, conv3x3(x) in place of conv3x3(act(bn(x))) for the first conv;
    conv_bias: whether its three convs have biases (USB's have none); bn_eps: its two BatchNorms' eps."""

    def __init__(self, c_in: int, c_out: int, stride: int, activate_before_residual: bool = False, *,
                 bn_momentum: float = BN_MOMENTUM, conv1_sees_raw_input: bool = False, conv_bias: bool = True,
                 bn_eps: float = BN_EPS):
        super().__init__()
        self.bn1 = _bn(c_in, bn_momentum, bn_eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=conv_bias)
        self.bn2 = _bn(c_out, bn_momentum, bn_eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=conv_bias)
        # The official code adds a shortcut conv when the channel count changes (stride 2 only ever comes with it).
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=conv_bias) if c_in != c_out else None
        self.activate_before_residual = activate_before_residual
        self.conv1_sees_raw_input = conv1_sees_raw_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed even when conv1 sees the raw input: TorchSSL runs bn1 there too, so its running statistics move.
        a = _act(self.bn1(x))
        if self.activate_before_residual:
            x = a  # group 1: the shortcut also takes the activated input
        out = self.conv2(_act(self.bn2(self.conv1(x if self.conv1_sees_raw_input else a))))
        return out + (x if self.shortcut is None else self.shortcut(x))


class WideResNet(nn.Module):
    """wiring: "official" or "torchssl" (conv1 of the first block of groups 2 and 3 sees the raw input);
    conv_bias_init: "zero" (official) or "pytorch" (nn.Conv2d's default, as TorchSSL), for every conv bias there is;
    bn_momentum: every BatchNorm's, PyTorch convention; block_conv_bias: False leaves the residual blocks' convs
    without biases (USB); block_bn_eps: the residual blocks' BatchNorm eps (USB: 1e-5), the head's staying BN_EPS.
    The defaults are the official code's."""

    def __init__(self, num_classes: int = 10, depth: int = 28, widen_factor: int = 2, *,
                 bn_momentum: float = BN_MOMENTUM, wiring: str = "official", conv_bias_init: str = "zero",
                 block_conv_bias: bool = True, block_bn_eps: float = BN_EPS):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        if wiring not in WIRINGS or conv_bias_init not in CONV_BIAS_INITS:
            raise ValueError(f"WideResNet wiring must be one of {WIRINGS} and conv_bias_init one of "
                             f"{CONV_BIAS_INITS}, got {wiring!r} and {conv_bias_init!r}")
        n = (depth - 4) // 6  # residual blocks per group
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=True)
        groups, c_in = [], 16
        for g, width in enumerate(widths):
            # TorchSSL's BasicBlock takes the activated input for its shortcut only where the width changes
            activate = g == 0 and (wiring == "official" or c_in != width)
            block = dict(bn_momentum=bn_momentum, conv_bias=block_conv_bias, bn_eps=block_bn_eps)
            blocks = [ResidualBlock(c_in, width, stride=1 if g == 0 else 2, activate_before_residual=activate,
                                    conv1_sees_raw_input=wiring == "torchssl" and g > 0, **block)]
            blocks += [ResidualBlock(width, width, stride=1, **block) for _ in range(n - 1)]
            groups.append(nn.Sequential(*blocks))
            c_in = width
        self.groups = nn.Sequential(*groups)
        self.bn = _bn(c_in, bn_momentum)
        self.fc = nn.Linear(c_in, num_classes)
        self._init_weights(zero_conv_biases=conv_bias_init == "zero")

    def _init_weights(self, zero_conv_biases: bool) -> None:
        # Official code: conv kernels ~ N(0, 2 / (k*k*c_out)) (He, fan-out), biases 0; classifier Glorot normal.
        # Leaving the biases at nn.Conv2d's default draws no extra random numbers: it was drawn at construction.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if zero_conv_biases and m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 32, 32) -> (N, 64w): the pooled activations the classifier reads."""
        x = self.conv(x)  # (N, 16, 32, 32)
        x = self.groups(x)  # (N, 64w, 8, 8)
        return _act(self.bn(x)).mean(dim=(2, 3))  # (N, 64w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes), float32 under any autocast: the classifier runs outside it, in its parameters'
        dtype (float32), as mixed-precision practice recommends. bf16 logits would keep 8 significant bits, a rounding
        that can move a softmax confidence across the pseudo-label threshold; the speed of autocast lies in the
        convolutions."""
        features = self.features(x)  # (N, 64w), bf16 under bf16 autocast
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.fc(features.to(self.fc.weight.dtype))  # the classifier's own dtype: float32 in training
