"""CRU: structure, parameter count, attention fuse, probes and construction checks."""

import pytest
import torch
import torch.nn.functional as F

from ablate.config import ConfigError, SCConvConfig
from ablate.nn import CRU


def make_cru(in_channels=16, out_channels=16, **fields) -> CRU:
    return CRU(in_channels, out_channels, SCConvConfig(**fields))


def random_input(channels=16):
    return torch.randn(2, channels, 5, 7, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("channels", [8, 16, 32, 64])
def test_parameter_count_formula(channels):
    n_params = sum(p.numel() for p in make_cru(channels, channels).parameters())
    assert n_params == 29 * channels**2 // 16 + channels


def test_submodules_and_shapes():
    cru = make_cru(16, 16)
    assert (cru.up, cru.low) == (8, 8)
    assert tuple(cru.squeeze1.weight.shape) == (4, 8, 1, 1)
    assert tuple(cru.gwc.weight.shape) == (16, 2, 3, 3) and cru.gwc.bias is not None
    assert tuple(cru.pwc2.weight.shape) == (12, 4, 1, 1)
    assert cru(random_input()).shape == (2, 16, 5, 7)


def test_no_pwc2_when_squeezed_lower_path_fills_output():
    cru = make_cru(128, 32)  # low // r = 32 = C_out: the DenseNet replace case
    assert cru.pwc2 is None
    x_low = torch.randn(2, 40, 3, 3)
    assert torch.equal(cru.lower(x_low), x_low[:, :32])
    assert cru(random_input(128)).shape == (2, 32, 5, 7)


def test_alpha_splits_channels():
    cru = make_cru(16, 8, alpha=0.75)
    assert (cru.up, cru.low) == (12, 4)
    assert cru.squeeze1.out_channels == 6 and cru.squeeze2.out_channels == 2


def test_group_kernel_sets_gwc():
    cru = make_cru(group_kernel=5, group_size=4)
    assert cru.gwc.kernel_size == (5, 5) and cru.gwc.padding == (2, 2) and cru.gwc.groups == 4


def test_pairwise_hand_example():
    cru = make_cru(attention="pairwise")
    y1, y2 = torch.ones(1, 16, 2, 2), torch.zeros(1, 16, 2, 2)
    a, b = cru.attention(y1, y2)
    # softmax(1, 0) = (e / (e + 1), 1 / (e + 1)) = (0.731059, 0.268941) in every channel
    torch.testing.assert_close(a, torch.full((1, 16), 0.731059), atol=1e-5, rtol=0)
    torch.testing.assert_close(cru.fuse(y1, y2), torch.full((1, 16, 2, 2), 0.731059), atol=1e-5, rtol=0)


def test_pairwise_weights_sum_to_one_per_channel():
    cru = make_cru(attention="pairwise")
    cru.keep_stats = True
    x = random_input()
    cru(x)
    assert cru.last_beta.shape == (2, 16)
    y1, y2 = cru.upper(cru.squeeze1(x[:, :8])), cru.lower(cru.squeeze2(x[:, 8:]))
    a, b = cru.attention(y1, y2)
    torch.testing.assert_close(a + b, torch.ones_like(a))
    torch.testing.assert_close(cru.last_beta, a)


def test_global_softmax_sums_to_one_over_all_channels():
    cru = make_cru(16, 8, attention="global")
    cru.keep_stats = True
    cru(random_input())
    assert cru.last_beta.shape == (2, 16)
    torch.testing.assert_close(cru.last_beta.sum(dim=1), torch.ones(2))


def test_global_fuse_equals_public_formulation():
    cru = make_cru(attention="global")
    y1, y2 = torch.randn(2, 16, 3, 4), torch.randn(2, 16, 3, 4)
    # Public code: softmax over pooled cat(Y1, Y2), multiply, split in halves, add the halves.
    out = torch.cat([y1, y2], dim=1)
    out = F.softmax(F.adaptive_avg_pool2d(out, 1), dim=1) * out
    first, second = torch.split(out, out.size(1) // 2, dim=1)
    torch.testing.assert_close(cru.fuse(y1, y2), first + second)


def test_no_stats_kept_by_default():
    cru = make_cru()
    cru(random_input())
    assert cru.last_beta is None


def test_seeded_construction_is_deterministic():
    def build(seed):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return make_cru().state_dict()

    first, again, other = build(3), build(3), build(4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["gwc.weight"], other["gwc.weight"])


@pytest.mark.parametrize(
    "in_channels, out_channels, fields, named",
    [
        (8, 8, {"squeeze_ratio": 8}, "scconv.squeeze_ratio=8"),  # up = 4 < r
        (8, 8, {"alpha": 0.75, "squeeze_ratio": 4}, "lower path"),  # low = 2 < r
        (12, 12, {"group_size": 4}, "input (up // r) 3"),
        (16, 10, {"group_size": 4}, "output (out_channels) 10"),
    ],
)
def test_construction_errors_name_the_rule(in_channels, out_channels, fields, named):
    with pytest.raises(ConfigError) as err:
        make_cru(in_channels, out_channels, **fields)
    message = str(err.value)
    assert message.startswith("CRU: ") and named in message and "\n" not in message


def test_group_size_error_lists_accepted_values():
    with pytest.raises(ConfigError) as err:
        make_cru(12, 12, group_size=4)
    # up // r = 3 and C_out = 12: only groups dividing both work.
    assert "accepted: one of 1, 3" in str(err.value)
