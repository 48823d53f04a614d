"""scconv.recompute: the per-layer plan from measured cost, the fixed policies, and that none changes a number."""

from __future__ import annotations

import json

import pytest
import torch

from ablate.config import ModelConfig, RunConfig, SCConvConfig
from ablate.errors import ConfigError
from ablate.models import build_model
from ablate.nn import SCConv
from ablate.nn.recompute_plan import choose_recompute, plan_recompute
from ablate.profile import saved_activation_bytes

MIB = 2**20


def _scconvs(model) -> list[SCConv]:
    return [m for m in model.modules() if isinstance(m, SCConv)]


# -- the choice, on known answers -------------------------------------------------------------------------


def body_only(step_ms, step_bytes, layers) -> list[bool]:
    """``choose_recompute`` for layers whose one other mode is the body's recompute, given as (freed, added)."""
    chosen = choose_recompute(step_ms, step_bytes, [{"body": layer} for layer in layers])
    assert set(chosen) <= {"body", "keep"}
    return [mode == "body" for mode in chosen]


def test_a_layer_freeing_much_memory_for_little_time_recomputes_and_the_opposite_keeps():
    # 1000 ms and 1000 MiB: A frees 30 % of the memory for 5 % more time, B 1 % for 20 %.
    assert body_only(1000, 1000 * MIB, [(300 * MIB, 50), (10 * MIB, 200)]) == [True, False]


def test_free_memory_at_no_time_always_recomputes_and_freeing_nothing_never_does():
    layers = [(5 * MIB, 0.0), (5 * MIB, -1.0), (0, -3.0), (-MIB, 2.0)]
    assert body_only(100, 100 * MIB, layers) == [True, True, False, False]
    assert body_only(100, 100 * MIB, []) == []


def test_the_choice_is_free_of_units():
    """Bytes in KiB or GiB, time in ms or s: the same layers (so the same rule holds on a CPU and a GPU)."""
    layers = [(64.0, 47.0), (32.0, 25.0), (16.0, 30.0), (2.0, 25.0)]
    base = body_only(830.0, 606.0, layers)
    for bytes_scale, time_scale in ((1024.0, 1.0), (1.0, 1e-3), (2**30, 1e3)):
        scaled = [(m * bytes_scale, t * time_scale) for m, t in layers]
        assert body_only(830.0 * time_scale, 606.0 * bytes_scale, scaled) == base


def test_layers_are_taken_by_memory_freed_per_ms_up_to_the_smallest_memory_time_product():
    """DenseNet-121-shaped numbers (2-core CPU, batch 16, 112 px, keep everything: 830 ms, 606 MiB): 6
    layers at 28x28, 12 at 14x14, 24 at 7x7 and 16 at 3x3. Worked out by hand: after the 28x28 and 14x14
    layers the step holds 509.3 MiB for 902.2 ms (product 459,490); one 7x7 layer more (0.68 MiB for 1.26 ms)
    gives 459,518 and all 24 of them 459,677, so they and the 3x3 layers (0.13 MiB per ms) keep."""
    stages = [(6, 10.73, 7.82), (12, 2.69, 2.11), (24, 0.68, 1.26), (16, 0.13, 1.01)]
    layers = [(freed * MIB, ms) for count, freed, ms in stages for _ in range(count)]
    chosen = body_only(830.0, 606 * MIB, layers)
    assert chosen == [True] * 18 + [False] * 40
    # With a step twice as long the same layers cost half as much of it: the 7x7 layers now pay, the 3x3 do not.
    assert body_only(1660.0, 606 * MIB, layers) == [True] * 42 + [False] * 16


def test_equal_layers_recompute_all_or_none():
    """The product is concave in the number k of equal layers recomputed, so its minimum is k = 0 or all of them."""
    assert body_only(100.0, 100.0, [(20.0, 10.0)] * 4) == [True] * 4  # (1 - 0.2k)(1 + 0.1k)
    assert body_only(100.0, 100.0, [(10.0, 20.0)] * 4) == [False] * 4  # 1.08 at k = 1 and at k = 4


def test_the_rule_is_the_product_not_the_shares():
    """30 % of the memory for 31 % more time: a larger share of time, yet 0.70 * 1.31 = 0.917 < 1, so it
    recomputes; 30 % for 45 %: 1.015, it keeps."""
    assert body_only(100.0, 100.0, [(30.0, 31.0)]) == [True]
    assert body_only(100.0, 100.0, [(30.0, 45.0)]) == [False]


