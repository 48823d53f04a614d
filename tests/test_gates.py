"""analysis.gates: gate metrics -> per layer/epoch tables, flip-share coupling, live mask probes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis import gates, trend

VAL = [1.0, 0.8, 0.9, 0.6, 0.75, 0.5, 0.55]


def _history() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two runs of one variant: val_loss, a flip share that tracks |delta val loss| in layer2, noise in layer10."""
    rng = np.random.default_rng(0)
    rows = []
    for run, shift in (("a", 0.0), ("b", 0.05)):
        val = np.array(VAL) + shift
        jumps = np.abs(np.diff(val, prepend=val[0]))
        flip2 = np.cumsum(jumps)
        flip2[0] = 0.0
        flip10 = rng.uniform(0, 0.1, len(val))
        for e, v in enumerate(val):
            rows += [(run, e, "val_loss", v), (run, e, "train_loss", v - 0.2),
                     (run, e, "sru/layer2.conv/flip_share", flip2[e]),
                     (run, e, "sru/layer10.conv/flip_share", flip10[e]),
                     (run, e, "sru/layer2.conv/gamma_drift", 0.01 * e),
                     (run, e, "sru/layer2.conv/informative_share", 0.4 + (0.2 if run == "b" else 0.0)),
                     (run, e, "cru/layer2.conv/beta_entropy", 0.6)]
    history = pd.DataFrame(rows, columns=["run_id", "epoch", "metric", "value"])
    runs = pd.DataFrame({"variant": ["sru", "sru"], "seed": [0, 1]}, index=pd.Index(["a", "b"], name="run_id"))
    return history, runs


def test_gate_frame_splits_keys_and_skips_other_metrics():
    history, runs = _history()
    g = gates.gate_frame(history, runs)
    assert list(g.columns) == gates.GATE_COLUMNS
    assert set(g["kind"]) == {"sru", "cru"}
    assert set(g["stat"]) == {"flip_share", "gamma_drift", "informative_share", "beta_entropy"}
    assert sorted(g["layer"].unique(), key=gates.layer_sort_key) == ["layer2.conv", "layer10.conv"]  # not string order
    assert gates.is_gate_metric("sru/layer3.2.conv2/flip_share") and not gates.is_gate_metric("val_loss")


def test_gate_frame_without_gates_is_empty():
    history, runs = _history()
    g = gates.gate_frame(history[~history["metric"].str.contains("/")], runs)
    assert g.empty and list(g.columns) == gates.GATE_COLUMNS


def test_layer_epoch_stats_mean_over_seeds():
    history, runs = _history()
    table = gates.layer_epoch_stats(gates.gate_frame(history, runs))
    row = table[(table["layer"] == "layer2.conv") & (table["epoch"] == 3) & (table["kind"] == "sru")].iloc[0]
    assert row["informative_share"] == pytest.approx(0.5)  # 0.4 and 0.6
    assert row["gamma_drift"] == pytest.approx(0.03)
    cru = table[table["kind"] == "cru"]
    assert (cru["beta_entropy"] == 0.6).all()


def test_final_gamma_drift_per_layer():
    history, runs = _history()
    final = gates.final_stat(gates.gate_frame(history, runs), "sru", "gamma_drift")
    assert final.to_dict("records") == [{"variant": "sru", "layer": "layer2.conv", "value": pytest.approx(0.06)}]


def test_flip_points_pair_each_epochs_flip_share_with_its_val_loss_jump():
    history, runs = _history()
    pts = gates.flip_points(gates.gate_frame(history, runs), history)
    assert list(pts.columns) == gates.POINT_COLUMNS
    run_a = pts[(pts["run_id"] == "a") & (pts["layer"] == "layer2.conv")].sort_values("epoch")
    # epoch 0's flip share is valid, but the val loss before training is not logged: pairs start at epoch 1
    assert run_a["epoch"].tolist() == list(range(1, len(VAL)))
    np.testing.assert_allclose(run_a["abs_d_val_loss"], np.abs(np.diff(VAL)))
    np.testing.assert_allclose(run_a["flip_share"], np.cumsum(np.abs(np.diff(VAL))))  # the level, not differenced
    assert run_a["flip_resid"].isna().all()  # 6 pairs: too short to detrend without a shared misfit
    later = gates.flip_points(gates.gate_frame(history, runs), history, from_epoch=4)
    assert later["epoch"].min() == 4


