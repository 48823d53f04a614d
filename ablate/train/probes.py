"""Gate probes: after each epoch, one forward pass of a fixed validation batch records how the gates behave.

Statistics per SRU layer (scconv-spec.md, "What to log about the gates"): informative share (W1 = 1 under the
binary reading, i.e. R > t), near-threshold share (|R - t| < 0.05), flip share (mask bits changed since the
previous probe; the first probe compares with the mask before training), gamma min/max/sum, the count of
negative gamma and the mean drift of gamma from its initial value. Per CRU layer: mean and entropy of the
attention weights (beta1 for pairwise, the softmax over 2*C_out for global).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ablate.nn import iter_gates, set_keep_stats

NEAR_THRESHOLD = 0.05


class GateProbe:
    """Holds the probe batch and the previous masks; ``record()`` returns flat ``sru/<layer>/<stat>`` metrics."""

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
    def record(self, device: torch.device, autocast_ctx=None) -> dict[str, float]:
        """Run the probe batch once and return this epoch's gate metrics (empty for a model without gates)."""
        if not self.gates:
            return {}
        was_training = self.model.training
        self.model.eval()
        set_keep_stats(self.model, True)
        try:
            x = self.probe_x.to(device)
            if autocast_ctx is not None:
                with autocast_ctx:
                    self.model(x)
            else:
                self.model(x)
            return self._collect()
        finally:
            set_keep_stats(self.model, False)
            self.model.train(was_training)

    def _collect(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for layer, kind, module in self.gates:
            stats = self._sru_stats(layer, module) if kind == "sru" else _cru_stats(module)
            out.update({f"{kind}/{layer}/{k}": v for k, v in stats.items()})
            _release(module)
        return out

    def _sru_stats(self, layer: str, sru: nn.Module) -> dict[str, float]:
        r = sru.last_r.float()
        mask = sru.last_mask.cpu()
        prev = self.prev_mask.get(layer)
        flip = float((mask != prev).float().mean()) if prev is not None and prev.shape == mask.shape else 0.0
        self.prev_mask[layer] = mask
        gamma = sru.gn.weight.detach().float()
        init = self.gamma_init[layer].to(gamma.device)
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
        self.record(device, autocast_ctx)


def _cru_stats(cru: nn.Module) -> dict[str, float]:
    beta = cru.last_beta.float().clamp_min(1e-12)
    if beta.dim() == 2 and cru.attention_mode == "global":
        # Softmax over all 2*C_out channels: entropy of that distribution per image.
        entropy = -(beta * beta.log()).sum(1).mean()
    else:
        # Pairwise: beta1 and 1 - beta1 per channel, a binary entropy (in nats, max log 2).
        b2 = (1 - beta).clamp_min(1e-12)
        entropy = -(beta * beta.log() + b2 * b2.log()).mean()
    return {"beta_mean": float(beta.mean()), "beta_entropy": float(entropy) if math.isfinite(float(entropy)) else 0.0}


def _release(module: nn.Module) -> None:
    # The kept tensors are only needed for this probe; free them at once.
    for name in ("last_r", "last_mask", "last_beta"):
        if hasattr(module, name):
            setattr(module, name, None)
