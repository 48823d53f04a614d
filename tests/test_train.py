"""One tracked training run: curves, gate probes, artifacts, statuses, determinism and resume."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from ablate.cli import main
from ablate.config import RunConfig
from ablate.names import SENS_KINDS, SENS_SLOPE_METRIC, SUMMARY_METRICS, sens_metric
from ablate.train import run_training
from ablate.train.runner import summary_metrics
from ablate.train.probes import SENS_EPS

# Tiny but real: the embedded digits at 16x16, three steps an epoch.
FAST = {"dataset": "digits", "backbone": "resnet20", "image_size": 16, "batch_size": 32, "max_steps_per_epoch": 3,
        "probe_size": 16, "experiment": "t"}


def _cfg(**kw) -> RunConfig:
    return RunConfig.from_dict({**FAST, **kw})


def _history(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


#: What a binary-gate sru_cru run logs per epoch by default: the curves, the network-level gate means (no gamma
#: statistics: the binary gate passes no gradient to them) and the sensitivity slope; then the summary metrics.
EPOCH_METRICS = {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "peak_memory_mb",
                 SENS_SLOPE_METRIC, "gate.sru.informative_share", "gate.sru.margin_share", "gate.sru.flip_share",
                 "gate.sru.perturb_flip_share", "gate.cru.beta_entropy"}


def test_run_logs_curves_gates_and_artifacts(tracking_uri, tmp_path):
    result = run_training(_cfg(**{"scconv.order": "sru_cru", "epochs": 2}), tracking_uri=tracking_uri, progress=False)
    client = MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        steps = [m.step for m in client.get_metric_history(result.run_id, key)]
        assert sorted(steps) == [0, 1], key
    assert set(run.data.metrics) == EPOCH_METRICS | set(SUMMARY_METRICS)
    assert len(run.data.metrics) <= 20  # what a comparison needs, and few of it (issue 10)
    assert run.data.params["scconv.order"] == "sru_cru"
    assert run.data.params["scconv.gate_mode"] == "binary"  # the resolved preset value is what gets recorded
    assert run.data.tags["ablate.variant"] == "resnet20/sru_cru"
    assert run.data.tags["mlflow.runColor"] == "#2ca02c"  # sru_cru's fixed colour
    assert run.data.tags["mlflow.source.name"] == "ablate train"
    assert run.data.tags["ablate.device"].startswith("cpu")
    assert "ablate.git_commit" in run.data.tags
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val"} and {d.name for d in inputs.values()} == {"digits"}
    assert json.loads(inputs["val"].profile)["num_rows"] == 360

    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.json", "history.csv", "val_predictions.npz", "gate_stats.csv", "gate_heatmap.html",
            "checkpoint", "recompute_plan.json"} <= names
    plan = json.loads(open(client.download_artifacts(result.run_id, "recompute_plan.json", str(tmp_path))).read())
    assert [row["name"] for row in plan["layers"]] == [f"layer{s}.{b}.conv2" for s in (1, 2, 3) for b in range(3)]
    assert plan["layers"][0]["input_shape"] == [32, 16, 16, 16]  # the training batch
    assert plan["recomputed"] == sum(row["recompute"] == "body" for row in plan["layers"])
    assert plan["sru_recomputed"] == sum(row["recompute"] == "sru" for row in plan["layers"])
    assert {row["recompute"] for row in plan["layers"]} <= {"keep", "sru", "body"}
    local = client.download_artifacts(result.run_id, "val_predictions.npz", str(tmp_path))
    preds = np.load(local)
    assert preds["pred"].shape == (2, 360) and preds["loss"].shape == (2, 360) and preds["target"].shape == (360,)
    assert preds["loss"].dtype == np.float16
    hist = pd.read_csv(client.download_artifacts(result.run_id, "history.csv", str(tmp_path)))
    assert list(hist["epoch"]) == [0, 1]
    np.testing.assert_allclose(hist["val_loss"], _history(client, result.run_id, "val_loss"))
    gates = pd.read_csv(client.download_artifacts(result.run_id, "gate_stats.csv", str(tmp_path)))
    assert list(gates.columns) == ["epoch", "kind", "layer", "stat", "value"]
    assert set(gates["kind"]) == {"sru", "cru"} and set(gates["epoch"]) == {0, 1}
    sru_stats = set(gates.loc[(gates["kind"] == "sru") & (gates["layer"] == "layer3.2.conv2"), "stat"])
    assert sru_stats == {"informative_share", "near_threshold_share", "margin_share", "flip_share",
                         "perturb_flip_share", "gamma_min", "gamma_max", "gamma_sum", "gamma_negative", "gamma_drift"}
    assert {"beta_mean", "beta_entropy"} <= set(gates.loc[gates["layer"] == "layer1.0.conv2", "stat"])
    assert gates["value"][gates["stat"] == "informative_share"].between(0.0, 1.0).all()
    for epoch in (0, 1):  # the network-level metric is the mean over layers of the artifact's values
        flips = gates[(gates["epoch"] == epoch) & (gates["stat"] == "flip_share")]["value"]
        assert _history(client, result.run_id, "gate.sru.flip_share")[epoch] == pytest.approx(flips.mean())
    sens = [sens_metric(kind, eps) for kind in SENS_KINDS for eps in SENS_EPS]
    for key in sens:  # the per-eps sensitivities are history columns only, the slope a metric too
        assert key not in run.data.metrics and np.isfinite(hist[key]).all(), key
    assert np.isfinite(hist[SENS_SLOPE_METRIC]).all()

    summary = {k: v for k, v in run.data.metrics.items() if k.startswith("summary.")}
    assert summary["summary.best_val_acc"] == pytest.approx(hist["val_acc"].max())
    assert summary["summary.final_val_acc"] == pytest.approx(hist["val_acc"].iloc[-1])
    assert summary["summary.peak_memory_mb"] == pytest.approx(hist["peak_memory_mb"].max())
    assert summary["summary.step_seconds"] > 0
    assert np.isnan(summary["summary.val_loss_resid_sd"])  # two epochs: too short for a trend
    assert [m.step for m in client.get_metric_history(result.run_id, "summary.best_val_acc")] == [1]


def test_a_fixed_recompute_policy_plans_nothing_and_is_not_a_variant(tracking_uri):
    result = run_training(_cfg(**{"scconv.recompute": "never", "epochs": 1}), tracking_uri=tracking_uri,
                          progress=False)
    client = MlflowClient(tracking_uri)
    assert "recompute_plan.json" not in {a.path for a in client.list_artifacts(result.run_id)}
    assert client.get_run(result.run_id).data.params["scconv.recompute"] == "never"
    from ablate.names import BOOKKEEPING_PARAMS

    assert "scconv.recompute" in BOOKKEEPING_PARAMS  # the report never splits a variant by it


def test_gate_stats_artifact_is_rewritten_after_every_epoch(tracking_uri, tmp_path):
    """A run that dies keeps the per-layer statistics of the epochs it finished: the table is logged each epoch."""
    client = MlflowClient(tracking_uri)
    seen = {}

    def read_gates(epoch, metrics):
        run_id = client.search_runs([client.get_experiment_by_name("t").experiment_id])[0].info.run_id
        local = client.download_artifacts(run_id, "gate_stats.csv", str(tmp_path / str(epoch)))
        seen[epoch] = sorted(set(pd.read_csv(local)["epoch"]))
        assert "gate.sru.flip_share" in metrics and "sens/out/eps_1e-02" in metrics  # on_epoch sees every value

    run_training(_cfg(**{"scconv.order": "sru", "epochs": 2}), tracking_uri=tracking_uri, on_epoch=read_gates,
                 progress=False)
    assert seen == {0: [0], 1: [0, 1]}


def test_summary_metrics_are_the_reports_fluctuation_metrics_from_the_settle_epoch():
    from analysis.fluctuation import run_metrics, settle_epoch

    rng = np.random.default_rng(0)
    epochs = np.arange(20)
    val_loss = 2.0 * np.exp(-epochs / 2.0) + 0.5 + rng.normal(0, 0.05, 20)
    history = [{"val_loss": float(v), "train_loss": float(v) - 0.1, "val_acc": float(a), "peak_memory_mb": m}
               for v, a, m in zip(val_loss, np.linspace(0.2, 0.9, 20), [10.0, 30.0] + [20.0] * 18)]
    summary = summary_metrics(history, milestones=(), step_seconds=0.5)
    frame = pd.DataFrame(history).rename_axis("epoch").reset_index()
    start = settle_epoch(frame)
    assert start is not None and start > 0  # the warm-up is left out, as in the report
    expected = run_metrics(frame, from_epoch=start)
    assert summary["summary.val_loss_resid_sd"] == pytest.approx(expected["val_loss.resid_sd"])
    assert summary["summary.val_loss_spike_count"] == expected["val_loss.spike_count"]
    assert summary["summary.val_loss_resid_sd"] != pytest.approx(run_metrics(frame)["val_loss.resid_sd"])
    assert (summary["summary.best_val_acc"], summary["summary.final_val_acc"]) == pytest.approx((0.9, 0.9))
    assert summary["summary.peak_memory_mb"] == 30.0 and summary["summary.step_seconds"] == 0.5
    assert list(summary) == list(SUMMARY_METRICS)


def test_system_metrics_are_on_by_default_for_the_runs_device_and_off_by_config(tracking_uri, monkeypatch):
    from ablate.ui import system

    calls = []

    def record(run_id, uri, device=None, *, configured=True, **kw):
        calls.append((run_id, device.type, configured))

    monkeypatch.setattr(system, "start_system_metrics", record)
    assert RunConfig().system_metrics is True
    assert RunConfig.from_dict({"system_metrics": "false"}).system_metrics is False
    result = run_training(_cfg(epochs=1, max_steps_per_epoch=1), tracking_uri=tracking_uri, progress=False)
    assert calls == [(result.run_id, "cpu", True)]


def test_binary_gate_leaves_gamma_untrained_and_soft_trains_it(tracking_uri):
    """The paper's binary gate passes no gradient to gamma: its drift stays exactly 0 (the soft gate's does not).
    With gate_metrics_per_layer the per-layer statistics are metrics too; gamma's mean is logged only when it moves."""
    client = MlflowClient(tracking_uri)
    drift, metrics = {}, {}
    for mode in ("binary", "soft"):
        r = run_training(_cfg(**{"scconv.order": "sru", "scconv.gate_mode": mode, "epochs": 1,
                                 "gate_metrics_per_layer": True}), tracking_uri=tracking_uri, progress=False)
        metrics[mode] = client.get_run(r.run_id).data.metrics
        drift[mode] = metrics[mode]["sru/layer2.1.conv2/gamma_drift"]
    assert drift["binary"] == 0.0
    assert drift["soft"] > 0.0
    assert "gate.sru.gamma_drift" not in metrics["binary"] and metrics["soft"]["gate.sru.gamma_drift"] > 0.0
    assert sum(k.startswith("sru/") for k in metrics["binary"]) == 9 * 10  # 9 SRU layers x 10 statistics


