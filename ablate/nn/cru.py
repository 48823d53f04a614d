"""Channel Reconstruction Unit (CRU): split, squeeze, cheap transforms, attention fuse.

Reference definition of docs/scconv.md, section "CRU". Submodule names follow the
public implementation lower-cased (``squeeze1``, ``squeeze2``, ``gwc``, ``pwc1``, ``pwc2``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ablate.config import SCConvConfig
from ablate.nn.sru import layer_config_error


def split_channels(in_channels: int, alpha: float) -> tuple[int, int]:
    """(up, low): channels of the upper and lower paths, up = int(alpha * C_in)."""
    up = int(alpha * in_channels)
    return up, in_channels - up


def check_cru(in_channels: int, out_channels: int, config: SCConvConfig, where: str = "CRU") -> None:
    """Raise ConfigError unless a CRU ``in_channels -> out_channels`` can be built with ``config``."""
    cfg = config.resolved()
    r, g = cfg.squeeze_ratio, cfg.group_size
    up, low = split_channels(in_channels, cfg.alpha)
    for path, size in (("upper", up), ("lower", low)):
        if size < r:
            raise layer_config_error(
                where, "scconv.squeeze_ratio", r,
                f"the CRU's {path} path has {size} of {in_channels} channels (alpha={cfg.alpha}), "
                f"fewer than r so its squeeze would be empty; accepted: at most {min(up, low)} or another scconv.alpha",
            )
    common = math.gcd(up // r, out_channels)
    accepted = ", ".join(str(d) for d in range(1, common + 1) if common % d == 0)
    for what, size in (("input (up // r)", up // r), ("output (out_channels)", out_channels)):
        if size % g:
            raise layer_config_error(
                where, "scconv.group_size", g,
                f"the CRU's group-wise conv needs it to divide its {what} {size} channels; accepted: one of {accepted}",
            )


class CRU(nn.Module):
    """CRU ``in_channels -> out_channels``; split, squeeze, GWC/PWC transforms and fuse from ``config``."""

    def __init__(self, in_channels: int, out_channels: int, config: SCConvConfig = SCConvConfig()) -> None:
        super().__init__()
        config = config.resolved()
        check_cru(in_channels, out_channels, config)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.attention_mode = config.attention
        r, k = config.squeeze_ratio, config.group_kernel
        self.up, self.low = split_channels(in_channels, config.alpha)
        up_sq, low_sq = self.up // r, self.low // r
        self.squeeze1 = nn.Conv2d(self.up, up_sq, 1, bias=False)
        self.squeeze2 = nn.Conv2d(self.low, low_sq, 1, bias=False)
        self.gwc = nn.Conv2d(up_sq, out_channels, k, padding=k // 2, groups=config.group_size)
        self.pwc1 = nn.Conv2d(up_sq, out_channels, 1, bias=False)
        # With out_channels <= low // r the squeezed lower path alone fills the output (docs/scconv.md, CRU step 4).
        self.pwc2 = nn.Conv2d(low_sq, out_channels - low_sq, 1, bias=False) if out_channels > low_sq else None
        #: When True, forward keeps the detached attention weights in ``last_beta`` for gate probes.
        self.keep_stats = False
        self.last_beta: Tensor | None = None

    def upper(self, x_up: Tensor) -> Tensor:
        """Y1 = GWC(Xup) + PWC1(Xup) on the squeezed upper path."""
        return self.gwc(x_up) + self.pwc1(x_up)

    def lower(self, x_low: Tensor) -> Tensor:
        """Y2 = cat(PWC2(Xlow), Xlow) on the squeezed lower path (or its first C_out channels)."""
        if self.pwc2 is None:
            return x_low[:, : self.out_channels]
        return torch.cat([self.pwc2(x_low), x_low], dim=1)

    def attention(self, y1: Tensor, y2: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample, per-channel fuse weights (a, b), each (N, C_out), so that Y = a * Y1 + b * Y2."""
        s1, s2 = y1.mean(dim=(2, 3)), y2.mean(dim=(2, 3))
        if self.attention_mode == "pairwise":
            beta = torch.softmax(torch.stack([s1, s2]), dim=0)
            return beta[0], beta[1]
        # Global: one softmax over all 2*C_out pooled channels; weighting cat(Y1, Y2) and adding its
        # halves (the public code) equals weighting Y1 and Y2 by the two halves of the softmax.
        weights = torch.softmax(torch.cat([s1, s2], dim=1), dim=1)
        return weights[:, : self.out_channels], weights[:, self.out_channels :]

    def fuse(self, y1: Tensor, y2: Tensor) -> Tensor:
        """Y = a * Y1 + b * Y2 with the weights of ``attention``; keeps them when ``keep_stats``."""
        a, b = self.attention(y1, y2)
        if self.keep_stats:
            self.last_beta = (a if self.attention_mode == "pairwise" else torch.cat([a, b], dim=1)).detach()
        return a[:, :, None, None] * y1 + b[:, :, None, None] * y2

    def forward(self, x: Tensor) -> Tensor:
        x_up, x_low = torch.split(x, [self.up, self.low], dim=1)
        return self.fuse(self.upper(self.squeeze1(x_up)), self.lower(self.squeeze2(x_low)))

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, up={self.up}, low={self.low}, attention={self.attention_mode!r}"
