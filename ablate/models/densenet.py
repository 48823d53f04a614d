"""DenseNet-121 (torchvision) with SCConv in every dense layer; transition layers stay.

``placement="replace"``: SCConv(128 -> 32) takes the place of each _DenseLayer's 3x3 ``conv2``.
``placement="insert"``: the 3x3 conv stays and SCConv(128 -> 128) runs just before it, so that
``conv2`` becomes ``Sequential(scconv=SCConv, conv=<original conv2>)``.
"""

from __future__ import annotations

from collections import OrderedDict

import torchvision
from torch import nn
from torchvision.models.densenet import _DenseLayer

from ablate.config import ModelConfig, SCConvConfig
from ablate.models.registry import block_conv_names, register_model
from ablate.nn import SCConv, convert, validate_scconv


@register_model("densenet121")
def densenet121(cfg: ModelConfig) -> nn.Module:
    """torchvision DenseNet-121 (random init) with SCConv placed in every dense layer by ``cfg.placement``."""
    model = torchvision.models.densenet121(weights=None, num_classes=cfg.num_classes)
    if cfg.placement == "insert":
        return insert_before_conv2(model, cfg.scconv)
    return convert(model, cfg.scconv, select=block_conv_names(model, _DenseLayer))


def insert_before_conv2(model: nn.Module, config: SCConvConfig) -> nn.Module:
    """Put SCConv(C -> C) before the 3x3 ``conv2`` of every dense layer; order "none" inserts nothing."""
    if config.order == "none":
        return model
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _DenseLayer)]
    # Validate every layer before changing any, so a bad config leaves the model as it was.
    for name, layer in layers:
        channels = layer.conv2.in_channels
        validate_scconv(channels, channels, 1, config, where=f"{name}.conv2")
    for _, layer in layers:
        channels = layer.conv2.in_channels
        layer.conv2 = nn.Sequential(OrderedDict(scconv=SCConv(channels, channels, config=config), conv=layer.conv2))
    return model
