"""Gate probes: after each epoch, one forward pass of a fixed validation batch records how the gates behave.

Statistics per SRU layer (docs/scconv.md, "Gate statistics"): informative share (W1 = 1 under the binary
reading, i.e. R > t), near-threshold share (|R - t| < 0.05), flip share (mask bits changed since the previous
probe; the first probe compares with the mask before training), gamma min/max/sum, the count of negative
gamma and the mean drift of gamma from its initial value. Per CRU layer: mean and entropy of the attention
weights (beta1 for pairwise, the softmax over 2*C_out for global).

Each statistic is an ``ablate.names.GateKey`` (kind, layer, stat), logged as the metric
``<kind>/<layer>/<stat>`` (docs/tracking.md); :func:`capture_gates` is the one probe pass, also used by
``analysis``.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import nn

from ablate.names import GateKey
from ablate.nn import iter_gates, set_keep_stats

NEAR_THRESHOLD = 0.05


class GateCapture(NamedTuple):
    """What one SRU or CRU kept during a probe pass (detached; None where its kind keeps nothing)."""

    layer: str
    kind: str
    module: nn.Module
    r: torch.Tensor | None  # SRU: R
    mask: torch.Tensor | None  # SRU: R > t
    beta: torch.Tensor | None  # CRU: attention weights


@torch.no_grad()
def capture_gates(model: nn.Module, x: torch.Tensor, autocast_ctx=None) -> list[GateCapture]:
    """One eval forward pass of ``x`` with the gate probes on; the model keeps its mode and nothing else."""
    gates = iter_gates(model)
    if not gates:
        return []
    was_training = model.training
    model.eval()
    set_keep_stats(model, True)
    try:
        with autocast_ctx if autocast_ctx is not None else nullcontext():
            model(x)
        return [GateCapture(layer, kind, module, getattr(module, "last_r", None), getattr(module, "last_mask", None),
                            getattr(module, "last_beta", None)) for layer, kind, module in gates]
    finally:
        # turning the probes off drops the kept tensors: the captures hold the only references
        set_keep_stats(model, False)
        model.train(was_training)


class GateProbe:
    """Holds the probe batch and the previous masks; ``measure()`` returns this epoch's gate statistics."""

    def __init__(self, model: nn.Module, probe_x: torch.Tensor):
        self.model = model
        self.probe_x = probe_x
        self.gates = iter_gates(model)
        self.prev_mask: dict[str, torch.Tensor] = {}
        self.gamma_init = {layer: m.gn.weight.detach().clone() for layer, kind, m in self.gates if kind == "sru"}

    @property
    def active(self) -> bool:
        return bool(self.gates)

    def state_dict(self) -> dict:
        return {"prev_mask": self.prev_mask, "gamma_init": self.gamma_init}

    def load_state_dict(self, state: dict) -> None:
        self.prev_mask = state["prev_mask"]
        self.gamma_init = state["gamma_init"]

    @torch.no_grad()
    def measure(self, device: torch.device, autocast_ctx=None) -> dict[GateKey, float]:
        """Run the probe batch once and return this epoch's gate statistics (empty for a model without gates)."""
        if not self.gates:
            return {}
        out: dict[GateKey, float] = {}
        for cap in capture_gates(self.model, self.probe_x.to(device), autocast_ctx):
            stats = self._sru_stats(cap) if cap.kind == "sru" else _cru_stats(cap)
            out.update({GateKey(cap.kind, cap.layer, stat): value for stat, value in stats.items()})
        return out

    def _sru_stats(self, cap: GateCapture) -> dict[str, float]:
        sru = cap.module
        r = cap.r.float()
        mask = cap.mask.cpu()
        prev = self.prev_mask.get(cap.layer)
        flip = float((mask != prev).float().mean()) if prev is not None and prev.shape == mask.shape else 0.0
        self.prev_mask[cap.layer] = mask
        gamma = sru.gn.weight.detach().float()
        init = self.gamma_init[cap.layer].to(gamma.device)
        return {
            "informative_share": float(mask.float().mean()),
            "near_threshold_share": float(((r - sru.threshold).abs() < NEAR_THRESHOLD).float().mean()),
            "flip_share": flip,
            "gamma_min": float(gamma.min()),
            "gamma_max": float(gamma.max()),
            "gamma_sum": float(gamma.sum()),
            "gamma_negative": float((gamma < 0).sum()),
            "gamma_drift": float((gamma - init).abs().mean()),
        }

    def baseline_masks(self, device: torch.device, autocast_ctx=None) -> None:
        """Record the masks before training so the first epoch's flip share has a reference."""
        self.measure(device, autocast_ctx)


def _cru_stats(cap: GateCapture) -> dict[str, float]:
    beta = cap.beta.float().clamp_min(1e-12)
    if beta.dim() == 2 and cap.module.attention_mode == "global":
        # Softmax over all 2*C_out channels: entropy of that distribution per image.
        entropy = -(beta * beta.log()).sum(1).mean()
    else:
        # Pairwise: beta1 and 1 - beta1 per channel, a binary entropy (in nats, max log 2).
        b2 = (1 - beta).clamp_min(1e-12)
        entropy = -(beta * beta.log() + b2 * b2.log()).mean()
    return {"beta_mean": float(beta.mean()), "beta_entropy": float(entropy) if math.isfinite(float(entropy)) else 0.0}
