"""Spatial Reconstruction Unit (SRU): gate positions by GroupNorm importance, then cross-reconstruct.

Reference definition of docs/scconv.md, section "SRU". Every reading the paper and the
public code disagree on (gate, gamma normalisation) is a field of ``SCConvConfig``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ablate.config import ConfigError, SCConvConfig

#: Added to the denominator of the ``abs`` gamma normalisation, so that all-zero gammas give w = 0
#: instead of NaN; small enough not to move any realistic weight (sum |gamma| is about C at init).
ABS_NORM_EPS = 1e-6


def layer_config_error(where: str, name: str, value, rule: str) -> ConfigError:
    """One-line ConfigError naming the layer, the field or quantity, its value and the rule it breaks."""
    return ConfigError(f"{where}: {name}={value!r} is not valid: {rule}")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_sru(channels: int, config: SCConvConfig, where: str = "SRU", channels_name: str = "channels") -> None:
    """Raise ConfigError unless an SRU over ``channels`` can be built with ``config``."""
    groups = config.resolved().gn_groups
    if channels % 2:
        raise layer_config_error(
            where, channels_name, channels,
            "the SRU reconstructs by halves, so its channel count must be even; accepted: an even count",
        )
    if channels % groups:
        raise layer_config_error(
            where, "scconv.gn_groups", groups,
            f"GroupNorm needs it to divide the SRU's {channels} channels ({channels_name}); "
            f"accepted: one of {_divisors(channels)}",
        )


class SRU(nn.Module):
    """SRU over ``channels`` channels: same shape in and out; gate and gamma normalisation from ``config``."""

    def __init__(self, channels: int, config: SCConvConfig = SCConvConfig()) -> None:
        super().__init__()
        config = config.resolved()
        check_sru(channels, config)
        self.channels = channels
        self.gate_mode = config.gate_mode
        self.gamma_norm = config.gamma_norm
        self.threshold = config.gate_threshold
        self.gn = nn.GroupNorm(config.gn_groups, channels)
        #: When True, forward keeps detached ``last_r`` (R) and ``last_mask`` (R > t) for gate probes.
        self.keep_stats = False
        self.last_r: Tensor | None = None
        self.last_mask: Tensor | None = None

    def channel_weights(self) -> Tensor:
        """Per-channel weights w from the GroupNorm scale gamma (``gamma_norm``: sum or abs)."""
        gamma = self.gn.weight
        if self.gamma_norm == "abs":
            return gamma.abs() / (gamma.abs().sum() + ABS_NORM_EPS)
        return gamma / gamma.sum()

    def importance(self, x: Tensor) -> Tensor:
        """R = sigmoid(GroupNorm(x) * w), shape of x."""
        return torch.sigmoid(self.gn(x) * self.channel_weights().view(1, -1, 1, 1))

    def gate(self, r: Tensor) -> tuple[Tensor, Tensor]:
        """Turn R into the weight maps (W1, W2) according to ``gate_mode``."""
        if self.gate_mode == "soft":
            return r, 1 - r
        informative = r > self.threshold
        if self.gate_mode == "reference":
            return torch.where(informative, 1.0, r), torch.where(informative, 0.0, r)
        hard = informative.to(r.dtype)
        if self.gate_mode == "ste":
            # Forward value is exactly `hard` (the bracket is 0); backward sees dW1/dR = 1.
            hard = hard + (r - r.detach())
        return hard, 1 - hard

    @staticmethod
    def reconstruct(x1: Tensor, x2: Tensor) -> Tensor:
        """Cross-add the channel halves: cat(X11 + X22, X12 + X21)."""
        x11, x12 = torch.chunk(x1, 2, dim=1)
        x21, x22 = torch.chunk(x2, 2, dim=1)
        return torch.cat([x11 + x22, x12 + x21], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        r = self.importance(x)
        if self.keep_stats:
            self.last_r = r.detach()
            self.last_mask = self.last_r > self.threshold
        w1, w2 = self.gate(r)
        # The gate weighs the raw input, not the normalised one (docs/scconv.md, SRU step 5).
        return self.reconstruct(w1 * x, w2 * x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, gate_mode={self.gate_mode!r}, gamma_norm={self.gamma_norm!r}, t={self.threshold}"