def test_same_seed_same_metrics_on_cpu(tracking_uri):
    a = run_training(_cfg(epochs=2, seed=3), tracking_uri=tracking_uri, progress=False)
    b = run_training(_cfg(epochs=2, seed=3), tracking_uri=tracking_uri, progress=False)
    c = run_training(_cfg(epochs=2, seed=4), tracking_uri=tracking_uri, progress=False)
    keys = ("train_loss", "val_loss", "val_acc")
    assert [a.history[-1][k] for k in keys] == [b.history[-1][k] for k in keys]
    assert a.history[-1]["train_loss"] != c.history[-1]["train_loss"]


def test_resume_gives_the_uninterrupted_result(tracking_uri):
    cfg = _cfg(**{"scconv.order": "sru_cru", "epochs": 3, "seed": 1})
    full = run_training(cfg, tracking_uri=tracking_uri, progress=False)

    def stop_after_first(epoch, metrics):
        if epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, tracking_uri=tracking_uri, on_epoch=stop_after_first, progress=False)
    client = MlflowClient(tracking_uri)
    killed = [r for r in client.search_runs([client.get_experiment_by_name("t").experiment_id])
              if r.info.run_id != full.run_id][0]
    assert killed.info.status == "KILLED"

    resumed = run_training(cfg, tracking_uri=tracking_uri, resume_run_id=killed.info.run_id, progress=False)
    assert resumed.run_id == killed.info.run_id and resumed.status == "FINISHED"
    for key in ("train_loss", "val_loss", "val_acc", "train_acc"):
        assert _history(client, resumed.run_id, key) == pytest.approx(_history(client, full.run_id, key), rel=1e-6)
    assert [m.step for m in client.get_metric_history(resumed.run_id, "val_loss")] == [0, 1, 2]
    flips = _history(client, resumed.run_id, "gate.sru.flip_share")
    assert flips == pytest.approx(_history(client, full.run_id, "gate.sru.flip_share"))