def test_measurements_claiming_more_than_the_step_holds_do_not_break_the_choice():
    assert body_only(10.0, 5.0, [(4.0, 1.0), (4.0, 1.0)]) == [True, True]


def test_the_sru_output_alone_when_the_rest_of_the_body_does_not_pay():
    """100 ms, 100 MiB. Recomputing the SRU's output frees 10 MiB for 1 ms (product 90 * 101 = 9090); the
    whole body frees 20 for 15 (80 * 115 = 9200): the SRU only. With the body at 5 ms (80 * 105 = 8400), the
    body, through the SRU's step first."""
    assert choose_recompute(100.0, 100 * MIB, [{"sru": (10 * MIB, 1.0), "body": (20 * MIB, 15.0)}]) == ["sru"]
    assert choose_recompute(100.0, 100 * MIB, [{"sru": (10 * MIB, 1.0), "body": (20 * MIB, 5.0)}]) == ["body"]


def test_a_mode_below_the_hull_is_skipped():
    """The SRU frees 10 for 10 ms (1 per ms), the body 50 for 15 (3.3 per ms): keep goes straight to the body;
    where the body does not pay (50 for 120 ms: 50 * 220 > 100 * 100), keep, not the SRU (90 * 110 = 9900
    would pay alone, but the hull never offers it: the body frees more per ms from keep)."""
    assert choose_recompute(100.0, 100.0, [{"sru": (10.0, 10.0), "body": (50.0, 15.0)}]) == ["body"]
    assert choose_recompute(100.0, 100.0, [{"sru": (10.0, 1.0), "body": (50.0, 15.0)}, {"sru": (10.0, 10.0)}]) \
        == ["body", "sru"]


def test_a_free_mode_is_taken_outright_and_the_next_step_weighed_from_it():
    # The SRU frees 5 and saves 1 ms: taken. From there the body frees 15 more for 6 ms: 80 * 105 < 95 * 99.
    assert choose_recompute(100.0, 100.0, [{"sru": (5.0, -1.0), "body": (20.0, 5.0)}]) == ["body"]
    # ... for 41 ms more it does not pay (80 * 140 > 95 * 99): the SRU stays.
    assert choose_recompute(100.0, 100.0, [{"sru": (5.0, -1.0), "body": (20.0, 40.0)}]) == ["sru"]
    # Of two free modes, the one freeing more.
    assert choose_recompute(100.0, 100.0, [{"sru": (5.0, 0.0), "body": (20.0, -0.5)}]) == ["body"]
    # Freeing nothing is never taken, however fast.
    assert choose_recompute(100.0, 100.0, [{"sru": (0.0, -5.0), "body": (-1.0, -5.0)}]) == ["keep"]


def test_densenet_shaped_choice_with_the_sru_mode():
    """DenseNet-121-shaped numbers (2-core CPU, batch 16, 112 px: 830 ms, 606 MiB kept), the sru mode's from a
    measurement of its first form (the SRU's output alone): per layer (SRU freed MiB, added ms), (body freed MiB, added ms) at 28x28 (6.12, 2.2),
    (10.73, 8.8); 14x14 (1.53, 0.07), (2.69, 2.7); 7x7 (0.38, 0.15), (0.68, 1.26); 3x3 (0.07, 0.24),
    (0.13, 1.01). Worked out by hand: the SRU steps of the 28x28, 14x14 and 7x7 layers free 2.5-21.9 MiB per
    ms and pay (541.8 MiB for 847.6 ms: 459,251 against 502,980); then the 28x28 bodies' step (4.61 MiB for
    6.6 ms, 0.70 per ms) pays too (514.1 for 887.2: 456,166); the 3x3 layers' SRU step (0.29 per ms) does
    not (one more: 456,227), nor the 14x14 bodies' (0.44 per ms)."""
    stages = [(6, (6.12, 2.2), (10.73, 8.8)), (12, (1.53, 0.07), (2.69, 2.7)), (24, (0.38, 0.15), (0.68, 1.26)),
              (16, (0.07, 0.24), (0.13, 1.01))]
    layers = [{"sru": (sru[0] * MIB, sru[1]), "body": (body[0] * MIB, body[1])}
              for count, sru, body in stages for _ in range(count)]
    assert choose_recompute(830.0, 606 * MIB, layers) == ["body"] * 6 + ["sru"] * 36 + ["keep"] * 16


# -- the plan on a real model ----------------------------------------------------------------------------


