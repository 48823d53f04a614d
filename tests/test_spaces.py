"""Space files: every shipped one validates; every malformed one is one line naming file, line and problem."""

from pathlib import Path

import pytest

from ablate.errors import ConfigError
from ablate.study.spaces import Range, available, load_space, parse_space

GOOD = """\
[study]
description = "a test space"
sampler = "grid"
pruner = "none"

[base]
dataset = "digits"
backbone = "resnet20"
epochs = 2

[params]
"scconv.order" = ["none", "sru_cru"]
"""


def write(tmp_path: Path, text: str, name: str = "space.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(name: str, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_space(name, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", available())
def test_every_shipped_space_loads_and_validates(name):
    space = load_space(name)
    assert space.name == name
    assert space.description
    assert space.size() >= 1
    if space.is_grid:
        cells = space.cells()
        assert len(cells) == space.size()
        assert len({tuple(sorted(c.items())) for c in cells}) == len(cells)  # no cell twice
        for cell in cells[:3]:
            cfg = space.run_config(cell, experiment="x")
            assert cfg.experiment == "x"


def test_shipped_spaces_include_the_issue_spaces():
    assert {"sru_cru_order", "alpha_squeeze", "gate_modes", "stability_seeds", "tpe_alpha"} <= set(available())


def test_sru_cru_order_grid_is_the_six_orders_in_file_order():
    space = load_space("sru_cru_order")
    orders = ["none", "sru", "cru", "sru_cru", "cru_sru", "parallel"]
    cells = space.cells()
    # every order with five seeds (the report's permutation tests need them), orders in file order
    assert list(dict.fromkeys(c["scconv.order"] for c in cells)) == orders
    assert sorted((c["scconv.order"], c["seed"]) for c in cells) == sorted((o, s) for o in orders for s in range(5))
    assert space.base["epochs"] == 25 and space.pruner == "none" and space.directions == ("maximize",)


def test_seeds_repeat_every_variant_and_bundles_apply():
    space = load_space("stability_seeds")
    cells = space.cells()
    assert len(cells) == 5 * 5
    assert space.swept_keys() == ["variant", "seed"]
    assert sorted({c["seed"] for c in cells}) == [0, 1, 2, 3, 4]
    assert sum(c["variant"] == "none" for c in cells) == 5
    cfg = space.run_config({"variant": "sru_cru-soft", "seed": 3})
    assert (cfg.model.scconv.order, cfg.model.scconv.gate_mode, cfg.train.seed) == ("sru_cru", "soft", 3)
    assert space.run_config({"variant": "none", "seed": 0}).model.scconv.order == "none"


def test_run_config_layers_base_then_overrides_then_cell(tmp_path):
    space = load_space(write(tmp_path, GOOD), {"epochs": "1"})
    cfg = space.run_config({"scconv.order": "sru_cru"}, {"epochs": "1", "lr": "0.2"}, experiment="mine")
    assert (cfg.train.epochs, cfg.train.lr, cfg.model.scconv.order, cfg.experiment) == (1, 0.2, "sru_cru", "mine")
    assert space.run_config({"scconv.order": "none"}).train.epochs == 2
    assert space.run_config({"scconv.order": "none"}).experiment == "space"  # the study name (the file's stem)


def test_stepped_ranges_expand_and_continuous_ones_stay_ranges():
    alpha = load_space("alpha_squeeze").params["scconv.alpha"]
    assert isinstance(alpha, Range)
    assert alpha.grid() == [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875]
    assert Range(1, 9, 4, integer=True).grid() == [1, 5, 9]
    tpe = load_space("tpe_alpha")
    assert tpe.params["scconv.alpha"].grid() is None and tpe.size() == 20


def test_a_path_to_a_toml_file_is_a_space(tmp_path):
    space = load_space(write(tmp_path, GOOD, "mine.toml"))
    assert space.name == "mine" and len(space.cells()) == 2


# -- errors: one line, file, line, problem -------------------------------------------------------


def test_unknown_space_lists_the_available_ones():
    message = error_of("sru_cru_ordr")
    assert "space='sru_cru_ordr'" in message and "did you mean 'sru_cru_order'" in message
    for name in available():
        assert name in message


def test_missing_space_file_is_named(tmp_path):
    message = error_of(str(tmp_path / "nope.toml"))
    assert "nope.toml" in message and "no such file" in message


