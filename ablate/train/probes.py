"""Gate probes: after each epoch, one forward pass of a fixed validation batch records how the gates behave.

Statistics per SRU layer (docs/scconv.md, "Gate statistics"): informative share (W1 = 1 under the binary
reading, i.e. R > t), near-threshold share (|R - t| < 0.05; about 1 by construction under ``gamma_norm =
sum``, where w = gamma / sum(gamma) is about 1/C and R stays near 0.5), the scale-free margin share (positions
whose logit z = GroupNorm(x) * w lies within 0.1 std(z) of logit(t)), flip share (mask bits changed since the
previous probe; the first probe compares with the mask before training), perturbation flip share (mask bits
that flip when the probe batch gets a fixed input perturbation of 1e-3 RMS(x)), gamma min/max/sum, the count
of negative gamma and the mean drift of gamma from its initial value. Per CRU layer: mean and entropy of the
attention weights (beta1 for pairwise, the softmax over 2*C_out for global).

Each statistic is an ``ablate.names.GateKey`` (kind, layer, stat), logged as the metric
``<kind>/<layer>/<stat>`` (docs/tracking.md); :func:`capture_gates` is the one probe pass, also used by
``analysis``. :class:`SensitivityProbe` measures the whole network's output and loss change per unit input
perturbation (the 1/sqrt(eps) signature of a hard gate), for every model, gates or not.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ablate.names import SENS_SLOPE_METRIC, GateKey, sens_metric
from ablate.nn import iter_gates, set_keep_stats

NEAR_THRESHOLD = 0.05
#: margin_share counts positions with abs(z - logit(t)) < MARGIN * std(z): relative to the logits' own scale.
MARGIN = 0.1
#: perturb_flip_share perturbs the probe batch by PERTURB_SCALE * RMS(x) times a Gaussian drawn with PERTURB_SEED.
PERTURB_SCALE = 1e-3
PERTURB_SEED = 0
#: Relative input perturbations of SensitivityProbe, and the seed of its fixed direction u.
SENS_EPS = (1e-4, 1e-3, 1e-2, 1e-1)
SENS_SEED = 1
#: R is clamped into (R_CLAMP, 1 - R_CLAMP) before its logit, so a saturated sigmoid gives a finite z.
R_CLAMP = 1e-12


def rms(t: Tensor) -> float:
    """Root mean square of every entry of ``t``."""
    return float(t.double().square().mean().sqrt())


def fixed_noise(like: Tensor, seed: int) -> Tensor:
    """A standard Gaussian tensor shaped like ``like``, the same for a given seed (the global RNG is untouched)."""
    return torch.randn(like.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def margin_share(r: Tensor, threshold: float, margin: float = MARGIN) -> float:
    """Share of positions whose logit z = logit(R) lies within ``margin`` std(z) of logit(threshold)."""
    # float32 R near 0.5 resolves z to about 1e-7, far below the margin at any realistic scale of z.
    z = torch.logit(r.double().clamp(R_CLAMP, 1 - R_CLAMP))
    level = math.log(threshold) - math.log1p(-threshold)
    return float(((z - level).abs() < margin * z.std(correction=0)).double().mean())


def log_log_slope(eps, values) -> float:
    """Least-squares slope of log(values) on log(eps); NaN when a value is not positive."""
    values = np.asarray(values, dtype=float)
    if not np.all(values > 0):
        return float("nan")
    return float(np.polyfit(np.log(np.asarray(eps, dtype=float)), np.log(values), 1)[0])


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
        self.perturbed_x = probe_x + PERTURB_SCALE * rms(probe_x) * fixed_noise(probe_x, PERTURB_SEED)
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
        captures = capture_gates(self.model, self.probe_x.to(device), autocast_ctx)
        flips = {}
        if any(cap.kind == "sru" for cap in captures):
            # A 1e-3 perturbation is below bf16's resolution, so both passes of this comparison run in float32.
            low_precision = isinstance(autocast_ctx, torch.autocast)
            clean = capture_gates(self.model, self.probe_x.to(device)) if low_precision else captures
            perturbed = capture_gates(self.model, self.perturbed_x.to(device))
            flips = {a.layer: float((a.mask != b.mask).float().mean())
                     for a, b in zip(clean, perturbed) if a.kind == "sru"}
        for cap in captures:
            stats = self._sru_stats(cap, flips[cap.layer]) if cap.kind == "sru" else _cru_stats(cap)
            out.update({GateKey(cap.kind, cap.layer, stat): value for stat, value in stats.items()})
        return out

    def _sru_stats(self, cap: GateCapture, perturb_flip: float) -> dict[str, float]:
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
            "margin_share": margin_share(r, sru.threshold),
            "flip_share": flip,
            "perturb_flip_share": perturb_flip,
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


class SensitivityProbe:
    """Output and loss change per unit input perturbation of the whole network on the probe batch, at SENS_EPS.

    The batch x moves along one fixed direction u (seed SENS_SEED): delta = eps * RMS(x) * u / RMS(u). Output
    sensitivity is the mean over images of ||f(x + delta) - f(x)|| / ||delta|| (f: the logits); loss sensitivity
    is abs(mean loss change) / eps. A smooth network gives a flat output sensitivity; a hard gate adds jumps
    whose share grows like eps, so the sensitivity grows like 1/sqrt(eps) and ``sens/slope`` nears -0.5.
    """

    def __init__(self, model: nn.Module, probe_x: Tensor, probe_y: Tensor, eps: tuple[float, ...] = SENS_EPS):
        self.model, self.x, self.y, self.eps = model, probe_x, probe_y, tuple(eps)
        u = fixed_noise(probe_x, SENS_SEED)
        self.direction = rms(probe_x) * u / rms(u)

    @torch.no_grad()
    def measure(self, device: torch.device) -> dict[str, float]:
        """One eval forward of the batch and one per eps, in float32 whatever the run's autocast (1e-4 is
        below bf16's resolution); metric name -> value (ablate.names.sens_metric)."""
        was_training = self.model.training
        self.model.eval()
        x, y, u = self.x.to(device), self.y.to(device), self.direction.to(device)
        out: dict[str, float] = {}
        outs = []
        try:
            f0 = self.model(x).float()
            loss0 = F.cross_entropy(f0, y)
            for eps in self.eps:
                delta = eps * u
                f = self.model(x + delta).float()
                ratio = (f - f0).flatten(1).norm(dim=1) / delta.flatten(1).norm(dim=1)
                outs.append(float(ratio.mean()))
                out[sens_metric("out", eps)] = outs[-1]
                out[sens_metric("loss", eps)] = float((F.cross_entropy(f, y) - loss0).abs()) / eps
        finally:
            self.model.train(was_training)
        out[SENS_SLOPE_METRIC] = log_log_slope(self.eps, outs)
        return out
