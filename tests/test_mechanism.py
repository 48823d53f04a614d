"""analysis.report.mechanism: gate-mode sentences, scale-free gate statistics, coupling and association wording,
perturbation sensitivity per variant with its test, on synthetic runs whose answer is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ablate.names import SENS_SLOPE_METRIC, sens_metric
from analysis import gates
from analysis.report import mechanism
from analysis.report.data import ReportData
from analysis.runs import RunSet

EPS = (1e-4, 1e-3, 1e-2, 1e-1)
MODES = {"none": None, "soft": "soft", "binary": "binary"}


def _run_rows(rng, run: str, variant: str, epochs: int) -> list[tuple]:
    """val_loss, sensitivities (binary: c eps^-0.5; otherwise flat) and, for gated variants, SRU statistics."""
    e = np.arange(epochs)
    val = 1.2 * np.exp(-e / 3) + 0.6 + rng.normal(0, 0.02, epochs)
    rows = [(run, int(i), "val_loss", val[i]) for i in e]
    level = {"none": 0.08, "soft": 0.012, "binary": 0.3}[variant]
    for i in e:
        for eps in EPS:
            out = level * (eps / 1e-4) ** -0.5 if variant == "binary" else level
            rows.append((run, int(i), sens_metric("out", eps), out * rng.lognormal(0, 0.05)))
            rows.append((run, int(i), sens_metric("loss", eps), 0.1 * out * rng.lognormal(0, 0.05)))
        rows.append((run, int(i), SENS_SLOPE_METRIC, (-0.5 if variant == "binary" else 0.0) + rng.normal(0, 0.02)))
    run_noise = rng.normal(0, 0.002)
    if variant != "none":
        jump = np.abs(np.diff(val, prepend=val[0]))
        for layer in ("layer1.0.conv2", "layer2.0.conv2"):
            flip = 0.1 * np.exp(-e / 4) + 0.02 + rng.normal(0, 0.003, epochs)
            if layer == "layer2.0.conv2" and variant == "binary":
                flip = flip + 0.4 * jump
            margin = (0.08 if variant == "soft" else 0.2) + run_noise  # varies across runs, not with resid_sd
            stats_ = {"flip_share": flip, "margin_share": np.full(epochs, margin),
                      "perturb_flip_share": np.full(epochs, 0.001 if variant == "soft" else 0.01),
                      "near_threshold_share": np.full(epochs, 0.99), "informative_share": np.full(epochs, 0.5),
                      "gamma_drift": np.zeros(epochs) if variant == "binary" else np.linspace(0, 0.05, epochs)}
            for stat, values in stats_.items():
                rows += [(run, int(i), f"sru/{layer}/{stat}", float(values[i])) for i in e]
    return rows


def _data(seeds: int = 5, epochs: int = 12, variants=("none", "soft", "binary")) -> ReportData:
    rng = np.random.default_rng(0)
    rows, runs, params = [], [], []
    for variant in variants:
        for seed in range(seeds):
            run = f"{variant}-{seed}"
            rows += _run_rows(rng, run, variant, epochs)
            runs.append((run, variant, seed))
            params.append((run, MODES[variant] or "binary"))  # order none still logs the preset's mode
    history = pd.DataFrame(rows, columns=["run_id", "epoch", "metric", "value"])
    run_df = pd.DataFrame(runs, columns=["run_id", "variant", "seed"]).set_index("run_id")
    param_df = pd.DataFrame(params, columns=["run_id", "scconv.gate_mode"]).set_index("run_id")
    rs = RunSet("synthetic", "0", run_df, param_df, history, baseline="none")
    gate_df = gates.gate_frame(history, run_df)
    summary = gates.run_gate_summary(gate_df)
    run_metrics = run_df.reset_index().merge(summary, left_on="run_id", right_index=True, how="left")
    resid = run_metrics["run_id"].map(lambda r: 0.1 + 0.01 * int(r.split("-")[1]))
    run_metrics["val_loss.resid_sd"] = resid
    points = gates.flip_points(gate_df, history)
    gated = run_metrics[run_metrics["variant"] != "none"].set_index("run_id")
    return ReportData(runs=rs, from_epoch=0, run_metrics=run_metrics, comparisons=pd.DataFrame(), gates=gate_df,
                      layer_stats=gates.layer_epoch_stats(gate_df), flip_points=points,
                      flip_coupling=gates.flip_coupling(points),
                      gate_association=gates.gate_association(gated, "val_loss.resid_sd",
                                                              ["gate.sru.margin_share"]),
                      churn=pd.DataFrame())


@pytest.fixture(scope="module")
def data() -> ReportData:
    return _data()


def test_sensitivity_table_separates_the_hard_gate(data):
    sens = mechanism.sensitivity_table(data.runs.history, data.runs.runs, "none", data.runs.variants)
    assert list(sens.columns) == mechanism.SENS_COLUMNS
    slope = sens[sens["metric"] == SENS_SLOPE_METRIC].set_index("variant")
    assert slope.loc["binary", "median"] == pytest.approx(-0.5, abs=0.03)
    assert abs(slope.loc["soft", "median"]) < 0.03 and np.isnan(slope.loc["none", "p_value"])
    assert slope.loc["binary", "vs_baseline"] == pytest.approx(-0.5, abs=0.05)  # a difference for the slope
    # 5 vs 5 runs, fully separated: the exact two-sided permutation p is 2 / C(10, 5)
    assert slope.loc["binary", "p_value"] == pytest.approx(2 / 252) and slope.loc["binary", "q_value"] <= 0.05
    out = sens[(sens["metric"] == sens_metric("out", 1e-4))].set_index("variant")
    assert out.loc["binary", "vs_baseline"] == pytest.approx(0.3 / 0.08, rel=0.05)  # ratio of medians
    assert out.loc["binary", "n_runs"] == 5 and out.loc["binary", "min"] <= out.loc["binary", "median"]
    # BH over the whole table (one exploratory family)
    np.testing.assert_allclose(sens["q_value"].dropna(), gates.bh_qvalues(sens["p_value"].dropna()))


def test_sensitivity_lines_name_the_signature_with_q(data):
    sens = mechanism.sensitivity_table(data.runs.history, data.runs.runs, "none", data.runs.variants)
    lines = mechanism.sensitivity_lines(sens, "none")
    binary = next(line for line in lines if line.startswith("`binary`"))
    soft = next(line for line in lines if line.startswith("`soft`"))
    assert "reads as the hard-gate 1/sqrt(eps) signature" in binary and "differs from `none`" in binary
    assert "out sensitivity vs `none` at q <= 0.05: x3.8 at eps 0.0001" in binary
    assert "no hard-gate signature" in soft and "not different at q <= 0.05 from `none`" in soft
    no_slope = sens[sens["metric"] != SENS_SLOPE_METRIC].assign(p_value=0.5, q_value=0.5)
    lines = mechanism.sensitivity_lines(no_slope, "none")
    soft = next(line for line in lines if line.startswith("`soft`"))
    assert "no `sens/slope` logged" in soft and "not different from `none` at q <= 0.05 at any eps" in soft
    assert "exploratory" in lines[-1]


def test_sensitivity_without_runs_of_the_metric_is_empty():
    history = pd.DataFrame({"run_id": ["a"], "epoch": [0], "metric": ["val_loss"], "value": [1.0]})
    runs = pd.DataFrame({"variant": ["none"]}, index=pd.Index(["a"], name="run_id"))
    sens = mechanism.sensitivity_table(history, runs, "none", ["none"])
    assert sens.empty and list(sens.columns) == mechanism.SENS_COLUMNS
    assert mechanism.sensitivity_lines(sens, "none") == []


def test_sens_metrics_parses_names():
    names = [sens_metric("out", 1e-2), sens_metric("loss", 1e-4), SENS_SLOPE_METRIC, "val_loss", "sens/out/eps_x"]
    parsed = mechanism.sens_metrics(names)
    assert [(k, e) for _, k, e in parsed if k != "slope"] == [("loss", 1e-4), ("out", 1e-2)]
    assert [m for m, k, _ in parsed if k == "slope"] == [SENS_SLOPE_METRIC]


def test_gate_mode_lines_say_what_the_mode_implies(data):
    lines = mechanism.gate_mode_lines(data)
    binary = next(line for line in lines if line.startswith("`binary`"))
    soft = next(line for line in lines if line.startswith("`soft`"))
    assert "no gradient reaches GroupNorm's gamma or beta" in binary and "per-sample group mean" in binary
    assert "`binary` median 0, max 0 (5 runs)" in binary  # measured drift: gamma never moved
    assert "smooth" in soft and "per-sample group mean" not in soft
    assert not any(line.startswith("`none`") for line in lines)  # no SRU, nothing to say


def test_gate_mode_mixed_across_runs_is_not_guessed(data):
    params = data.runs.params.copy()
    params.loc["binary-0", "scconv.gate_mode"] = "ste"
    modes = mechanism.gate_modes(params, data.runs.runs, {"binary", "soft"})
    assert modes == {"binary": None, "soft": "soft"}


def test_scale_free_summary_and_no_near_threshold_share(data):
    summary = mechanism.scale_free_summary(data.run_metrics)
    assert list(summary.columns) == mechanism.GATE_SUMMARY_COLUMNS
    row = summary[(summary["variant"] == "soft") & (summary["stat"] == "margin_share")].iloc[0]
    assert row["median"] == pytest.approx(0.08, abs=0.01) and row["n_runs"] == 5 and row["min"] < row["max"]
    section = mechanism.mechanism_section(data)
    mentions = [line for line in section.lines if "near_threshold" in line]
    assert len(mentions) == 1 and "is not shown" in mentions[0]  # only to say why; no value of it anywhere
    assert not any("near_threshold" in t for t in section.tables["gate_scale_free.csv"]["stat"])
    assert any(line.startswith("`binary` gate statistics") and "margin_share 0.2" in line for line in section.lines)


def test_coupling_lines_claim_only_significant_layers_and_never_rank(data):
    lines = mechanism.coupling_lines(data.flip_coupling)
    assert len(lines) == 1 and "`binary` layer2.0.conv2" in lines[0] and "q = " in lines[0]
    assert "layer1.0.conv2" not in lines[0]
    null = data.flip_coupling.assign(p_value=0.5, q_value=0.8)
    text = mechanism.coupling_lines(null)[0]
    assert "no layer" in text and "smallest q = 0.8" in text
    assert not any(word in text for word in ("most", "least", "ranked"))
    one_run = data.flip_coupling.assign(p_value=np.nan, q_value=np.nan)
    assert "not tested, no variant has 3 runs with at least 10 epoch pairs" in mechanism.coupling_lines(one_run)[0]


def test_association_lines_claim_only_after_correction(data):
    assoc = data.gate_association
    assert set(assoc["variant"]) == {"soft", "binary"}  # never pooled across variants
    assert (assoc["n_runs"] == 5).all()
    text = mechanism.association_lines(assoc)[0]
    assert "no association" in text and "smallest q = " in text  # margin_share is unrelated to resid_sd
    constant = assoc.assign(rho=np.nan, p_value=np.nan, q_value=np.nan)
    assert "not tested" in mechanism.association_lines(constant)[0]
    fake = assoc.assign(rho=[1.0, 0.2], p_value=[0.001, 0.6], q_value=[0.002, 0.6])
    text = mechanism.association_lines(fake)[0]
    assert "`soft` gate.sru.margin_share: rho 1, p = 0.001, q = 0.002, 5 runs" in text and "`binary`" not in text


def test_mechanism_section_tables_and_figures(data):
    section = mechanism.mechanism_section(data)
    assert list(section.tables["flip_coupling.csv"].columns) == ["variant", "layer", "rho", "p_value", "q_value",
                                                                 "n_runs"]
    assert {"gate_scale_free.csv", "perturbation_sensitivity.csv", "gate_association.csv"} <= set(section.tables)
    assert len(section.figures) == 2  # flip scatter and the sensitivity curves
    info = mechanism.get_sensitivity_info(section.tables["perturbation_sensitivity.csv"], data.runs.variants)
    assert info.variants == ["none", "binary", "soft"] and info.eps["binary"] == list(EPS)
    assert info.colors["none"] == "#7f7f7f"  # the baseline's colour from ablate.ui.palette
    assert info.median["binary"][0] > info.median["binary"][-1]  # falls with eps like eps^-0.5


def test_flip_scatter_info_uses_residuals_and_palette(data):
    from analysis.report.flip_scatter import get_flip_scatter_info, get_flip_scatter_plot

    info = get_flip_scatter_info(data)
    assert info.points["flip_resid"].notna().all() and set(info.points["variant"]) == {"soft", "binary"}
    fig = get_flip_scatter_plot(info)
    assert {t.name for t in fig.data} == {"soft", "binary"}
    assert {t.marker.color for t in fig.data} == {info.colors["soft"], info.colors["binary"]}


def test_binary_threshold_other_than_half_is_stated(data):
    params = data.runs.params.assign(**{"scconv.gate_threshold": "0.5"})
    params.loc[data.runs.runs["variant"] == "binary", "scconv.gate_threshold"] = "0.6"
    runs = data.runs.__class__(**{**data.runs.__dict__, "params": params})
    lines = mechanism.gate_mode_lines(data.__class__(**{**data.__dict__, "runs": runs}))
    binary = next(line for line in lines if line.startswith("`binary`"))
    assert "`binary` has threshold t = 0.6, not 0.5" in binary and "logit(t) / w" in binary
    assert "t = " not in next(line for line in lines if line.startswith("`soft`")).split("(`sens/slope`")[1]


def test_variants_sharing_a_gate_mode_get_one_sentence(data):
    params = data.runs.params.assign(**{"scconv.gate_mode": "binary"})
    runs = data.runs.__class__(**{**data.runs.__dict__, "params": params})
    lines = mechanism.gate_mode_lines(data.__class__(**{**data.__dict__, "runs": runs}))
    assert len(lines) == 1 and lines[0].startswith("`binary`, `soft` use gate mode `binary`")  # variants in report order
    assert "`soft` median 0.05" in lines[0] and "`binary` median 0," in lines[0]


def test_sensitivity_lines_say_when_too_few_runs_can_reach_alpha():
    small = _data(seeds=3, variants=("none", "binary"))
    sens = mechanism.sensitivity_table(small.runs.history, small.runs.runs, "none", small.runs.variants)
    binary = next(line for line in mechanism.sensitivity_lines(sens, "none") if line.startswith("`binary`"))
    assert "reads as the hard-gate" in binary and "not different at q <= 0.05 from `none`" in binary
    assert "with 3 vs 3 runs the smallest attainable p is 0.1" in binary


def test_runs_without_gates_or_sensitivities_have_no_mechanism_section():
    history = pd.DataFrame([(r, e, "val_loss", 1.0 / (e + 1)) for r in ("a", "b") for e in range(12)],
                           columns=["run_id", "epoch", "metric", "value"])
    runs = pd.DataFrame({"variant": ["none", "none"], "seed": [0, 1]}, index=pd.Index(["a", "b"], name="run_id"))
    rs = RunSet("plain", "0", runs, pd.DataFrame(index=runs.index), history, baseline="none")
    gate_df = gates.gate_frame(history, runs)
    points = gates.flip_points(gate_df, history)
    data = ReportData(runs=rs, from_epoch=0, run_metrics=runs.reset_index(), comparisons=pd.DataFrame(),
                      gates=gate_df, layer_stats=pd.DataFrame(), flip_points=points,
                      flip_coupling=gates.flip_coupling(points), gate_association=pd.DataFrame(), churn=pd.DataFrame())
    section = mechanism.mechanism_section(data)
    assert section.lines == [] and section.tables == {} and section.figures == []


def test_gate_heatmaps_cover_the_scale_free_statistics_with_a_note(data):
    from analysis.report.gate_heatmap import get_gate_heatmap_info, get_gate_heatmap_plot

    info = get_gate_heatmap_info(data, "sru", "perturb_flip_share")
    assert info.variants == ["binary", "soft"] and info.layers == ["layer1.0.conv2", "layer2.0.conv2"]
    assert info.z["soft"][0][0] == pytest.approx(0.001) and "scale-free" in info.note
    assert "epoch 0: since the probe before training" in get_gate_heatmap_info(data, "sru", "flip_share").note
    assert get_gate_heatmap_info(data, "sru", "near_threshold_share") is None  # logged, but not a report statistic
    assert "scale-free" in get_gate_heatmap_plot(info).layout.title.text


def test_sensitivity_with_zeros_or_a_single_baseline_run():
    rows = [(f"{v}{s}", e, sens_metric("loss", 1e-4), 0.0 if v == "none" else 0.01 * (s + 1))
            for v in ("none", "binary") for s in range(3) for e in range(2)]
    history = pd.DataFrame(rows, columns=["run_id", "epoch", "metric", "value"])
    runs = pd.DataFrame({"variant": [r[0][:-1] for r in rows[::2]]}, index=pd.Index([r[0] for r in rows[::2]]))
    sens = mechanism.sensitivity_table(history, runs, "none", ["none", "binary"]).set_index("variant")
    # a zero baseline median has no ratio; the test runs on raw values since log(0) is undefined
    assert np.isnan(sens.loc["binary", "vs_baseline"]) and sens.loc["binary", "p_value"] == pytest.approx(0.1)
    one = mechanism.sensitivity_table(history[~history["run_id"].isin(["none1", "none2"])], runs, "none",
                                      ["none", "binary"]).set_index("variant")
    assert np.isnan(one.loc["binary", "p_value"]) and np.isnan(one.loc["binary", "q_value"])
