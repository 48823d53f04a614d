"""Parameter and MAC counts, profile rows and the `ablate profile` command."""

import json
import types
import weakref

import pytest
import torch
from torch import nn

from ablate.cli import main
from ablate.config import ConfigError, ModelConfig, SCConvConfig
from ablate.models import build_model
from ablate.nn import SCConv
from ablate.profile import count_macs, count_ops, count_params, format_table, profile_rows, saved_activation_bytes

ROW_KEYS = {"backbone", "order", "preset", "placement", "params", "macs", "image_size", "num_classes"}


def _tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )


def _cli(argv: list[str]) -> int:
    """Exit status of ``ablate argv``; argparse usage errors leave through SystemExit."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def test_count_params_counts_parameters_not_buffers():
    assert count_params(_tiny_net()) == 3 * 8 * 9 + 2 * 8 + 8 * 5 + 5


def test_count_macs_counts_conv_and_linear_multiply_accumulates():
    # conv: 8 outputs x 3 inputs x 9 taps x 8x8 positions; linear: 8 x 5.
    assert count_macs(_tiny_net(), image_size=8) == 8 * 3 * 9 * 64 + 8 * 5
    assert count_macs(_tiny_net(), image_size=16) == 8 * 3 * 9 * 256 + 8 * 5


def test_count_macs_restores_mode_and_rng():
    model = _tiny_net().train()
    state = torch.get_rng_state()
    count_macs(model, image_size=8, in_channels=3)
    assert model.training
    assert torch.equal(torch.get_rng_state(), state)
    assert count_macs(model.eval(), image_size=8) > 0 and not model.training


@pytest.mark.parametrize("size", [4, 0, 32.0])
def test_bad_image_size_is_a_config_error(size):
    with pytest.raises(ConfigError, match="image_size="):
        count_macs(_tiny_net(), image_size=size)
    with pytest.raises(ConfigError, match="image_size="):
        profile_rows(ModelConfig(backbone="resnet20"), image_size=size, compare=False)


def test_resnet50_matches_published_complexity():
    model = build_model(ModelConfig(backbone="resnet50", scconv=SCConvConfig(order="none")))
    assert count_params(model) == pytest.approx(25.56e6, abs=0.01e6)
    assert count_macs(model, image_size=224) == pytest.approx(4.1e9, rel=0.01)


def test_profile_rows_compare_puts_the_baseline_first():
    rows = profile_rows(ModelConfig(backbone="resnet20", num_classes=10), image_size=32, compare=True)
    base, scconv = rows
    assert set(base) == set(scconv) == ROW_KEYS | {"params_ratio", "macs_ratio"}
    assert (base["order"], scconv["order"]) == ("none", "sru_cru")
    assert base["params_ratio"] == base["macs_ratio"] == 1.0
    assert scconv["params"] < base["params"] and scconv["macs"] < base["macs"]
    assert scconv["params_ratio"] == round(scconv["params"] / base["params"], 4)
    assert scconv["macs_ratio"] == round(scconv["macs"] / base["macs"], 4)
    model = build_model(ModelConfig(backbone="resnet20", num_classes=10))
    assert scconv["params"] == count_params(model)


def test_profile_rows_report_resolved_values_without_ratios():
    rows = profile_rows(ModelConfig(backbone="resnet20", scconv=SCConvConfig(order="cru")), image_size=32, compare=False)
    assert len(rows) == 1 and set(rows[0]) == ROW_KEYS
    row = rows[0]
    assert (row["num_classes"], row["preset"], row["placement"], row["image_size"]) == (1000, "paper", "replace", 32)


def test_profile_rows_compare_with_order_none_is_the_baseline_alone():
    rows = profile_rows(ModelConfig(backbone="resnet20", scconv=SCConvConfig(order="none")), image_size=32, compare=True)
    assert [r["order"] for r in rows] == ["none"] and rows[0]["params_ratio"] == 1.0


def test_format_table_aligns_and_scales_units():
    row = {"backbone": "resnet50", "order": "none", "preset": "paper", "placement": "replace", "num_classes": 1000,
           "image_size": 224, "params": 25_557_032, "macs": 4_111_514_624, "params_ratio": 1.0, "macs_ratio": 1.0}
    small = dict(row, order="sru_cru", params=270_000, macs=40_550_000, params_ratio=0.0106, macs_ratio=0.0099)
    lines = format_table([row, small]).splitlines()
    assert len(lines) == 4 and set(lines[1]) == {"-", " "}
    assert len({len(line) for line in lines}) == 1  # right-aligned numeric last column
    assert "25.557M" in lines[2] and "4.112G" in lines[2] and "1.0000" in lines[2]
    assert "0.270M" in lines[3] and "40.55M" in lines[3] and "0.0106" in lines[3]
    assert "x" not in format_table([{k: v for k, v in row.items() if not k.endswith("ratio")}]).splitlines()[0]


# -- CLI -------------------------------------------------------------------------------------------


def test_cli_profile_json(capsys):
    code = _cli(["profile", "--backbone", "resnet20", "--image-size", "32", "--compare", "--format", "json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["order"] for r in rows] == ["none", "sru_cru"]
    assert all(ROW_KEYS | {"params_ratio", "macs_ratio"} <= set(r) for r in rows)


def test_cli_profile_table(capsys):
    assert _cli(["profile", "--backbone", "resnet20", "--image-size", "32", "--order", "cru"]) == 0
    out = capsys.readouterr().out
    assert "resnet20" in out and "cru" in out and "MACs" in out


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["--order", "bogus"], ["order='bogus'", "none, sru, cru, sru_cru, cru_sru, parallel"]),
        (["--backbone", "nope"], ["backbone='nope'", "resnet20", "densenet121"]),
        (["--backbone", "resnet20", "--alpha", "0.125"], ["layer1.0.conv2", "scconv.group_size=2"]),
    ],
)
def test_cli_profile_errors_are_one_line_with_status_2(capsys, argv, needles):
    assert _cli(["profile", "--image-size", "32", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and captured.out == ""
    for needle in needles:
        assert needle in lines[0]


def test_saved_activation_bytes_counts_each_storage_once_and_leaves_out_parameters():
    a = torch.randn(1000, requires_grad=True)
    b = a.exp()  # saves its result: 4000 bytes
    assert saved_activation_bytes(b.sum()) == 4000
    # two views of b saved by the product: b's storage again, not counted twice
    assert saved_activation_bytes((b[:500] * b[500:]).sum()) == 4000
    w = nn.Parameter(torch.randn(1000))
    x = torch.randn(1000, requires_grad=True)
    assert saved_activation_bytes((w * x).sum(), exclude=[w]) == 4000  # x only
    assert saved_activation_bytes((w * x).sum()) == 8000


class _Node:
    """An autograd node as torch exposes one: its Python object is made on access and dies when dropped. A
    dying object is recycled for the next node accessed, as CPython's allocator may hand its address on."""

    recycled: list = []

    def __init__(self, saved, children=()):
        self.saved, self.children, self.view = saved, list(children), None

    def wrap(self):
        view = self.view() if self.view else None
        if view is None:
            view = _Node.recycled.pop() if _Node.recycled else _NodeView()
            view.node = self
            self.view = weakref.ref(view)
        return view


