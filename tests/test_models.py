"""Backbone registry and SCConv placement in ResNet-20/56/50 and DenseNet-121."""

import pytest
import torch
from torch import nn

from ablate.config import ConfigError, ModelConfig, SCConvConfig
from ablate.models import build_model, list_models, register_model, registry
from ablate.nn import SCConv

# Expected SCConv count per backbone: one per residual block / dense layer.
SCCONV_COUNT = {"resnet20": 9, "resnet56": 27, "resnet50": 16, "densenet121": 58}


def _scconv_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, SCConv)}


def _conv_shapes(model: nn.Module, kernel: tuple[int, int]) -> dict[str, torch.Size]:
    """Plain convs of a kernel size outside any SCConv, by name."""
    inside = _scconv_names(model)
    return {
        name: m.weight.shape for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == kernel and not any(name.startswith(p + ".") for p in inside)
    }


def _out_channels(module: nn.Module, in_channels: int) -> int:
    with torch.no_grad():
        return module.eval()(torch.randn(1, in_channels, 4, 4)).shape[1]


# -- registry ------------------------------------------------------------------------------------


def test_list_models_has_every_backbone():
    assert set(SCCONV_COUNT) <= set(list_models())
    assert list_models() == sorted(list_models())


def test_unknown_backbone_is_a_config_error_with_a_suggestion():
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(backbone="resnt50"))
    message = str(err.value)
    assert message.startswith("backbone='resnt50' is not valid (did you mean 'resnet50'?); accepted: ")
    assert "\n" not in message
    for name in SCCONV_COUNT:
        assert name in message


def test_register_model_resolves_config_before_building(monkeypatch):
    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))
    seen = []

    @register_model("tiny_linear")
    def tiny(cfg):
        seen.append(cfg)
        return nn.Linear(2, cfg.num_classes)

    model = build_model(ModelConfig(backbone="tiny_linear"))
    assert "tiny_linear" in list_models()
    assert model.out_features == 1000  # unset num_classes means ImageNet's 1000
    assert seen[0].scconv.gate_mode == "binary"  # the paper preset was filled in
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny_linear")(tiny)


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_build_model_rejects_a_bad_seed(seed):
    with pytest.raises(ConfigError, match="seed="):
        build_model(ModelConfig(backbone="resnet20"), seed=seed)


def test_seeded_build_is_deterministic_and_leaves_global_rng_alone():
    cfg = ModelConfig(backbone="resnet20", num_classes=10)
    state = torch.get_rng_state()
    first, second = build_model(cfg, seed=3).state_dict(), build_model(cfg, seed=3).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = build_model(cfg, seed=4).state_dict()
    assert not all(torch.equal(first[k], other[k]) for k in first)


# -- backbones -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", sorted(SCCONV_COUNT))
def test_backbone_builds_converts_and_forwards(backbone):
    model = build_model(ModelConfig(backbone=backbone, num_classes=7), seed=0).eval()
    assert len(_scconv_names(model)) == SCCONV_COUNT[backbone]
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backbone,stages", [("resnet20", (3, 3, 3)), ("resnet56", (9, 9, 9)), ("resnet50", (3, 4, 6, 3))])
def test_resnets_convert_exactly_conv2_of_every_block(backbone, stages):
    model = build_model(ModelConfig(backbone=backbone, num_classes=10))
    expected = {f"layer{s + 1}.{b}.conv2" for s, n in enumerate(stages) for b in range(n)}
    assert _scconv_names(model) == expected


@pytest.mark.parametrize("backbone", ["resnet20", "resnet50"])
def test_one_by_one_convs_and_first_conv_are_untouched(backbone):
    baseline = build_model(ModelConfig(backbone=backbone, scconv=SCConvConfig(order="none")))
    converted = build_model(ModelConfig(backbone=backbone))
    assert _conv_shapes(converted, (1, 1)) == _conv_shapes(baseline, (1, 1))
    assert isinstance(converted.conv1, nn.Conv2d)
    assert converted.conv1.weight.shape == baseline.conv1.weight.shape
    # Every 3x3 conv that is not a selected conv2 is still a plain conv.
    kept = {n for n in _conv_shapes(baseline, (3, 3)) if not n.endswith(".conv2")}
    assert kept <= set(_conv_shapes(converted, (3, 3)))


def test_order_none_builds_the_plain_backbone():
    model = build_model(ModelConfig(backbone="resnet50", scconv=SCConvConfig(order="none")))
    assert not _scconv_names(model)
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision's published ResNet-50


@pytest.mark.parametrize("backbone,paper_params", [("resnet20", 0.27e6), ("resnet56", 0.85e6)])
def test_cifar_resnet_parameter_counts_match_he_et_al(backbone, paper_params):
    model = build_model(ModelConfig(backbone=backbone, num_classes=10, scconv=SCConvConfig(order="none")))
    params = sum(p.numel() for p in model.parameters())
    assert params == pytest.approx(paper_params, rel=0.02)


def test_cifar_resnet_downsamples_with_parameter_free_shortcuts():
    model = build_model(ModelConfig(backbone="resnet20", num_classes=10, scconv=SCConvConfig(order="none")))
    features = {}
    for stage in ("layer1", "layer2", "layer3"):
        getattr(model, stage).register_forward_hook(lambda m, i, o, s=stage: features.__setitem__(s, o.shape))
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 32, 32))
    assert features == {"layer1": (1, 16, 32, 32), "layer2": (1, 32, 16, 16), "layer3": (1, 64, 8, 8)}
    assert sum(p.numel() for p in model.layer2[0].downsample.parameters()) == 0


def test_invalid_cru_split_names_the_layer():
    bad = ModelConfig(backbone="resnet20", scconv=SCConvConfig(alpha=0.125))
    with pytest.raises(ConfigError, match=r"layer1\.0\.conv2"):
        build_model(bad)


# -- DenseNet placement --------------------------------------------------------------------------


def test_densenet_replace_puts_scconv_128_to_32_in_place_of_conv2():
    model = build_model(ModelConfig(backbone="densenet121", placement="replace"))
    layer = model.features.denseblock1.denselayer1
    assert isinstance(layer.conv2, SCConv)
    assert _out_channels(layer.conv2, 128) == 32
    assert all(isinstance(m, nn.Conv2d) for m in (model.features.transition1.conv, layer.conv1))


def test_densenet_insert_keeps_conv2_after_a_128_to_128_scconv():
    model = build_model(ModelConfig(backbone="densenet121", num_classes=5, placement="insert"), seed=0).eval()
    assert len(_scconv_names(model)) == 58
    layer = model.features.denseblock4.denselayer16
    assert list(dict(layer.conv2.named_children())) == ["scconv", "conv"]
    assert isinstance(layer.conv2.scconv, SCConv)
    assert _out_channels(layer.conv2.scconv, 128) == 128
    assert isinstance(layer.conv2.conv, nn.Conv2d) and layer.conv2.conv.weight.shape == (32, 128, 3, 3)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_densenet_insert_with_order_none_inserts_nothing():
    model = build_model(ModelConfig(backbone="densenet121", placement="insert", scconv=SCConvConfig(order="none")))
    assert not _scconv_names(model)
    assert isinstance(model.features.denseblock1.denselayer1.conv2, nn.Conv2d)


def test_densenet_insert_rejects_a_bad_config_naming_the_layer():
    bad = ModelConfig(backbone="densenet121", placement="insert", scconv=SCConvConfig(gn_groups=3))
    with pytest.raises(ConfigError, match=r"denselayer1\.conv2"):
        build_model(bad)
