"""convert(): which convs become SCConv, validation before change, and the gate helpers."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from ablate.config import ConfigError, SCConvConfig
from ablate.nn import CRU, SRU, SCConv, convert, ineligible_reason, iter_gates, set_keep_stats


def tiny_model(last_out=16) -> nn.Module:
    """stem (3->16, ineligible for an SRU), a block of two 3x3 convs and a 1x1, a strided 3x3, a 7x7."""
    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 16, 7, padding=3),
        block=nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(16, 16, 3, padding=1),
            pw=nn.Conv2d(16, 16, 1),
            conv2=nn.Conv2d(16, last_out, 3, stride=2, padding=1, bias=False),
        )),
        dw=nn.Conv2d(last_out, last_out, 3, padding=1, groups=last_out),
    ))


def snapshot(model):
    return [(n, m) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    modules, state = before
    assert [(n, id(m)) for n, m in model.named_modules()] == [(n, id(m)) for n, m in modules]
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def swapped(model):
    return [n for n, m in model.named_modules() if isinstance(m, SCConv)]


def test_swaps_eligible_3x3_convs_only():
    model = tiny_model()
    x = torch.randn(2, 3, 9, 11)
    shape = model(x).shape
    pw = model.block.pw
    assert convert(model, SCConvConfig()) is model
    assert swapped(model) == ["block.conv1", "block.conv2"]
    assert model.block.pw is pw and isinstance(model.stem, nn.Conv2d) and isinstance(model.dw, nn.Conv2d)
    assert model.block.conv2.stride == 2 and model.block.conv2.out_channels == 16
    assert model(x).shape == shape


@pytest.mark.parametrize(
    "conv, reason",
    [
        (nn.Conv2d(16, 16, 3, padding=1), None),
        (nn.Conv2d(16, 16, 7, padding=3), "kernel 7x7 is not 3x3"),
        (nn.Conv2d(16, 16, 3, padding=1, groups=2), "groups 2 is not 1"),
        (nn.Conv2d(16, 16, 3, padding=2, dilation=2), "dilation 2x2 is not 1"),
        (nn.Conv2d(16, 16, 3), "padding 0x0 is not 1"),
        (nn.Conv2d(16, 16, 3, stride=(2, 1), padding=1), "stride 2x1 is not square"),
        (nn.Linear(4, 4), "a Linear is not an nn.Conv2d"),
    ],
)
def test_ineligible_reason(conv, reason):
    assert ineligible_reason(conv) == reason


def test_nothing_changes_when_a_later_swap_is_invalid():
    model = tiny_model(last_out=15)  # block.conv2: 16 -> 15 breaks the CRU's C_out % group_size
    before = snapshot(model)
    with pytest.raises(ConfigError) as err:
        convert(model, SCConvConfig())
    assert str(err.value).startswith("block.conv2: scconv.group_size=2")
    assert_unchanged(model, before)


def test_select_by_names():
    model = convert(tiny_model(), SCConvConfig(order="cru"), select=["block.conv2"])
    assert swapped(model) == ["block.conv2"]


def test_select_by_predicate():
    model = convert(tiny_model(), SCConvConfig(), select=lambda name, conv: conv.stride == (1, 1))
    assert swapped(model) == ["block.conv1"]


@pytest.mark.parametrize(
    "names, message",
    [
        (["block.conv1", "stem"], "stem: kernel 7x7 is not 3x3"),
        (["block.conv1", "block.pw"], "block.pw: kernel 1x1 is not 3x3"),
        (["block.conv1", "blok.conv1"], "blok.conv1: no such module in the model (did you mean 'block.conv1'?)"),
    ],
)
def test_bad_names_fail_before_any_change(names, message):
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(ConfigError) as err:
        convert(model, SCConvConfig(), select=names)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert_unchanged(model, before)


def test_order_none_leaves_model_unchanged():
    model = tiny_model()
    before = snapshot(model)
    assert convert(model, SCConvConfig(order="none")) is model
    assert_unchanged(model, before)


def test_order_sru_keeps_the_original_conv():
    model = tiny_model()
    conv1 = model.block.conv1
    convert(model, SCConvConfig(order="sru"))
    assert model.block.conv1.conv is conv1 and isinstance(model.block.conv1.sru, SRU)


def test_converting_twice_leaves_inner_convs_alone():
    model = convert(tiny_model(), SCConvConfig(order="sru"))
    convert(model, SCConvConfig(order="sru"))
    assert swapped(model) == ["block.conv1", "block.conv2"]
    with pytest.raises(ConfigError, match="block.conv1.conv: is part of an SCConv already"):
        convert(model, SCConvConfig(), select=["block.conv1.conv"])


def test_new_modules_follow_dtype_and_mode():
    model = tiny_model().double().eval()
    convert(model, SCConvConfig())
    scconv = model.block.conv1
    assert all(p.dtype == torch.float64 for p in scconv.parameters()) and not scconv.training
    assert model(torch.randn(1, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_iter_gates_in_model_order():
    model = convert(tiny_model(), SCConvConfig(order="cru_sru"))
    gates = [(layer, kind) for layer, kind, _ in iter_gates(model)]
    assert gates == [("block.conv1", "cru"), ("block.conv1", "sru"), ("block.conv2", "cru"), ("block.conv2", "sru")]
    assert isinstance(iter_gates(model)[0][2], CRU)


def test_set_keep_stats_turns_probes_on_and_off():
    model = convert(tiny_model(), SCConvConfig())
    x = torch.randn(2, 3, 8, 8)
    set_keep_stats(model, True)
    model(x)
    sru, cru = model.block.conv2.sru, model.block.conv2.cru
    assert sru.last_r.shape == (2, 16, 4, 4) and sru.last_mask.shape == (2, 16, 4, 4)
    assert cru.last_beta.shape == (2, 16)
    set_keep_stats(model, False)
    assert all(getattr(m, a, None) is None for _, _, m in iter_gates(model) for a in ("last_r", "last_mask", "last_beta"))
    model(x)
    assert sru.last_r is None and cru.last_beta is None