def test_malformed_toml_names_file_and_line(tmp_path):
    path = write(tmp_path, GOOD.replace('epochs = 2', 'epochs = = 2'))
    message = error_of(path)
    assert message.startswith(f"{path}:9: ") and "Invalid value" in message


def test_unknown_study_key_suggests_the_right_one(tmp_path):
    path = write(tmp_path, GOOD.replace('sampler = "grid"', 'samplr = "grid"'))
    message = error_of(path)
    assert message.startswith(f"{path}:3: ") and "study.samplr" in message and "did you mean 'sampler'" in message


def test_unknown_table_suggests_the_right_one(tmp_path):
    path = write(tmp_path, GOOD.replace("[params]", "[param]"))
    message = error_of(path)
    assert message.startswith(f"{path}:11: ") and "did you mean 'params'" in message


def test_unknown_config_key_in_base_names_its_line(tmp_path):
    path = write(tmp_path, GOOD.replace("epochs = 2", "epoch = 2"))
    message = error_of(path)
    assert message.startswith(f"{path}:9: [base]") and "did you mean 'epochs'" in message


@pytest.mark.parametrize("old, new, line, words", [
    ("epochs = 2", "epochs = 0", 9, ["[base]", "epochs=0", "an integer >= 1"]),
    ('"scconv.order" = ["none", "sru_cru"]', '"scconv.order" = ["none", "sru_crux"]', 12,
     ["[params]", "scconv.order='sru_crux'", "did you mean 'sru_cru'"]),
    ('"scconv.order" = ["none", "sru_cru"]', '"scconv.alpha" = {low = 0.25, high = 0.75}', 12,
     ["has no step", "grid sampler"]),
    ('"scconv.order" = ["none", "sru_cru"]', '"scconv.order" = ["none", "none"]', 12, ["repeats a value"]),
    ('"scconv.order" = ["none", "sru_cru"]', '"scconv.order" = []', 12, ["empty list"]),
    ('backbone = "resnet20"', 'backbone = "resnet21"', 8, ["backbone='resnet21'", "did you mean 'resnet20'"]),
    ('sampler = "grid"', 'sampler = "tpe"', 3, ["n_trials is missing"]),
    ('pruner = "none"', 'pruner = "medain"', 4, ["did you mean 'median'"]),
    ('description = "a test space"', 'directions = ["maximize", "minimize"]', 2, ["2 directions"]),
    ('description = "a test space"', 'seeds = [0, 0]', 2, ["study.seeds"]),
    ('description = "a test space"', 'name = "bad name!"', 2, ["study.name='bad name!'"]),
    ("epochs = 2", 'experiment = "x"', 9, ["experiment is set by the study"]),
])
def test_bad_values_name_line_and_accepted(tmp_path, old, new, line, words):
    path = write(tmp_path, GOOD.replace(old, new))
    message = error_of(path)
    assert message.startswith(f"{path}:{line}: "), message
    assert "accepted" in message or "did you mean" in message
    for word in words:
        assert word in message, message


def test_bad_variant_names_its_line(tmp_path):
    path = write(tmp_path, GOOD + '\n[variants]\nbase = {"scconv.order" = "none"}\nbad = {"scconv.gate_mode" = "x"}\n')
    message = error_of(path)
    assert message.startswith(f"{path}:16: [variants] bad: scconv.gate_mode='x'")


def test_set_errors_name_the_set_option(tmp_path):
    path = write(tmp_path, GOOD)
    assert "did you mean 'epochs'" in error_of(path, {"epoch": "1"})
    assert error_of(path, {"epochs": "ten"}).startswith("--set epochs='ten' is not valid")
    assert "sweeps scconv.order" in error_of(path, {"scconv.order": "none"})
    assert "the study sets experiment" in error_of(path, {"experiment": "x"})
    assert "sweeps seed" in error_of("stability_seeds", {"seed": "1"})


def test_parse_space_without_a_file_still_validates(tmp_path):
    raw = {"study": {"sampler": "grid"}, "params": {"scconv.order": ["none", "cru"]}}
    space = parse_space(raw, tmp_path / "virtual.toml")
    assert space.name == "virtual" and len(space.cells()) == 2
    with pytest.raises(ConfigError, match="unknown key study.nme"):
        parse_space({"study": {"nme": "x"}, "params": {"lr": [0.1]}}, tmp_path / "virtual.toml")
