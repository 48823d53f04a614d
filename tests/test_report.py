"""analysis.report and `analysis report`: tables, figure infos, files, honest p-values, MLflow logging, bad input."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from test_runs import COUPLED_LAYER, log_study

from analysis import fluctuation, gates, stats


@pytest.fixture
def study(store):
    """3 variants x 3 seeds, 12 epochs; sru_cru is the noisy one; a study parent run."""
    log_study(store)
    return store


def _data(uri, **kw):
    from analysis.report import build_report_data
    from analysis.runs import make_client

    return build_report_data(make_client(uri), "synthetic", **kw)


def test_tables_and_comparisons(study):
    data = _data(study)
    assert len(data.run_metrics) == 9
    assert {"run_id", "variant", "seed", "val_loss.resid_sd", "churn.flip_rate_mean",
            "gate.sru.flip_share"} <= set(data.run_metrics.columns)
    assert list(data.comparisons.columns) == list(stats.RESULT_COLUMNS)
    primary = data.comparisons[data.comparisons["metric"] == "val_loss.resid_sd"].set_index("variant")
    assert primary.loc["sru_cru", "ratio"] > 1.5 and primary.loc["sru_cru", "ratio"] > primary.loc["sru", "ratio"]
    assert (primary["n_variant"] == 3).all() and (primary["baseline"] == "none").all()
    assert not any(c.startswith("gate.") for c in data.comparisons["metric"])  # gates are explained, not compared
    # the window leaves too few epoch pairs to detrend; over all 11 pairs the coupled layer is the one found
    assert data.flip_coupling["p_value"].isna().all()
    coupling = gates.flip_coupling(gates.flip_points(data.gates, data.runs.history))
    best = coupling.loc[coupling.groupby("variant")["p_value"].idxmin()]
    assert best["layer"].eq(COUPLED_LAYER).all() and (best["rho"] > 0).all()
    assert len(data.churn) == 9 and set(data.churn["kind"]) <= {"confidence", "predictions", "undetermined"}


def test_figure_infos(study):
    from analysis import report

    data = _data(study)
    curves = report.get_loss_curves_info(data)
    assert curves.variants == ["none", "sru", "sru_cru"]
    assert [len(curves.runs[v]) for v in curves.variants] == [3, 3, 3]
    assert all(len(r["val_loss"]) == 12 for r in curves.runs["sru"])
    from ablate.ui.palette import variant_color

    assert curves.colors == {v: variant_color(v, curves.variants) for v in curves.variants}
    band = curves.bands["sru_cru"]["val_loss"]
    seeds = pd.DataFrame({r["seed"]: r["val_loss"] for r in curves.runs["sru_cru"]})
    assert list(band["epoch"]) == list(range(12)) and (band["n"] == 3).all()
    assert band["mean"].to_numpy() == pytest.approx(seeds.mean(axis=1).to_numpy())
    assert (band["low"] < band["mean"]).all() and (band["mean"] < band["high"]).all()
    heat = report.get_gate_heatmap_info(data, "sru", "flip_share")
    assert heat.variants == ["sru", "sru_cru"] and heat.layers == ["layer1.0.conv2", "layer2.0.conv2"]
    assert heat.epochs == list(range(12)) and len(heat.z["sru"]) == 2 and len(heat.z["sru"][0]) == 12
    assert report.get_gate_heatmap_info(data, "cru", "beta_entropy").variants == ["sru_cru"]
    assert report.get_gate_heatmap_info(data, "sru", "not_a_stat") is None
    fl = report.get_fluctuation_info(data)
    assert fl.metrics[0] == "val_loss.resid_sd" and set(fl.ratios["variant"]) == {"sru", "sru_cru"}
    points = data.flip_points
    # flips are related to val-loss moves inside the report's window (the first move is epoch 1)
    assert set(points["variant"]) == {"sru", "sru_cru"} and points["epoch"].min() == max(data.from_epoch, 1)
    # the scatter draws detrended points only: the window leaves too few epoch pairs to detrend here
    assert report.get_flip_scatter_info(data).points.empty


def test_summary_opens_with_findings_and_says_too_few_runs(study):
    from analysis.report import summary_markdown

    text = summary_markdown(_data(study))
    assert text.splitlines()[2] == "## Findings"
    findings = text[:text.index("## What was compared")]
    line = next(l for l in findings.splitlines() if l.startswith("- `sru_cru` vs `none`"))
    # 3 vs 3 runs cannot reach p < 0.05 two-sided: no CI, and the report says why and how many seeds it needs
    assert f"too few runs (n=3, need {stats.min_seeds_for(0.05)})" in line and "95% CI" not in line
    assert "smallest attainable p is 0.1" in line
    assert "near_threshold" not in text and "Window: epochs >=" in text and "by the window rule" in text
    assert "| val_loss.resid_sd p |" in text  # tested: p and q of the primary metric in the key table


def test_five_seeds_give_a_supported_finding_with_q_and_ci(store):
    """5 seeds per arm, sru_cru 6x noisier: a supported effect with its CI and q; sru (same noise) not supported."""
    from analysis.report import summary_markdown

    log_study(store, seeds=5, predictions=False)
    data = _data(store)
    text = summary_markdown(data)
    supported = text[text.index("### Supported effects"):text.index("### Tested and not supported")]
    assert supported.count("\n- ") == 1 and "`sru_cru` vs `none`" in supported
    assert re.search(r"95% CI \d\S* to \d", supported) and re.search(r"q = 0\.0\d", supported)
    assert "fluctuates more than the baseline" in supported and "BH over the 2 primary comparisons" in supported
    rest = text[text.index("### Tested and not supported"):text.index("## What was compared")]
    assert "`sru` vs `none`" in rest and "no difference supported" in rest
    # an unsupported effect still says what it rules out: the ends of its CI
    sru = data.comparisons.set_index(["metric", "variant"]).loc[("val_loss.resid_sd", "sru")]
    assert sru["ci_low"] < 1.0 < sru["ci_high"]
    assert f"rules out more than x{sru['ci_high']:.3g} and less than x{sru['ci_low']:.3g}" in rest
    row = data.comparisons.set_index(["metric", "variant"]).loc[("val_loss.resid_sd", "sru_cru")]
    assert row["ci_low"] > 1.0 and row["q_value"] <= 0.05
    page = __import__("analysis.report", fromlist=["index_html"]).index_html(data)
    assert page.index("<h2>Findings</h2>") < page.index("<h2>What was compared</h2>") < page.index("<h2>Key table</h2>")


def test_from_epoch_overrides_the_window_rule(study):
    data = _data(study, from_epoch=1)
    assert data.from_epoch == 1 and not data.window_rule
    from analysis.report.findings import window_line

    assert window_line(data) == "Window: epochs >= 1, set by --from-epoch."


def test_one_run_per_variant_prints_no_p_value(store):
    from analysis.report import summary_markdown

    log_study(store, seeds=1, predictions=False)
    data = _data(store)
    assert data.comparisons["p_value"].isna().all()
    text = summary_markdown(data)
    assert not re.search(r"\bp = ", text) and not re.search(r"\| \S+ [pq] \|", text) and "q =" not in text
    assert f"too few runs (n=1, need {stats.min_seeds_for(0.05)})" in text and "no test is possible" in text


def test_cli_writes_files_and_logs_to_parent(study, tmp_path, capsys):
    from mlflow import MlflowClient

    from analysis.cli import main

    out = tmp_path / "rep"
    assert main(["report", "--experiment", "synthetic", "--tracking-uri", study, "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == str((out / "index.html").resolve())
    for name in ("index.html", "summary.md", "comparisons.csv", "run_metrics.csv", "churn.csv", "flip_coupling.csv"):
        assert (out / name).is_file(), name
    page = (out / "index.html").read_text()
    assert not re.search(r"<script[^>]*src=[^>]*cdn", page, re.I)
    assert len(re.findall(r"plotly\.js v\d", page)) == 1  # plotly.js embedded once
    assert list(pd.read_csv(out / "comparisons.csv").columns) == list(stats.RESULT_COLUMNS)
    client = MlflowClient(study)
    exp = client.get_experiment_by_name("synthetic")
    parent = client.search_runs([exp.experiment_id], "tags.`ablate.role` = 'study'")[0]
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/index.html", "report/summary.md", "report/comparisons.csv"} <= logged


def test_report_run_when_there_is_no_parent(store, tmp_path):
    from mlflow import MlflowClient

    from analysis.report import make_report
    from analysis.runs import make_client

    log_study(store, name="solo", parent=False, predictions=False)
    index, run_id = make_report(make_client(store), "solo", tmp_path / "r")
    run = MlflowClient(store).get_run(run_id)
    assert run.data.tags["ablate.role"] == "report" and run.info.status == "FINISHED"
    assert "report/summary.md" in {f.path for f in MlflowClient(store).list_artifacts(run_id, "report")}
    assert index.is_file() and not (tmp_path / "r" / "churn.csv").exists()


@pytest.mark.parametrize("args, expected", [
    (["--experiment", "nope"], "existing experiments: .*synthetic"),
    (["--experiment", "synthetic", "--baseline", "nope"], "variants: none, sru, sru_cru"),
    (["--experiment", "synthetic", "--group-by", "scconv.nope"], "not a param"),
    (["--experiment", "synthetic", "--from-epoch", "50"], "accepted: 0..11"),
])
def test_bad_input_exits_2_and_writes_nothing(study, tmp_path, capsys, args, expected):
    from mlflow import MlflowClient

    from analysis.cli import main

    before = len(MlflowClient(study).search_runs(["0", MlflowClient(study).get_experiment_by_name("synthetic").experiment_id]))
    out = tmp_path / "never"
    assert main(["report", *args, "--tracking-uri", study, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("analysis: error: ") and re.search(expected, err[0])
    assert not out.exists()
    after = len(MlflowClient(study).search_runs(["0", MlflowClient(study).get_experiment_by_name("synthetic").experiment_id]))
    assert after == before


def test_missing_store_exits_2(tmp_path, capsys):
    from analysis.cli import main

    assert main(["report", "--experiment", "x", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}",
                 "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()


def test_unwritable_out_exits_2_before_reading_runs(study, tmp_path, capsys):
    from analysis.cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["report", "--experiment", "synthetic", "--tracking-uri", study, "--out", str(blocker / "rep")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("analysis: error: --out=") and "accepted:" in err[0]
    assert blocker.read_text() == "x" and not (tmp_path / "reports").exists()
