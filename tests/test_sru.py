"""SRU: gate modes, gamma normalisation, reconstruct, probes and construction checks."""

import pytest
import torch

from ablate.config import GATE_MODES, ConfigError, SCConvConfig
from ablate.nn import SRU


def make_sru(channels=8, **fields) -> SRU:
    return SRU(channels, SCConvConfig(**fields))


def tiny_sru(gate_mode: str) -> tuple[SRU, torch.Tensor]:
    """1x2x1x2 input X = [[1, 3], [2, -2]], G = 2 (one channel per group), gamma = [1, 3], beta = 0."""
    sru = make_sru(2, gate_mode=gate_mode, gn_groups=2)
    with torch.no_grad():
        sru.gn.weight.copy_(torch.tensor([1.0, 3.0]))
        sru.gn.bias.zero_()
    return sru, torch.tensor([[[[1.0, 3.0]], [[2.0, -2.0]]]])


# Hand computation for tiny_sru: GroupNorm per channel gives XN = [-1, 1] and [1, -1] (up to eps);
# times gamma: [-1, 1], [3, -3]; w = gamma / 4 = [0.25, 0.75]; R = sigmoid([-0.25, 0.25]) = [0.437823, 0.562177]
# and sigmoid([2.25, -2.25]) = [0.904651, 0.095349]. With halves X1/X2 of one channel each,
# Y = cat(W1[0]*X[0] + W2[1]*X[1], W1[1]*X[1] + W2[0]*X[0]).
HAND_EXPECTED = {
    # W1 = [[0, 1], [1, 0]]: Y0 = [0 + 0, 3 - 2], Y1 = [2 + 1, 0 + 0]
    "binary": [[0.0, 1.0], [3.0, 0.0]],
    # W1 = [[0.437823, 1], [1, 0.095349]], W2 = [[0.437823, 0], [0, 0.095349]]
    "reference": [[0.437823, 2.809301], [2.437823, -0.190699]],
    # W1 = R, W2 = 1 - R
    "soft": [[0.628522, -0.122772], [2.371478, 1.122772]],
    # forward as binary
    "ste": [[0.0, 1.0], [3.0, 0.0]],
}


@pytest.mark.parametrize("gate_mode", GATE_MODES)
def test_hand_computed_example(gate_mode):
    sru, x = tiny_sru(gate_mode)
    expected = torch.tensor(HAND_EXPECTED[gate_mode]).view(1, 2, 1, 2)
    torch.testing.assert_close(sru(x), expected, atol=1e-4, rtol=0)


def test_hand_computed_importance():
    sru, x = tiny_sru("binary")
    expected = torch.tensor([[0.437823, 0.562177], [0.904651, 0.095349]]).view(1, 2, 1, 2)
    torch.testing.assert_close(sru.importance(x), expected, atol=1e-4, rtol=0)


def test_reconstruct_cross_adds_halves():
    x1 = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    x2 = torch.tensor([10.0, 20.0, 30.0, 40.0]).view(1, 4, 1, 1)
    # cat(X11 + X22, X12 + X21) with X11 = [1, 2], X12 = [3, 4], X21 = [10, 20], X22 = [30, 40]
    expected = torch.tensor([31.0, 42.0, 13.0, 24.0]).view(1, 4, 1, 1)
    torch.testing.assert_close(SRU.reconstruct(x1, x2), expected)


def random_input(channels=8, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, channels, 5, 7, generator=gen).requires_grad_(requires_grad)


