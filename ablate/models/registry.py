"""Backbone registry: ``@register_model(name)`` on a builder, ``build_model(ModelConfig)`` to make one.

A builder takes the resolved ``ModelConfig`` and returns the backbone with its selected 3x3 convs
already converted to the configured SCConv variant; adding a backbone touches one file.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ablate.config import ModelConfig
from ablate.errors import ConfigError, check_choice

Builder = Callable[[ModelConfig], nn.Module]

_BUILDERS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``fn(cfg: ModelConfig) -> nn.Module`` under ``name``."""

    def decorate(fn: Builder) -> Builder:
        if name in _BUILDERS:
            # A programming error (two files claim one name), not a user error.
            raise ValueError(f"model {name!r} is already registered by {_BUILDERS[name].__module__}")
        _BUILDERS[name] = fn
        return fn

    return decorate


def list_models() -> list[str]:
    """Names of every registered backbone, sorted."""
    return sorted(_BUILDERS)


def build_model(cfg: ModelConfig, seed: int | None = None) -> nn.Module:
    """Resolve ``cfg`` (1000 classes when unset), build the backbone and convert its selected convs.

    With ``seed``, construction runs under a forked RNG seeded with it: the weights are reproducible
    and the caller's global RNG state is left untouched.
    """
    check_choice("backbone", cfg.backbone, tuple(list_models()))
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ConfigError(f"seed={seed!r} is not valid; accepted: an integer >= 0")
    cfg = cfg.resolved()
    builder = _BUILDERS[cfg.backbone]
    if seed is None:
        return builder(cfg)
    # devices=[]: construction happens on the CPU, so there is no CUDA generator to fork.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(cfg)


def block_conv_names(model: nn.Module, block_type: type[nn.Module], conv: str = "conv2") -> list[str]:
    """Dotted names of the ``conv`` attribute of every ``block_type`` module (e.g. ``layer1.0.conv2``)."""
    return [f"{name}.{conv}" for name, m in model.named_modules() if isinstance(m, block_type)]
