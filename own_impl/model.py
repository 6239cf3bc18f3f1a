"""WideResNet-28-2 as in the official FixMatch code (libml/models.py, class ResNet), in PyTorch.

Same parameters as TorchSSL's models/nets/wrn.py (conv biases included: 1,469,642 for WRN-28-2 and 10 classes;
the often quoted 1,467,610 is the count without conv biases). One deliberate difference from TorchSSL: in the
first block of groups 2 and 3, TorchSSL feeds the raw input to conv1, so that block's bn1 is never used (its
parameters get no gradient); here, as in the official code, conv1 always sees leaky_relu(bn1(x)), and only the
shortcut sees the raw input unless activate_before_residual (group 1).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BN_MOMENTUM = 0.001  # PyTorch convention: running = (1 - m) * running + m * batch; TF's momentum 0.999
BN_EPS = 1e-3  # TF's default, used by the official code
LEAKY_SLOPE = 0.1


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, LEAKY_SLOPE)


class ResidualBlock(nn.Module):
    """Pre-activation block: x + conv3x3(act(bn(conv3x3(act(bn(x)))))), with a 1x1 conv shortcut on a width change."""

    def __init__(self, c_in: int, c_out: int, stride: int, activate_before_residual: bool = False):
        super().__init__()
        self.bn1 = _bn(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=True)
        self.bn2 = _bn(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=True)
        # The official code adds a shortcut conv when the channel count changes (stride 2 only ever comes with it).
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=True) if c_in != c_out else None
        self.activate_before_residual = activate_before_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = _act(self.bn1(x))
        if self.activate_before_residual:
            x = a  # group 1: the shortcut also takes the activated input
        out = self.conv2(_act(self.bn2(self.conv1(a))))
        return out + (x if self.shortcut is None else self.shortcut(x))


class WideResNet(nn.Module):
    def __init__(self, num_classes: int = 10, depth: int = 28, widen_factor: int = 2):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6  # residual blocks per group
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=True)
        groups, c_in = [], 16
        for g, width in enumerate(widths):
            blocks = [ResidualBlock(c_in, width, stride=1 if g == 0 else 2, activate_before_residual=g == 0)]
            blocks += [ResidualBlock(width, width, stride=1) for _ in range(n - 1)]
            groups.append(nn.Sequential(*blocks))
            c_in = width
        self.groups = nn.Sequential(*groups)
        self.bn = _bn(c_in)
        self.fc = nn.Linear(c_in, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Official code: conv kernels ~ N(0, 2 / (k*k*c_out)) (He, fan-out), biases 0; classifier Glorot normal.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)  # (N, 16, 32, 32)
        x = self.groups(x)  # (N, 64w, 8, 8)
        x = _act(self.bn(x)).mean(dim=(2, 3))  # (N, 64w)
        return self.fc(x)  # (N, num_classes)
