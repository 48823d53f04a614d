"""SCConv: every order, gate mode and fuse trains; sizes match the replaced conv; names and rules."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ablate.config import ATTENTIONS, GAMMA_NORMS, GATE_MODES, ORDERS, ConfigError, SCConvConfig
from ablate.nn import SCConv, validate_scconv

CHANNEL_CASES = [(16, 16), (128, 32)]


def random_input(channels, h=7, w=9, requires_grad=False):
    x = torch.randn(2, channels, h, w, generator=torch.Generator().manual_seed(0))
    return x.requires_grad_(requires_grad)


def conv_output_size(h, w, stride):
    return nn.Conv2d(1, 1, 3, stride=stride, padding=1)(torch.zeros(1, 1, h, w)).shape[-2:]


@pytest.mark.parametrize("channels", CHANNEL_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("gamma_norm", GAMMA_NORMS)
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("gate_mode", GATE_MODES)
@pytest.mark.parametrize("order", ORDERS)
def test_shapes_and_finite_gradients(order, gate_mode, attention, gamma_norm, stride, channels):
    in_channels, out_channels = channels
    config = SCConvConfig(order=order, gate_mode=gate_mode, attention=attention, gamma_norm=gamma_norm)
    if order == "parallel" and in_channels != out_channels:
        with pytest.raises(ConfigError, match="scconv.order='parallel'"):
            SCConv(in_channels, out_channels, stride, config)
        return
    model = SCConv(in_channels, out_channels, stride, config)
    x = random_input(in_channels, requires_grad=True)
    y = model(x)
    assert y.shape == (2, out_channels, *conv_output_size(7, 9, stride))
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        if p.grad is None:  # only the binary gate cuts the GroupNorm off the loss
            assert gate_mode == "binary" and ".gn." in name, name
        else:
            assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("stride", [2, 3])
@pytest.mark.parametrize("size", [(7, 9), (1, 5), (8, 8)])
def test_pooled_size_matches_strided_conv(stride, size):
    model = SCConv(16, 16, stride, SCConvConfig(order="cru"))
    assert isinstance(model.pool, nn.AvgPool2d) and model.pool.ceil_mode
    assert model(random_input(16, *size)).shape[-2:] == conv_output_size(*size, stride)


def test_submodules_by_order():
    def children(order, in_channels=16, out_channels=16):
        return [n for n, _ in SCConv(in_channels, out_channels, 2, SCConvConfig(order=order)).named_children()]

    # Registration follows the data flow, so model order is application order.
    assert children("none") == ["conv"]
    assert children("sru") == ["sru", "conv"]
    assert children("cru") == ["pool", "cru"]
    assert children("sru_cru") == ["pool", "sru", "cru"]
    assert children("cru_sru") == ["pool", "cru", "sru"]
    assert children("parallel") == ["pool", "cru", "sru"]


def test_cru_sru_puts_sru_on_output_channels():
    model = SCConv(128, 32, 1, SCConvConfig(order="cru_sru"))
    assert model.sru.channels == 32 and model.sru.gn.num_channels == 32


def test_sru_order_keeps_the_given_conv_and_its_stride():
    conv = nn.Conv2d(16, 8, 3, stride=2, padding=1, bias=True)
    model = SCConv(16, 8, 2, SCConvConfig(order="sru"), conv=conv)
    assert model.conv is conv
    assert model(random_input(16)).shape == (2, 8, 4, 5)


def test_default_conv_for_conv_orders():
    model = SCConv(16, 8, 2, SCConvConfig(order="none"))
    conv = model.conv
    assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((3, 3), (2, 2), (1, 1), None)
    x = random_input(16)
    torch.testing.assert_close(model(x), conv(x))


def test_parallel_adds_cru_and_sru():
    model = SCConv(16, 16, 1, SCConvConfig(order="parallel"))
    x = random_input(16)
    torch.testing.assert_close(model(x), model.cru(x) + model.sru(x))


# Shapes of the public implementation's ScConv(op_channel=16) (group_num=4, alpha=1/2,
# squeeze_radio=2, group_size=2, group_kernel_size=3), keys as it names them.
PUBLIC_SHAPES_16 = {
    "SRU.gn.weight": (16,),
    "SRU.gn.bias": (16,),
    "CRU.squeeze1.weight": (4, 8, 1, 1),
    "CRU.squeeze2.weight": (4, 8, 1, 1),
    "CRU.GWC.weight": (16, 2, 3, 3),
    "CRU.GWC.bias": (16,),
    "CRU.PWC1.weight": (16, 4, 1, 1),
    "CRU.PWC2.weight": (12, 4, 1, 1),
}


@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_state_dict_uses_public_names_lower_cased(preset):
    state = SCConv(16, 16, 1, SCConvConfig(preset=preset)).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k.lower(): v for k, v in PUBLIC_SHAPES_16.items()}


def test_public_state_dict_loads_after_lower_casing():
    public = {k: torch.randn(shape) for k, shape in PUBLIC_SHAPES_16.items()}
    model = SCConv(16, 16, 1, SCConvConfig(preset="reference"))
    model.load_state_dict({k.lower(): v for k, v in public.items()})
    assert torch.equal(model.cru.gwc.weight, public["CRU.GWC.weight"])


def public_scconv_forward(sd, x, group_num=4, threshold=0.5):
    """The public ScConv forward transcribed step by step (functional form, its defaults)."""
    gn_x = F.group_norm(x, group_num, sd["sru.gn.weight"], sd["sru.gn.bias"], eps=1e-5)
    w_gamma = (sd["sru.gn.weight"] / sum(sd["sru.gn.weight"])).view(1, -1, 1, 1)
    reweights = torch.sigmoid(gn_x * w_gamma)
    w1 = torch.where(reweights > threshold, torch.ones_like(reweights), reweights)
    w2 = torch.where(reweights > threshold, torch.zeros_like(reweights), reweights)
    x_1, x_2 = w1 * x, w2 * x
    x_11, x_12 = torch.split(x_1, x_1.size(1) // 2, dim=1)
    x_21, x_22 = torch.split(x_2, x_2.size(1) // 2, dim=1)
    x = torch.cat([x_11 + x_22, x_12 + x_21], dim=1)
    up, low = torch.split(x, [x.size(1) // 2, x.size(1) // 2], dim=1)
    up, low = F.conv2d(up, sd["cru.squeeze1.weight"]), F.conv2d(low, sd["cru.squeeze2.weight"])
    y1 = F.conv2d(up, sd["cru.gwc.weight"], sd["cru.gwc.bias"], padding=1, groups=2) + F.conv2d(up, sd["cru.pwc1.weight"])
    y2 = torch.cat([F.conv2d(low, sd["cru.pwc2.weight"]), low], dim=1)
    out = torch.cat([y1, y2], dim=1)
    out = F.softmax(F.adaptive_avg_pool2d(out, 1), dim=1) * out
    out1, out2 = torch.split(out, out.size(1) // 2, dim=1)
    return out1 + out2


def test_reference_preset_matches_public_forward():
    model = SCConv(16, 16, 1, SCConvConfig(preset="reference"))
    with torch.no_grad():
        model.sru.gn.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        model.sru.gn.bias.normal_(generator=torch.Generator().manual_seed(2))
    x = random_input(16)
    torch.testing.assert_close(model(x), public_scconv_forward(model.state_dict(), x))


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("order", ORDERS)
def test_presets_have_the_same_parameter_count(order):
    paper = SCConv(16, 16, 1, SCConvConfig(order=order, preset="paper"))
    reference = SCConv(16, 16, 1, SCConvConfig(order=order, preset="reference"))
    assert n_params(paper) == n_params(reference)


def test_sru_cru_parameter_count():
    # CRU 29*C^2/16 + C plus the SRU's GroupNorm gamma and beta (2*C), against 9*C^2 for the conv.
    assert n_params(SCConv(32, 32)) == 29 * 32**2 // 16 + 32 + 2 * 32


def test_seeded_construction_is_deterministic():
    def build(seed):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return SCConv(16, 16, 2, SCConvConfig(order="parallel")).state_dict()

    first, again = build(5), build(5)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize(
    "in_channels, out_channels, stride, fields, named",
    [
        (16, 8, 1, {"order": "parallel"}, "scconv.order='parallel'"),
        (7, 8, 1, {"order": "sru", "gn_groups": 1}, "in_channels=7"),
        (12, 12, 1, {"order": "sru_cru", "gn_groups": 8}, "scconv.gn_groups=8"),
        (16, 6, 1, {"order": "cru_sru"}, "SRU's 6 channels (out_channels)"),
        (8, 8, 1, {"order": "cru", "squeeze_ratio": 8}, "scconv.squeeze_ratio=8"),
        (12, 12, 1, {"order": "cru", "group_size": 4}, "scconv.group_size=4"),
        (16, 10, 1, {"order": "sru_cru", "group_size": 4}, "scconv.group_size=4"),
        (16, 16, 0, {}, "stride=0"),
        (0, 16, 1, {}, "in_channels=0"),
    ],
)
def test_validate_names_layer_field_and_value(in_channels, out_channels, stride, fields, named):
    config = SCConvConfig(**fields)
    with pytest.raises(ConfigError) as err:
        validate_scconv(in_channels, out_channels, stride, config, where="layer3.2.conv2")
    message = str(err.value)
    assert message.startswith("layer3.2.conv2: ") and named in message and "\n" not in message
    with pytest.raises(ConfigError, match="^SCConv: "):
        SCConv(in_channels, out_channels, stride, config)


@pytest.mark.parametrize("order", ["none", "sru"])
def test_conv_orders_skip_cru_rules(order):
    # A CRU could not be built on 6 channels with group_size 4, but these orders have no CRU.
    validate_scconv(8, 6, 1, SCConvConfig(order=order, group_size=4, gn_groups=2))


def test_mismatched_conv_is_rejected():
    with pytest.raises(ValueError, match="does not match"):
        SCConv(16, 16, 2, SCConvConfig(order="sru"), conv=nn.Conv2d(16, 16, 3, padding=1))
