"""Gate probes and the sensitivity probe on inputs with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ablate.config import DataConfig, RunConfig, SCConvConfig
from ablate.data import build_datasets, probe_batch
from ablate.models import build_model
from ablate.names import SENS_SLOPE_METRIC, GateKey, sens_metric
from ablate.nn import SRU
from ablate.train.probes import SENS_EPS, GateProbe, SensitivityProbe, log_log_slope, margin_share

CPU = torch.device("cpu")


def _r(z) -> torch.Tensor:
    return torch.sigmoid(torch.as_tensor(z, dtype=torch.float32))


# -- margin_share -----------------------------------------------------------------------------------------


def test_margin_share_counts_logits_within_a_tenth_of_their_sd():
    # z has mean 0 and population SD 1 (+-1 for 8 positions); two more sit inside 0.1 SD, two just outside.
    z = np.array([1.0] * 8 + [-1.0] * 8 + [0.05, -0.07, 0.15, -0.2])
    z = z / z.std()
    assert margin_share(_r(z), 0.5) == pytest.approx(2 / len(z))


def test_margin_share_is_scale_free_and_follows_the_threshold():
    z = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    base = margin_share(_r(0.05 * z), 0.5)
    assert margin_share(_r(0.5 * z), 0.5) == pytest.approx(base, abs=1e-6)  # R near 0.5 or not: same share
    t = 0.7
    assert margin_share(_r(0.5 * z + math.log(t / (1 - t))), t) == pytest.approx(base, abs=1e-6)
    assert 0.05 < base < 0.1  # a centred Gaussian has 8 % of its mass within 0.1 SD of its mean


# -- perturb_flip_share -------------------------------------------------------------------------------------


def _sru_model(mode: str = "binary") -> nn.Module:
    return nn.Sequential(SRU(8, SCConvConfig(gate_mode=mode, gn_groups=2)))


def test_perturb_flip_share_counts_the_mask_bits_a_perturbation_flips():
    x = torch.randn(4, 8, 5, 5, generator=torch.Generator().manual_seed(1))
    probe = GateProbe(_sru_model(), x)
    key = GateKey("sru", "0", "perturb_flip_share")
    # GroupNorm is odd in x (beta = 0) and w = 1/C, so -x flips every bit; flipping half the images flips half.
    probe.perturbed_x = -x
    assert probe.measure(CPU)[key] == 1.0
    probe.perturbed_x = torch.cat([-x[:2], x[2:]])
    assert probe.measure(CPU)[key] == 0.5
    probe.perturbed_x = x.clone()
    assert probe.measure(CPU)[key] == 0.0


def test_default_perturbation_is_small_and_fixed():
    x = torch.randn(16, 8, 6, 6, generator=torch.Generator().manual_seed(2))
    a, b = GateProbe(_sru_model(), x), GateProbe(_sru_model(), x)
    assert torch.equal(a.perturbed_x, b.perturbed_x)
    rel = (a.perturbed_x - x).square().mean().sqrt() / x.square().mean().sqrt()
    assert rel == pytest.approx(1e-3, rel=0.05)
    stats = a.measure(CPU)
    assert 0.0 < stats[GateKey("sru", "0", "perturb_flip_share")] < 0.02
    assert 0.0 < stats[GateKey("sru", "0", "margin_share")] < 0.2


def test_perturb_flip_share_runs_in_float32_under_autocast():
    """A 1e-3 perturbation is near bf16 rounding (a bf16 conv before the SRU changes the flip count here)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), SRU(8, SCConvConfig(gate_mode="binary", gn_groups=2)))
    probe = GateProbe(model, torch.randn(64, 8, 8, 8, generator=torch.Generator().manual_seed(2)))
    key = GateKey("sru", "1", "perturb_flip_share")
    assert probe.measure(CPU, torch.autocast("cpu", dtype=torch.bfloat16))[key] == probe.measure(CPU)[key] > 0


# -- sensitivity --------------------------------------------------------------------------------------------


def test_log_log_slope_recovers_the_power():
    eps = np.array(SENS_EPS)
    assert log_log_slope(eps, 3 * eps ** -0.5) == pytest.approx(-0.5)
    assert log_log_slope(eps, np.full(4, 0.7)) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(log_log_slope(eps, [1.0, 0.0, 1.0, 1.0]))


@pytest.fixture(scope="module")
def digits_probe():
    return probe_batch(build_datasets(DataConfig()), 64)


@pytest.mark.parametrize(("order", "mode", "hard"), [
    ("sru_cru", "binary", True), ("parallel", "binary", True), ("sru_cru", "soft", False), ("none", "binary", False),
])
def test_sensitivity_slope_separates_a_hard_gate_from_a_smooth_network(digits_probe, order, mode, hard):
    """ResNet-20 at init on the digits probe batch: a binary gate's jumps make the output sensitivity fall with
    eps (measured slopes -0.3 to -0.6 over SENS_EPS); the soft gate and the plain network stay flat (|slope| < 0.01)."""
    cfg = RunConfig.from_dict({"scconv.order": order, "scconv.gate_mode": mode}).resolved()
    model = build_model(cfg.model, seed=0)
    x, y = digits_probe
    sens = SensitivityProbe(model, x, y).measure(CPU)
    assert set(sens) == {sens_metric(k, e) for k in ("out", "loss") for e in SENS_EPS} | {SENS_SLOPE_METRIC}
    assert all(np.isfinite(v) and v >= 0 for k, v in sens.items() if k != SENS_SLOPE_METRIC)
    if hard:
        assert sens[SENS_SLOPE_METRIC] < -0.2
    else:
        assert abs(sens[SENS_SLOPE_METRIC]) < 0.05
    assert model.training  # the probe restores the mode it found


def test_sensitivity_leaves_the_global_rng_alone(digits_probe):
    model = build_model(RunConfig().resolved().model, seed=0)
    torch.manual_seed(5)
    SensitivityProbe(model, *digits_probe).measure(CPU)
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(1))
