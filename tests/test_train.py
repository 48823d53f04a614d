"""One tracked training run: curves, gate probes, artifacts, statuses, determinism and resume."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from ablate.cli import main
from ablate.config import RunConfig
from ablate.names import SENS_KINDS, SENS_SLOPE_METRIC, sens_metric
from ablate.train import run_training
from ablate.train.probes import SENS_EPS

# Tiny but real: the embedded digits at 16x16, three steps an epoch.
FAST = {"dataset": "digits", "backbone": "resnet20", "image_size": 16, "batch_size": 32, "max_steps_per_epoch": 3,
        "probe_size": 16, "experiment": "t"}


def _cfg(**kw) -> RunConfig:
    return RunConfig.from_dict({**FAST, **kw})


def _history(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_run_logs_curves_gates_and_artifacts(tracking_uri, tmp_path):
    result = run_training(_cfg(**{"scconv.order": "sru_cru", "epochs": 2}), tracking_uri=tracking_uri, progress=False)
    client = MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "val_loss", "train_acc", "val_acc", "lr", "epoch_seconds", "peak_memory_mb"):
        steps = [m.step for m in client.get_metric_history(result.run_id, key)]
        assert sorted(steps) == [0, 1], key
    assert run.data.params["scconv.order"] == "sru_cru"
    assert run.data.params["scconv.gate_mode"] == "binary"  # the resolved preset value is what gets recorded
    assert run.data.tags["ablate.variant"] == "resnet20/sru_cru"
    assert run.data.tags["ablate.device"].startswith("cpu")
    assert "ablate.git_commit" in run.data.tags
    sru_keys = [k for k in run.data.metrics if k.startswith("sru/layer3.2.conv2/")]
    assert {k.rsplit("/", 1)[1] for k in sru_keys} == {
        "informative_share", "near_threshold_share", "margin_share", "flip_share", "perturb_flip_share", "gamma_min",
        "gamma_max", "gamma_sum", "gamma_negative", "gamma_drift"}
    assert {"cru/layer1.0.conv2/beta_mean", "cru/layer1.0.conv2/beta_entropy"} <= set(run.data.metrics)
    share = run.data.metrics["sru/layer1.0.conv2/informative_share"]
    assert 0.0 <= share <= 1.0

    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.json", "history.csv", "val_predictions.npz", "gate_stats.csv", "checkpoint"} <= names
    local = client.download_artifacts(result.run_id, "val_predictions.npz", str(tmp_path))
    preds = np.load(local)
    assert preds["pred"].shape == (2, 360) and preds["loss"].shape == (2, 360) and preds["target"].shape == (360,)
    assert preds["loss"].dtype == np.float16
    hist = pd.read_csv(client.download_artifacts(result.run_id, "history.csv", str(tmp_path)))
    assert list(hist["epoch"]) == [0, 1]
    np.testing.assert_allclose(hist["val_loss"], _history(client, result.run_id, "val_loss"))
    gates = pd.read_csv(client.download_artifacts(result.run_id, "gate_stats.csv", str(tmp_path)))
    assert set(gates["kind"]) == {"sru", "cru"} and set(gates["epoch"]) == {0, 1}
    assert {"margin_share", "perturb_flip_share"} <= set(gates["stat"])
    sens = [sens_metric(kind, eps) for kind in SENS_KINDS for eps in SENS_EPS] + [SENS_SLOPE_METRIC]
    for key in sens:  # network-level: a metric per epoch and a history column
        assert sorted(m.step for m in client.get_metric_history(result.run_id, key)) == [0, 1], key
        assert np.isfinite(hist[key]).all(), key


def test_binary_gate_leaves_gamma_untrained_and_soft_trains_it(tracking_uri):
    """The paper's binary gate passes no gradient to gamma: its drift stays exactly 0 (the soft gate's does not)."""
    client = MlflowClient(tracking_uri)
    drift = {}
    for mode in ("binary", "soft"):
        r = run_training(_cfg(**{"scconv.order": "sru", "scconv.gate_mode": mode, "epochs": 1}),
                         tracking_uri=tracking_uri, progress=False)
        drift[mode] = client.get_run(r.run_id).data.metrics["sru/layer2.1.conv2/gamma_drift"]
    assert drift["binary"] == 0.0
    assert drift["soft"] > 0.0


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
    flips = _history(client, resumed.run_id, "sru/layer3.2.conv2/flip_share")
    assert flips == pytest.approx(_history(client, full.run_id, "sru/layer3.2.conv2/flip_share"))


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
