"""ResNets: torchvision's ResNet-50 and the CIFAR ResNet-20/56 of He et al. (2016, section 4.2).

SCConv placement (docs/scconv.md): the 3x3 ``conv2`` of every Bottleneck (ResNet-50) and
the second 3x3 conv ``conv2`` of every BasicBlock (CIFAR ResNets); 1x1 convs, BN and shortcuts stay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from ablate.config import ModelConfig
from ablate.models.registry import block_conv_names, register_model
from ablate.nn import convert

CIFAR_WIDTHS = (16, 32, 64)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by the stride and zero-pad the added channels (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 3x3 conv 16, three stages of n BasicBlocks (16/32/64), pool, fc."""

    def __init__(self, depth: int, num_classes: int = 10, widths: tuple[int, ...] = CIFAR_WIDTHS) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_channels = widths[0]
        for index, width in enumerate(widths):
            stage = _stage(in_channels, width, blocks, stride=1 if index == 0 else 2)
            self.add_module(f"layer{index + 1}", stage)
            in_channels = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        self.stages = len(widths)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for index in range(self.stages):
            x = getattr(self, f"layer{index + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _stage(in_channels: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` BasicBlocks; the first one changes width and stride through an option-A shortcut."""
    shortcut = PadShortcut(in_channels, width, stride) if stride != 1 or in_channels != width else None
    layers = [BasicBlock(in_channels, width, stride=stride, downsample=shortcut)]
    layers += [BasicBlock(width, width) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def cifar_resnet(cfg: ModelConfig, depth: int) -> nn.Module:
    """CIFAR ResNet of ``depth`` with the second 3x3 conv of every block converted."""
    model = CifarResNet(depth, num_classes=cfg.num_classes)
    return convert(model, cfg.scconv, select=block_conv_names(model, BasicBlock))


@register_model("resnet20")
def resnet20(cfg: ModelConfig) -> nn.Module:
    """CIFAR ResNet-20 (n = 3, about 0.27M parameters with 10 classes)."""
    return cifar_resnet(cfg, depth=20)


@register_model("resnet56")
def resnet56(cfg: ModelConfig) -> nn.Module:
    """CIFAR ResNet-56 (n = 9, about 0.85M parameters with 10 classes)."""
    return cifar_resnet(cfg, depth=56)


@register_model("resnet50")
def resnet50(cfg: ModelConfig) -> nn.Module:
    """torchvision ResNet-50 (random init) with every Bottleneck's 3x3 ``conv2`` converted."""
    model = torchvision.models.resnet50(weights=None, num_classes=cfg.num_classes)
    return convert(model, cfg.scconv, select=block_conv_names(model, Bottleneck))
