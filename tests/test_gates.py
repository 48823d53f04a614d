"""analysis.gates: gate metrics -> per layer/epoch tables, flip-share coupling, live mask probes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis import gates

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


def test_flip_points_are_first_differences_from_epoch_two():
    history, runs = _history()
    pts = gates.flip_points(gates.gate_frame(history, runs), history)
    run_a = pts[(pts["run_id"] == "a") & (pts["layer"] == "layer2.conv")].sort_values("epoch")
    assert run_a["epoch"].tolist() == list(range(2, len(VAL)))
    np.testing.assert_allclose(run_a["abs_d_val_loss"], np.abs(np.diff(VAL))[1:])
    np.testing.assert_allclose(run_a["d_flip"], np.abs(np.diff(VAL))[1:])  # flip rises by |delta val|
    later = gates.flip_points(gates.gate_frame(history, runs), history, from_epoch=4)
    assert later["epoch"].min() == 5


def test_flip_coupling_ranks_the_coupled_layer_first():
    history, runs = _history()
    table = gates.flip_coupling(gates.flip_points(gates.gate_frame(history, runs), history))
    top = table.iloc[0]
    assert top["layer"] == "layer2.conv" and top["rank"] == 1
    assert top["rho"] == pytest.approx(1.0) and top["rho_run_median"] == pytest.approx(1.0)
    assert top["n_pairs"] == 2 * (len(VAL) - 2) and top["n_runs"] == 2
    assert top["p_value"] == pytest.approx(0.5)  # 2 runs, both rho = 1: 2 of 4 sign patterns as extreme
    assert table.iloc[1]["layer"] == "layer10.conv" and table.iloc[1]["rho"] < 1


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


def test_run_gate_summary_and_association():
    history, runs = _history()
    g = gates.gate_frame(history, runs)
    summary = gates.run_gate_summary(g)
    # drift is the last epoch's value; the flip share mean leaves epoch 0 out
    assert summary.loc["a", "gate.sru.gamma_drift"] == pytest.approx(0.06)
    flips = g[(g["run_id"] == "a") & (g["stat"] == "flip_share") & (g["epoch"] >= 1)]["value"].mean()
    assert summary.loc["a", "gate.sru.flip_share"] == pytest.approx(flips)
    extra = pd.DataFrame({"gate.sru.flip_share": [0.1, 0.2, 0.3, 0.4], "gate.sru.informative_share": [0.4, 0.1, 0.3, 0.2],
                          "target": [1.0, 2.0, 3.0, 4.0]})
    assoc = gates.gate_association(extra, "target")
    assert assoc["gate_stat"].tolist() == ["gate.sru.flip_share", "gate.sru.informative_share"]
    assert assoc.iloc[0]["rho"] == pytest.approx(1.0) and assoc.iloc[0]["n_runs"] == 4


def test_probe_masks_on_a_model():
    import torch

    from ablate.config import ModelConfig, SCConvConfig
    from ablate.models import build_model

    model = build_model(ModelConfig(backbone="resnet20", num_classes=10, scconv=SCConvConfig(order="sru")), seed=0)
    masks = gates.probe_masks(model, torch.randn(2, 3, 16, 16))
    assert len(masks) == 9 and all(m.dtype == torch.bool and m.shape[0] == 2 for m in masks.values())
    assert all(getattr(m, "last_mask", None) is None for m in model.modules())  # stats released afterwards