def test_flip_points_detrend_runs_with_enough_epochs():
    history, runs = _decaying_runs(np.random.default_rng(2), 2, gates.MIN_COUPLING_EPOCHS + 1, {"l1": 0.0})
    pts = gates.flip_points(gates.gate_frame(history, runs), history)
    assert pts["flip_resid"].notna().all() and pts["dval_resid"].notna().all()
    shorter = gates.flip_points(gates.gate_frame(history, runs), history, from_epoch=2)  # one pair fewer
    assert shorter["flip_resid"].isna().all()
    one = pts[pts["run_id"] == "v0"]
    np.testing.assert_allclose(one["flip_resid"], trend.residual(one["flip_share"].to_numpy()))


def _decaying_runs(rng, n_runs: int, epochs: int, coupling: dict[str, float], variant: str = "v"):
    """Runs whose val loss and per-layer flip shares both decay with noise; flip += coupling x |delta val loss|."""
    rows, index = [], []
    for r in range(n_runs):
        e = np.arange(epochs)
        val = 1.5 * np.exp(-e / rng.uniform(2, 5)) + 0.5 + rng.normal(0, 0.03, epochs)
        jump = np.abs(np.diff(val, prepend=val[0]))
        run = f"{variant}{r}"
        for layer, k in coupling.items():
            flip = np.clip(0.2 * np.exp(-e / rng.uniform(2, 6)) + 0.02 + rng.normal(0, 0.005, epochs) + k * jump, 0, 1)
            rows += [(run, int(i), f"sru/{layer}/flip_share", flip[i]) for i in e]
        rows += [(run, int(i), "val_loss", val[i]) for i in e]
        index.append((run, variant, r))
    history = pd.DataFrame(rows, columns=["run_id", "epoch", "metric", "value"])
    runs = pd.DataFrame(index, columns=["run_id", "variant", "seed"]).set_index("run_id")
    return history, runs


def _coupling(history, runs):
    return gates.flip_coupling(gates.flip_points(gates.gate_frame(history, runs), history))


def _false_positive_rate(draws: int, epochs: int) -> tuple[float, float]:
    rng = np.random.default_rng(7)
    tables = [_coupling(*_decaying_runs(rng, 5, epochs, {"l1": 0.0})) for _ in range(draws)]
    p = np.array([t["p_value"].iloc[0] for t in tables])
    rho = np.array([t["rho"].iloc[0] for t in tables])
    return float(np.mean(p <= 0.05)), float(rho.mean())


def test_independent_decaying_flips_are_not_coupled():
    # the old double-differenced statistic averaged rho = -0.66 here and every run's rho was negative
    rate, mean_rho = _false_positive_rate(draws=25, epochs=15)
    assert abs(mean_rho) < 0.1
    assert rate <= 0.12  # 25 draws: at most 3 rejections (the slow test pins the rate over many draws)


@pytest.mark.slow
def test_false_positive_rate_of_flip_coupling_over_many_draws():
    for epochs in (15, 25):
        rate, mean_rho = _false_positive_rate(draws=300, epochs=epochs)
        assert rate <= 0.07 and abs(mean_rho) < 0.05  # nominal 5 %; 0.07 allows the binomial SD of 300 draws


