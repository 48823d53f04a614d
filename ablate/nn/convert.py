"""Plug SCConv into any model: swap selected 3x3 convs in place, and find the gates afterwards.

Plain functions over ``named_modules()``, in the manner of timm's ``convert_sync_batchnorm``.
"""

from __future__ import annotations

import difflib
from typing import Callable, Iterable, Union

from torch import nn

from ablate.config import ConfigError, SCConvConfig
from ablate.nn.cru import CRU
from ablate.nn.scconv import SCConv, validate_scconv
from ablate.nn.sru import SRU

#: None (every eligible conv), a predicate on (name, conv), or the module names to swap.
Select = Union[None, Callable[[str, nn.Conv2d], bool], Iterable[str]]


def ineligible_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot be swapped for an SCConv (None when it can)."""
    if not isinstance(module, nn.Conv2d):
        return f"a {type(module).__name__} is not an nn.Conv2d"
    pairs = (
        ("kernel", module.kernel_size, (3, 3), "3x3"),
        ("groups", (module.groups,), (1,), "1"),
        ("dilation", module.dilation, (1, 1), "1"),
        # Other paddings change the output size, so SCConv would not be a drop-in.
        ("padding", module.padding, (1, 1), "1"),
    )
    for what, value, wanted, text in pairs:
        if tuple(value) != wanted:
            return f"{what} {'x'.join(map(str, value))} is not {text}"
    if module.stride[0] != module.stride[1]:
        return f"stride {module.stride[0]}x{module.stride[1]} is not square"
    return None


def convert(model: nn.Module, config: SCConvConfig, select: Select = None) -> nn.Module:
    """Replace the selected 3x3 convs of ``model`` by SCConv in place; every swap is validated before any is made."""
    cfg = config.resolved()
    targets = _targets(model, select)
    for name, conv in targets:
        validate_scconv(conv.in_channels, conv.out_channels, conv.stride[0], cfg, where=name)
    if cfg.order == "none":
        return model
    for name, conv in targets:
        new = SCConv(conv.in_channels, conv.out_channels, conv.stride[0], cfg, conv=conv)
        new.to(device=conv.weight.device, dtype=conv.weight.dtype).train(conv.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


def _targets(model: nn.Module, select: Select) -> list[tuple[str, nn.Conv2d]]:
    """(name, conv) pairs to swap; explicitly named modules must exist and be eligible."""
    # The root cannot be swapped in place, and convs inside an SCConv are part of it.
    inside = set()
    for name, module in model.named_modules():
        if isinstance(module, SCConv):
            inside.update(n for n, _ in module.named_modules(prefix=name))
    candidates = {n: m for n, m in model.named_modules() if n and n not in inside}
    if select is None or callable(select):
        keep = select or (lambda name, conv: True)
        return [(n, m) for n, m in candidates.items() if ineligible_reason(m) is None and keep(n, m)]
    names = [select] if isinstance(select, str) else list(select)
    for name in names:
        if name in inside:
            raise _layer_error(name, "is part of an SCConv already")
        if name not in candidates:
            convs = [n for n, m in candidates.items() if isinstance(m, nn.Conv2d)]
            close = difflib.get_close_matches(name, convs, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _layer_error(name, f"no such module in the model{hint}")
        reason = ineligible_reason(candidates[name])
        if reason:
            raise _layer_error(name, f"{reason}; only 3x3 convs with groups 1, dilation 1, padding 1 can become SCConv")
    wanted = set(names)
    return [(n, m) for n, m in candidates.items() if n in wanted]


def _layer_error(name: str, rule: str) -> ConfigError:
    return ConfigError(f"{name}: {rule}")


def iter_gates(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(layer path of the owning SCConv, "sru" or "cru", module) for every SRU and CRU, in model order."""
    owners = {n for n, m in model.named_modules() if isinstance(m, SCConv)}
    gates = []
    for name, module in model.named_modules():
        if isinstance(module, (SRU, CRU)):
            parent = name.rpartition(".")[0]
            layer = parent if parent in owners else name
            gates.append((layer, "sru" if isinstance(module, SRU) else "cru", module))
    return gates


def set_keep_stats(model: nn.Module, flag: bool) -> None:
    """Turn the gate probes of every SRU and CRU on or off; turning off drops what they kept."""
    for _, _, module in iter_gates(model):
        module.keep_stats = flag
        if not flag:
            for attr in ("last_r", "last_mask", "last_beta"):
                if hasattr(module, attr):
                    setattr(module, attr, None)