def _resnet20(**scconv) -> torch.nn.Module:
    return build_model(ModelConfig("resnet20", num_classes=10, scconv=SCConvConfig(**scconv)), seed=0).train()


def test_plan_measures_every_plannable_layer_and_sets_its_choice():
    model = _resnet20()
    plan = plan_recompute(model, torch.randn(8, 3, 16, 16), reps=1, layer_reps=1)
    layers = _scconvs(model)
    assert [row.name for row in plan.layers] == [n for n, m in model.named_modules() if isinstance(m, SCConv)]
    assert len(plan.layers) == len(layers) == 9
    for row, layer in zip(plan.layers, layers):
        assert layer.planned_recompute == row.recompute
        assert row.input_shape[0] == 8 and row.keep_ms > 0 and row.recompute_ms > 0 and row.sru_ms > 0
        # Recomputing the body keeps only the input; the SRU's output alone, the rest of the body.
        assert row.recompute_bytes < row.sru_bytes < row.keep_bytes
    assert plan.step_ms > 0 and plan.step_bytes > sum(r.keep_bytes - r.recompute_bytes for r in plan.layers) > 0
    assert plan.recomputed == sum(r.recompute == "body" for r in plan.layers)
    assert plan.sru_recomputed == sum(r.recompute == "sru" for r in plan.layers)
    assert plan.tally == f"{plan.recomputed}+{plan.sru_recomputed}/9"
    assert json.loads(json.dumps(plan.to_dict()))["layers"][0]["name"] == "layer1.0.conv2"
    assert f"{plan.recomputed} of 9 SCConvs" in plan.summary()


def test_planning_leaves_weights_statistics_gradients_and_random_streams_as_they_were():
    model = _resnet20()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 3, 16, 16)
    rng = torch.get_rng_state()
    plan_recompute(model, x, reps=1, layer_reps=1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm running statistics included
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training


@pytest.mark.parametrize("scconv", [{"order": "none"}, {"order": "sru"}, {"impl": "reference"},
                                    {"recompute": "size"}, {"recompute": "never"}])
def test_nothing_to_plan_outside_auto_efficient_orders_with_a_cru(scconv):
    model = _resnet20(**scconv)
    assert plan_recompute(model, torch.randn(2, 3, 16, 16), reps=1, layer_reps=1) is None
    assert all(layer.planned_recompute is None for layer in _scconvs(model))


@pytest.mark.parametrize("order, gate_mode", [("sru_cru", "binary"), ("sru_cru", "reference"), ("cru", "soft"),
                                              ("cru_sru", "ste"), ("parallel", "reference")])
def test_recomputing_or_keeping_gives_the_same_training_step_bit_for_bit(order, gate_mode):
    x, y = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3])
    results = []
    for choice in ("body", "sru", "keep"):
        model = _resnet20(order=order, gate_mode=gate_mode)
        for layer in _scconvs(model):
            layer.planned_recompute = choice
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters() if p.grad is not None])
    assert len(results[0]) == len(results[1]) == len(results[2]) > 1
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(*results))


@pytest.mark.parametrize("policy, expected", [("always", "body"), ("never", "keep"), ("size", "keep"),
                                              ("auto", "keep"), ("sru", "sru")])
def test_the_policies_decide_what_a_layer_keeps(policy, expected):
    """A 0.25 MiB input: ``size`` (and ``auto`` before a plan) keeps it; ``always`` keeps only the input;
    ``sru`` all but the SRU's output (the input's size) and the squeezed inputs (half of it: 64 -> 16 + 16)."""
    x = torch.randn(4, 64, 16, 16, requires_grad=True)
    input_bytes = x.numel() * x.element_size()
    keeping = SCConv(64, 64, config=SCConvConfig(recompute="never")).train()
    kept = saved_activation_bytes(keeping(x), keeping.parameters())
    partial = kept - input_bytes - input_bytes // 2
    layer = SCConv(64, 64, config=SCConvConfig(recompute=policy)).train()
    saved = saved_activation_bytes(layer(x), layer.parameters())
    assert saved == {"body": input_bytes, "keep": kept, "sru": partial}[expected]
    if policy == "auto":
        for mode, want in (("body", input_bytes), ("sru", partial), ("keep", kept)):
            layer.planned_recompute = mode
            assert saved_activation_bytes(layer(x), layer.parameters()) == want


def test_an_unknown_policy_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"^scconv\.recompute='sometimes'.*auto, size, always, never, sru"):
        RunConfig.from_dict({"scconv.recompute": "sometimes"})