def test_coupled_flips_are_detected_and_uncoupled_layers_are_not():
    rng = np.random.default_rng(3)
    history, runs = _decaying_runs(rng, 5, 15, {"layer2.conv": 0.3, "layer10.conv": 0.0})
    table = _coupling(history, runs)
    assert list(table.columns) == gates.COUPLING_COLUMNS
    assert table["layer"].tolist() == ["layer2.conv", "layer10.conv"]  # natural order, not ranked
    coupled, noise = table.iloc[0], table.iloc[1]
    assert coupled["rho"] > 0.5 and coupled["q_value"] <= 0.05 and coupled["n_runs"] == 5
    assert noise["q_value"] > 0.05
    assert coupled["q_value"] == pytest.approx(min(1.0, 2 * min(table["p_value"])))  # BH over the 2 layers


def test_flip_coupling_with_one_run_has_no_p_value():
    rng = np.random.default_rng(4)
    table = _coupling(*_decaying_runs(rng, 1, 12, {"l1": 0.3}))
    assert table["n_runs"].tolist() == [1] and np.isnan(table["p_value"].iloc[0]) and np.isnan(table["q_value"].iloc[0])


def test_run_level_pvalue_is_a_t_test_of_fisher_z():
    from scipy import stats as sps

    rhos = [0.5, 0.6, 0.7, 0.55, 0.65]
    assert gates.run_level_pvalue(rhos) == pytest.approx(sps.ttest_1samp(np.arctanh(rhos), 0).pvalue)
    assert gates.run_level_pvalue(rhos) < 0.001  # 5 runs can reach 0.05, unlike the sign-flip floor 2/32
    assert gates.sign_flip_pvalue(rhos) == pytest.approx(2 / 32)
    assert gates.run_level_pvalue([0.5, -0.5, 0.4, -0.4]) == pytest.approx(1.0)
    assert np.isnan(gates.run_level_pvalue([0.9, 0.8]))  # 2 runs: a t-test with 1 degree of freedom, not run
    assert np.isnan(gates.run_level_pvalue([0.3, 0.3, 0.3]))  # no spread: t undefined
    assert np.isfinite(gates.run_level_pvalue([1.0, 0.99, 0.98]))  # |rho| = 1 is clipped, not infinite


def test_bh_qvalues_keep_nan():
    q = gates.bh_qvalues([0.01, np.nan, 0.04, 0.03])
    np.testing.assert_allclose(q, [0.03, np.nan, 0.04, 0.04])


def test_spearman_edge_cases():
    rho, p = gates.spearman([1, 2, 3, 4, 5, 6], [2, 4, 6, 8, 10, 12])
    assert rho == pytest.approx(1.0)
    assert p == pytest.approx(2 / 720)  # exact: 6! pairings, both tails
    assert np.isnan(gates.spearman([1, 2], [1, 2])[0])  # too few pairs
    assert np.isnan(gates.spearman([1, 1, 1, 1], [1, 2, 3, 4])[0])  # constant
    rho, p = gates.spearman([1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1], with_p=False)
    assert rho == pytest.approx(-1.0) and np.isnan(p)


def test_sign_flip_pvalue():
    assert gates.sign_flip_pvalue([0.9, 0.8, 0.7, 0.95, 0.6]) == pytest.approx(2 / 32)
    assert gates.sign_flip_pvalue([0.5, -0.5, 0.4, -0.4]) == pytest.approx(1.0)
    assert np.isnan(gates.sign_flip_pvalue([0.9]))
    p = gates.sign_flip_pvalue(np.full(20, 0.5))  # Monte Carlo: at least 1 / (n_perm + 1)
    assert 0 < p < 0.001


def test_run_gate_summary_keeps_epoch_zero_flips():
    history, runs = _history()
    g = gates.gate_frame(history, runs)
    summary = gates.run_gate_summary(g)
    assert summary.loc["a", "gate.sru.gamma_drift"] == pytest.approx(0.06)  # the last epoch's value
    flips = g[(g["run_id"] == "a") & (g["stat"] == "flip_share")]["value"].mean()  # epoch 0 included
    assert summary.loc["a", "gate.sru.flip_share"] == pytest.approx(flips)
    assert not any("near_threshold" in c for c in summary.columns)