class _NodeView:
    def __del__(self):  # CPython finalises an object once: each is recycled at most once
        _Node.recycled.append(self)

    @property
    def saved_tensors(self):
        return self.node.saved

    @property
    def next_functions(self):
        return tuple((child.wrap(), 0) for child in self.node.children)


def test_saved_activation_bytes_walks_nodes_whose_objects_are_reused():
    """A graph walk that remembers nodes by ``id`` alone stops where a dead node's object comes back as the
    next one: the suspect for the 0.24 MB (the loss's tensors) that the bench read for whole ResNets on an H200."""
    chain = None
    for _ in range(6):
        chain = _Node((torch.zeros(250),), [chain] if chain else [])
    output = types.SimpleNamespace(grad_fn=chain.wrap())
    _Node.recycled.clear()
    assert saved_activation_bytes(output) == 6 * 1000
    _Node.recycled.clear()


def test_saved_activation_bytes_of_scconv_follow_its_recompute():
    """An efficient SCConv on a large input keeps only that input; the reference keeps several times it."""
    x = torch.randn(16, 128, 14, 14, requires_grad=True)  # 1.6 MB: recomputed in backward
    layers = {}
    for impl in ("efficient", "reference"):
        layers[impl] = SCConv(128, 32, config=SCConvConfig(order="sru_cru", impl=impl)).train()
    eff = saved_activation_bytes(layers["efficient"](x).sum(), layers["efficient"].parameters())
    ref = saved_activation_bytes(layers["reference"](x).sum(), layers["reference"].parameters())
    assert eff == x.numel() * x.element_size()
    assert ref > 2 * eff


def test_count_ops_counts_forward_and_backward_operations_not_views_or_allocations():
    x = torch.randn(4, 3, requires_grad=True)

    def step():
        x.grad = None
        y = x.reshape(12).unsqueeze(0).squeeze(0)  # views: no kernel
        scratch = torch.empty(5)  # an allocation: no kernel
        (y * 2).sum().backward()
        return scratch

    counts = count_ops(step)
    # forward: mul, sum; backward: ones_like (the seed gradient), mul (sum's expand and the views are views)
    assert counts == {"mul": 2, "sum": 1, "ones_like": 1}
    assert count_ops(step) == counts  # deterministic
    # A reshape that cannot be a view copies, and the copy is counted.
    assert count_ops(lambda: x.detach().t().reshape(12)) == {"clone": 1}