def test_nonfinite_loss_fails_the_run_without_raising(tracking_uri):
    result = run_training(_cfg(lr=1e12, epochs=3), tracking_uri=tracking_uri, progress=False)
    assert result.status == "FAILED"
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure"] == "nonfinite_loss"


def test_cli_train_prints_summary(tracking_uri, capsys):
    code = main(["train", "--order", "cru", "--epochs", "1", "--image-size", "16", "--batch-size", "32",
                 "--set", "max_steps_per_epoch=2", "--experiment", "cli", "--quiet", "--tracking-uri", tracking_uri])
    out = capsys.readouterr().out
    assert code == 0
    assert "FINISHED after 1 epochs" in out and "ablate ui" in out


@pytest.mark.parametrize("argv, field", [
    (["--dataset", "cifar100"], "cifar100"),
    (["--set", "scconv.ordr=cru"], "scconv.order"),
    (["--set", "lr=fast"], "lr"),
    (["--alpha", "1.5"], "scconv.alpha"),
    (["--order", "bogus"], "order"),
    (["--backbone", "resnet21"], "resnet20"),
    (["--set", "scconv.recompute=sometimes"], "scconv.recompute"),
])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(tmp_path, capsys, argv, field):
    db = tmp_path / "store" / "mlflow.db"
    code = main(["train", "--data-root", str(tmp_path / "data"), "--tracking-uri", f"sqlite:///{db}", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and field in err
    assert not db.exists() and not (tmp_path / "store").exists()


@pytest.mark.slow
def test_digits_baseline_reaches_90_percent(tracking_uri):
    """The acceptance run: resnet20, order none, 15 epochs on the clean digits (32x32, all 1437 images)."""
    result = run_training(RunConfig.from_dict({"scconv.order": "none", "epochs": 15, "image_size": 32,
                                               "label_noise": 0, "train_size": 1437}),
                          tracking_uri=tracking_uri, progress=False)
    assert result.final["val_acc"] >= 0.90