def test_layer_stats_show_scale_free_statistics_not_near_threshold_share():
    stats_ = {s for _, s in gates.LAYER_STATS}
    assert {"margin_share", "perturb_flip_share"} <= stats_ and "near_threshold_share" not in stats_


def test_gate_association_is_per_variant_never_pooled():
    table = pd.DataFrame({
        "variant": ["x"] * 6 + ["y"] * 4,
        "gate.sru.margin_share": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.4, 0.1, 0.3, 0.2],
        "target": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0, 2.0, 3.0, 4.0]})
    assoc = gates.gate_association(table, "target")
    assert list(assoc.columns) == gates.ASSOCIATION_COLUMNS
    x, y = assoc.set_index("variant").loc["x"], assoc.set_index("variant").loc["y"]
    assert x["rho"] == pytest.approx(1.0) and x["n_runs"] == 6 and x["p_value"] == pytest.approx(2 / 720)
    assert y["n_runs"] == 4 and y["rho"] == pytest.approx(-0.4)
    assert x["q_value"] == pytest.approx(2 * 2 / 720)  # BH over the two variants' rows
    pooled_rho = gates.spearman(table["gate.sru.margin_share"], table["target"], with_p=False)[0]
    assert not np.isclose(pooled_rho, assoc["rho"]).any()


def test_probe_masks_on_a_model():
    import torch

    from ablate.config import ModelConfig, SCConvConfig
    from ablate.models import build_model

    model = build_model(ModelConfig(backbone="resnet20", num_classes=10, scconv=SCConvConfig(order="sru")), seed=0)
    masks = gates.probe_masks(model, torch.randn(2, 3, 16, 16))
    assert len(masks) == 9 and all(m.dtype == torch.bool and m.shape[0] == 2 for m in masks.values())
    assert all(getattr(m, "last_mask", None) is None for m in model.modules())  # stats released afterwards


def test_constant_flip_share_is_not_tested():
    # a layer whose mask never changes (flip share 0 every epoch) has no ranking to correlate
    rng = np.random.default_rng(5)
    history, runs = _decaying_runs(rng, 4, 12, {"l1": 0.0})
    history.loc[history["metric"] == "sru/l1/flip_share", "value"] = 0.0
    table = _coupling(history, runs)
    assert table["n_runs"].tolist() == [0] and np.isnan(table["p_value"].iloc[0]) and np.isnan(table["rho"].iloc[0])


def test_a_val_loss_spike_met_by_a_flip_burst_is_detected():
    # awkward case: one spike per run at a random epoch; the mask churns in the two epochs val loss jumps
    # (over 40 draws of this design the coupling was found in 98 %, mean rho 0.67)
    rng = np.random.default_rng(0)
    rows, index = [], []
    for r in range(5):
        e = np.arange(15)
        val = 1.5 * np.exp(-e / 3) + 0.5 + rng.normal(0, 0.03, 15)
        spike = int(rng.integers(5, 13))
        val[spike] += 0.4
        flip = 0.2 * np.exp(-e / 4) + 0.02 + rng.normal(0, 0.005, 15)
        flip[spike:spike + 2] += 0.05
        rows += [(f"r{r}", int(i), "val_loss", val[i]) for i in e]
        rows += [(f"r{r}", int(i), "sru/l/flip_share", flip[i]) for i in e]
        index.append((f"r{r}", "v", r))
    history = pd.DataFrame(rows, columns=["run_id", "epoch", "metric", "value"])
    runs = pd.DataFrame(index, columns=["run_id", "variant", "seed"]).set_index("run_id")
    row = _coupling(history, runs).iloc[0]
    assert row["rho"] > 0.4 and row["q_value"] <= 0.05