def test_binary_masks_are_complementary_zero_one():
    sru = make_sru(gate_mode="binary")
    r = sru.importance(random_input())
    w1, w2 = sru.gate(r)
    assert set(w1.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(w1 + w2, torch.ones_like(w1))
    assert torch.equal(w1.bool(), r > 0.5)


def test_binary_gives_no_gradient_to_gamma_beta_but_to_input():
    sru = make_sru(gate_mode="binary")
    x = random_input(requires_grad=True)
    sru(x).square().sum().backward()
    for p in (sru.gn.weight, sru.gn.bias):
        assert p.grad is None or not p.grad.any()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_ste_forward_equals_binary_and_gamma_gets_gradient():
    binary, ste = make_sru(gate_mode="binary"), make_sru(gate_mode="ste")
    with torch.no_grad():
        for sru in (binary, ste):
            sru.gn.weight.copy_(torch.linspace(0.5, 1.5, 8))
    x = random_input()
    out = ste(x)
    assert torch.equal(out, binary(x))
    out.square().sum().backward()
    assert ste.gn.weight.grad is not None and torch.isfinite(ste.gn.weight.grad).all()
    assert ste.gn.weight.grad.abs().sum() > 0


def test_ste_gate_backward_is_straight_through():
    sru = make_sru(gate_mode="ste")
    r = torch.rand(2, 8, 3, 3).requires_grad_(True)
    w1, w2 = sru.gate(r)
    (w1 * 2 + w2 * 5).sum().backward()
    # dW1/dR = 1 and dW2/dR = -1, so every position gets 2 - 5.
    torch.testing.assert_close(r.grad, torch.full_like(r, -3.0))


def test_soft_weights_sum_to_one_without_threshold():
    sru = make_sru(gate_mode="soft", gate_threshold=0.9)
    r = sru.importance(random_input())
    w1, w2 = sru.gate(r)
    torch.testing.assert_close(w1 + w2, torch.ones_like(w1))
    torch.testing.assert_close(w1, r)


def test_reference_gate_definition():
    sru = make_sru(gate_mode="reference", gate_threshold=0.6)
    r = torch.tensor([0.2, 0.6, 0.61, 0.9])
    w1, w2 = sru.gate(r)
    torch.testing.assert_close(w1, torch.tensor([0.2, 0.6, 1.0, 1.0]))
    torch.testing.assert_close(w2, torch.tensor([0.2, 0.6, 0.0, 0.0]))


@pytest.mark.parametrize(
    "gamma_norm, expected",
    # gamma = [-1, 3]: sum gives [-1, 3] / 2; abs gives [1, 3] / 4.
    [("sum", [-0.5, 1.5]), ("abs", [0.25, 0.75])],
)
def test_gamma_norm(gamma_norm, expected):
    sru = make_sru(2, gamma_norm=gamma_norm, gn_groups=2)
    with torch.no_grad():
        sru.gn.weight.copy_(torch.tensor([-1.0, 3.0]))
    torch.testing.assert_close(sru.channel_weights(), torch.tensor(expected), atol=1e-5, rtol=0)


def test_abs_norm_is_safe_when_gamma_sums_to_zero():
    abs_sru, sum_sru = make_sru(4, gamma_norm="abs"), make_sru(4, gamma_norm="sum")
    for sru in (abs_sru, sum_sru):
        with torch.no_grad():
            sru.gn.weight.copy_(torch.tensor([1.0, -1.0, 2.0, -2.0]))
    assert torch.isfinite(abs_sru(random_input(4))).all()
    assert not torch.isfinite(sum_sru.channel_weights()).all()


@pytest.mark.parametrize("gate_mode", GATE_MODES)
def test_keep_stats_stores_r_and_mask_only_when_asked(gate_mode):
    sru = make_sru(gate_mode=gate_mode, gate_threshold=0.55)
    x = random_input()
    sru(x)
    assert sru.last_r is None and sru.last_mask is None
    sru.keep_stats = True
    sru(x)
    assert sru.last_r.shape == x.shape and not sru.last_r.requires_grad
    assert sru.last_mask.dtype == torch.bool
    assert torch.equal(sru.last_mask, sru.importance(x) > 0.55)


def test_threshold_moves_the_mask():
    x = random_input()
    low, high = make_sru(gate_threshold=0.3), make_sru(gate_threshold=0.7)
    for sru in (low, high):
        sru.keep_stats = True
        sru(x)
    assert low.last_mask.sum() > high.last_mask.sum()


@pytest.mark.parametrize(
    "channels, fields, named",
    [(7, {"gn_groups": 1}, "channels=7"), (12, {"gn_groups": 8}, "scconv.gn_groups=8"), (6, {}, "scconv.gn_groups=4")],
)
def test_construction_errors_name_the_rule(channels, fields, named):
    with pytest.raises(ConfigError) as err:
        make_sru(channels, **fields)
    message = str(err.value)
    assert message.startswith("SRU: ") and named in message and "\n" not in message
