"""analysis.runs: MLflow runs -> tidy frames, variant grouping, baseline choice.

``log_study`` builds synthetic tracked runs (the docs/tracking.md layout) directly with MlflowClient;
test_gates.py and test_report.py import it from here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ablate.config import ConfigError, RunConfig

LAYERS = ("layer1.0.conv2", "layer2.0.conv2")
#: layer2's flip share goes with each epoch's |delta val loss|; layer1's is noise.
COUPLED_LAYER = "layer2.0.conv2"


def _curves(rng: np.random.Generator, epochs: int, noise: float) -> dict[str, np.ndarray]:
    e = np.arange(epochs)
    # a gentle trend, so the LOWESS residual is the added noise rather than trend misfit
    train = 1.2 * np.exp(-e / 30.0) + 0.1 + rng.normal(0, 0.004, epochs)
    val = 1.2 * np.exp(-e / 30.0) + 0.3 + rng.normal(0, noise, epochs)
    acc = np.clip(1.0 - val / 2.5, 0, 1)
    return {"train_loss": train, "val_loss": val, "val_acc": acc, "train_acc": np.clip(1.0 - train / 2.5, 0, 1),
            "lr": np.full(epochs, 0.05)}


def _gate_curves(rng: np.random.Generator, val: np.ndarray, order: str) -> dict[str, np.ndarray]:
    epochs = len(val)
    out: dict[str, np.ndarray] = {}
    jumps = np.abs(np.diff(val, prepend=val[0]))
    for layer in LAYERS if "sru" in order else ():
        flip = 0.02 + rng.uniform(0.0, 0.01, epochs)
        if layer == COUPLED_LAYER:
            flip = flip + 0.5 * jumps  # the flip share of epoch e goes with |val_loss[e] - val_loss[e-1]|
        out[f"sru/{layer}/flip_share"] = flip
        out[f"sru/{layer}/informative_share"] = 0.5 + rng.normal(0, 0.01, epochs)
        out[f"sru/{layer}/near_threshold_share"] = 0.1 + rng.normal(0, 0.01, epochs)
        out[f"sru/{layer}/gamma_drift"] = np.linspace(0.0, 0.02, epochs)
        out[f"sru/{layer}/gamma_sum"] = np.linspace(16.0, 15.0, epochs)
    for layer in LAYERS if "cru" in order else ():
        out[f"cru/{layer}/beta_mean"] = 0.5 + rng.normal(0, 0.01, epochs)
        out[f"cru/{layer}/beta_entropy"] = np.log(2) - np.linspace(0, 0.1, epochs)
    return out


def _predictions(rng: np.random.Generator, epochs: int, n: int, noise: float, path: Path) -> Path:
    target = rng.integers(0, 10, n)
    wrong = rng.random((epochs, n)) < (0.1 + 4 * noise)
    pred = np.where(wrong, (target[None, :] + 1) % 10, target[None, :]).astype(np.int16)
    loss = np.where(wrong, 2.0, 0.1 + np.abs(rng.normal(0, noise, (epochs, n)))).astype(np.float16)
    np.savez(path, pred=pred, loss=loss, target=target)
    return path


def log_run(client, experiment_id: str, params: dict, metrics: dict[str, np.ndarray], tags: dict | None = None,
            artifacts: list[Path] = (), status: str = "FINISHED", run_name: str | None = None) -> str:
    """One run with params, per-epoch metrics (step = epoch), root artifacts and a final status."""
    from mlflow.entities import Metric, Param

    run = client.create_run(experiment_id, run_name=run_name, tags=tags or {})
    run_id = run.info.run_id
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])
    points = [Metric(k, float(v), 1000 + step, step) for k, vals in metrics.items() for step, v in enumerate(vals)]
    for i in range(0, len(points), 1000):
        client.log_batch(run_id, metrics=points[i:i + 1000])
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status=status)
    return run_id


def log_study(tracking_uri: str, name: str = "synthetic", noise: dict[str, float] | None = None, seeds: int = 3,
              epochs: int = 12, predictions: bool = True, parent: bool = True, gate_artifact: bool = False) -> str:
    """An experiment of ablate-like runs: one variant per ``noise`` key (scconv.order), ``seeds`` seeds each.

    Val loss noise SD per variant comes from ``noise``; SRU variants log gate metrics for two layers, as
    per-layer metrics, or with ``gate_artifact`` as ablate logs them by default: the ``gate_stats.csv``
    artifact, with per-eps sensitivities as ``history.csv`` columns only; each run logs val_predictions.npz
    when ``predictions``; ``parent`` adds a study parent run. Returns the experiment id.
    """
    from mlflow import MlflowClient

    noise = noise or {"none": 0.01, "sru": 0.01, "sru_cru": 0.06}
    client = MlflowClient(tracking_uri)
    root = Path(os.environ["SCCONV_ARTIFACT_ROOT"])
    exp_id = client.create_experiment(name, artifact_location=(root / name).resolve().as_uri())
    tmp = root.parent / f"tmp-{name}"
    tmp.mkdir(parents=True, exist_ok=True)
    if parent:
        log_run(client, exp_id, {"study": name}, {}, tags={"ablate.role": "study"}, run_name=name)
    for v, (order, sd) in enumerate(noise.items()):
        for seed in range(seeds):
            rng = np.random.default_rng(100 * v + seed)
            cfg = RunConfig.from_dict({"scconv.order": order, "seed": seed, "epochs": epochs,
                                       "run_name": f"{order}-s{seed}", "experiment": name})
            metrics = _curves(rng, epochs, sd)
            gate_metrics = _gate_curves(rng, metrics["val_loss"], order)
            files = []
            if gate_artifact:
                files += _gate_artifacts(metrics, gate_metrics, tmp)
            else:
                metrics.update(gate_metrics)
            if predictions:
                files.append(_predictions(rng, epochs, 40, sd, tmp / "val_predictions.npz"))
            log_run(client, exp_id, cfg.resolved().to_params(), metrics,
                    tags={"ablate.role": "run", "ablate.variant": cfg.label()}, artifacts=files,
                    run_name=f"{order}-s{seed}")
    return exp_id


SENS_COLUMN = "sens/out/eps_1e-02"


def _gate_artifacts(metrics: dict[str, np.ndarray], gate_metrics: dict[str, np.ndarray], tmp: Path) -> list[Path]:
    """``gate_stats.csv`` (long form, ablate's column order) and ``history.csv`` with a sensitivity column that is
    no metric, as a run with the default ``gate_metrics_per_layer = false`` keeps them."""
    from ablate.names import GATE_STATS_COLUMNS, GateKey

    rows = [(epoch, key.kind, key.layer, key.stat, float(v)) for name, values in gate_metrics.items()
            for key in [GateKey.parse(name)] for epoch, v in enumerate(values)]
    pd.DataFrame(rows, columns=list(GATE_STATS_COLUMNS)).to_csv(tmp / "gate_stats.csv", index=False)
    epochs = len(metrics["val_loss"])
    history = pd.DataFrame({"epoch": range(epochs), **metrics, SENS_COLUMN: np.linspace(1.0, 2.0, epochs)})
    history.to_csv(tmp / "history.csv", index=False)
    return [tmp / "gate_stats.csv", tmp / "history.csv"]


# -- tests ---------------------------------------------------------------------------------------


@pytest.fixture
def client(store):
    from analysis.runs import make_client

    log_study(store)
    return make_client(store)


def test_load_runs_frames(client):
    from analysis.runs import assign_variants, load_runs

    rs = assign_variants(load_runs(client, "synthetic"))
    assert len(rs.runs) == 9  # the study parent run has no loss history and is skipped
    assert [s[2] for s in rs.skipped] == ["ablate.role=study"]
    assert list(rs.history.columns) == ["run_id", "epoch", "metric", "value"]
    counts = rs.history.groupby(["run_id", "metric"]).size()
    assert (counts == 12).all()
    wide = rs.wide_history(["val_loss", "train_loss"])
    assert list(wide.columns[:4]) == ["run_id", "variant", "seed", "epoch"]
    assert len(wide) == 9 * 12 and wide["val_loss"].notna().all()
    one = rs.run_history(rs.runs.index[0])
    assert list(one["epoch"]) == list(range(12)) and {"val_loss", "train_loss", "val_acc"} <= set(one.columns)
    assert rs.params.loc[rs.runs.index[0], "seed"] in {"0", "1", "2"}


def test_history_values_round_trip(client):
    from analysis.runs import assign_variants, load_runs

    rs = assign_variants(load_runs(client, "synthetic"))
    rid = rs.runs.index[rs.runs["variant"] == "sru_cru"][0]
    direct = [m.value for m in sorted(client.get_metric_history(rid, "val_loss"), key=lambda m: m.step)]
    np.testing.assert_allclose(rs.run_history(rid)["val_loss"].to_numpy(), direct)


def test_default_groups_labels_and_baseline(client):
    from analysis.runs import assign_variants, load_runs

    rs = assign_variants(load_runs(client, "synthetic"))
    # run_name and seed vary too, and gate_mode/attention are constant: only the order groups the runs
    assert rs.group_by == ("scconv.order",)
    assert rs.baseline == "none"
    assert rs.variants == ["none", "sru", "sru_cru"]
    assert rs.runs.groupby("variant").size().to_dict() == {"none": 3, "sru": 3, "sru_cru": 3}


def test_group_by_and_baseline_options(client):
    from analysis.runs import assign_variants, load_runs

    rs = assign_variants(load_runs(client, "synthetic"), group_by=["scconv.order", "scconv.gate_mode"],
                         baseline="sru,binary")
    assert set(rs.runs["variant"]) == {"none,binary", "sru,binary", "sru_cru,binary"}
    assert rs.variants[0] == "sru,binary"
    with pytest.raises(ConfigError, match="variants: none, sru, sru_cru"):
        assign_variants(load_runs(client, "synthetic"), baseline="nope")
    with pytest.raises(ConfigError, match="not a param"):
        assign_variants(load_runs(client, "synthetic"), group_by=["nope"])


def test_bad_experiment_lists_names(client):
    from analysis.runs import load_runs

    with pytest.raises(ConfigError, match="existing experiments: .*synthetic"):
        load_runs(client, "missing")


def test_runs_without_losses_are_an_error(store):
    from mlflow import MlflowClient

    from analysis.runs import load_runs, make_client

    raw = MlflowClient(store)
    exp = raw.create_experiment("empty", artifact_location=Path(os.environ["SCCONV_ARTIFACT_ROOT"]).as_uri())
    log_run(raw, exp, {"seed": 0}, {"val_loss": np.ones(3)})  # no train_loss
    log_run(raw, exp, {"seed": 1}, {"val_loss": np.ones(3), "train_loss": np.ones(3)}, status="FAILED")
    with pytest.raises(ConfigError, match="no FINISHED run with train_loss and val_loss histories .1 finished runs"):
        load_runs(make_client(store), "empty")


def test_missing_sqlite_store_is_not_created(tmp_path):
    from analysis.runs import make_client

    uri = f"sqlite:///{tmp_path / 'absent.db'}"
    with pytest.raises(ConfigError, match="does not exist"):
        make_client(uri)
    assert not (tmp_path / "absent.db").exists()


def _params(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, index=[f"r{i}" for i in range(len(rows))], dtype=object)


def test_grouping_rule_drops_determined_and_seed_bound_params():
    from analysis.runs import default_group_by

    rows = [{"scconv.order": o, "scconv.preset": p, "scconv.gate_mode": {"paper": "binary"}.get(p, "reference"),
             "seed": str(s), "tag_name": f"{o}{p}{s}", "lr": "0.05"}
            for o in ("none", "sru") for p in ("paper", "reference") for s in range(3)]
    # gate_mode follows preset; tag_name changes with the seed; lr is constant
    assert default_group_by(_params(rows)) == ("scconv.order", "scconv.preset")


def test_grouping_rule_one_run_per_variant_keeps_the_design_param():
    from analysis.runs import default_group_by

    # Every run its own seed and name (no replicates): the order still defines the variants.
    rows = [{"scconv.order": o, "seed": str(i), "run_name": f"{o}-{i}"} for i, o in enumerate(("none", "sru", "cru"))]
    assert default_group_by(_params(rows)) == ("scconv.order",)


def test_foreign_runs_without_params_form_one_variant(store):
    from mlflow import MlflowClient

    from analysis.runs import assign_variants, load_runs, make_client

    raw = MlflowClient(store)
    exp = raw.create_experiment("foreign", artifact_location=Path(os.environ["SCCONV_ARTIFACT_ROOT"]).as_uri())
    for seed in range(2):
        log_run(raw, exp, {"seed": seed}, {"val_loss": np.linspace(1, 0.5, 6), "train_loss": np.linspace(1, 0.2, 6)})
    rs = assign_variants(load_runs(make_client(store), "foreign"))
    assert rs.group_by == () and rs.variants == ["all"] and rs.baseline == "all"


def test_gate_statistics_and_sensitivities_kept_as_artifacts_read_back_as_metrics(store):
    """Both ways a run keeps per-layer gate statistics (metrics, or the default gate_stats.csv) give the same
    history; history.csv columns that are no metric (the per-eps sensitivities) join it too."""
    from analysis.runs import load_runs, make_client

    log_study(store, "as_metrics", seeds=1, predictions=False)
    log_study(store, "as_artifact", seeds=1, predictions=False, gate_artifact=True)
    client = make_client(store)
    frames = {}
    for name in ("as_metrics", "as_artifact"):
        rs = load_runs(client, name)
        h = rs.history.join(rs.runs["run_name"], on="run_id")
        frames[name] = h.drop(columns="run_id").sort_values(["run_name", "metric", "epoch"]).reset_index(drop=True)
    gate = frames["as_artifact"]["metric"].str.match(r"^(sru|cru)/")
    assert gate.sum() == 12 * (5 * 2 * 2 + 2 * 2)  # sru: 5 stats x 2 layers x 2 variants; cru: 2 x 2 x 1
    sens = frames["as_artifact"]["metric"] == SENS_COLUMN
    assert sens.sum() == 3 * 12 and SENS_COLUMN not in set(frames["as_metrics"]["metric"])
    pd.testing.assert_frame_equal(frames["as_artifact"][~sens].reset_index(drop=True), frames["as_metrics"],
                                  check_exact=False, rtol=1e-12)
    without = load_runs(client, "as_artifact", artifacts=False).history
    assert not without["metric"].str.match(r"^(sru|cru)/").any()


def test_gate_statistics_logged_as_metrics_are_not_read_twice(store, tmp_path):
    """A run that logged per-layer gate metrics and also has gate_stats.csv keeps one point per epoch and key."""
    from mlflow import MlflowClient

    from analysis.runs import load_runs, make_client

    log_study(store, "both", seeds=1, predictions=False)
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("both").experiment_id
    run = client.search_runs([exp], "params.`scconv.order` = 'sru'")[0]
    pd.DataFrame([(0, "sru", "layer1.0.conv2", "flip_share", 99.0)], columns=["epoch", "kind", "layer", "stat",
                                                                              "value"]).to_csv(tmp_path / "gate_stats.csv", index=False)
    client.log_artifact(run.info.run_id, str(tmp_path / "gate_stats.csv"))
    h = load_runs(make_client(store), "both").history
    mine = h[(h["run_id"] == run.info.run_id) & (h["metric"] == "sru/layer1.0.conv2/flip_share")]
    assert len(mine) == 12 and 99.0 not in set(mine["value"])



def test_a_trained_runs_per_layer_gates_and_sensitivities_come_back_from_its_artifacts(store):
    """What ablate keeps out of the metrics by default (per-layer gate statistics, per-eps sensitivities) is in
    the history load_runs gives analysis, under the names analysis.gates and the report read."""
    from ablate.names import SENS_KINDS, GateKey, sens_metric
    from ablate.train import run_training
    from ablate.train.probes import SENS_EPS
    from analysis.runs import load_runs, make_client

    cfg = RunConfig.from_dict({"scconv.order": "sru_cru", "epochs": 2, "image_size": 16, "batch_size": 32,
                               "max_steps_per_epoch": 2, "probe_size": 16, "experiment": "trained",
                               "log_checkpoint": False})
    result = run_training(cfg, tracking_uri=store, progress=False)
    history = load_runs(make_client(store), "trained").history
    names = set(history["metric"])
    assert {sens_metric(kind, eps) for kind in SENS_KINDS for eps in SENS_EPS} <= names
    keys = {GateKey.parse(n) for n in names} - {None}
    assert {k.stat for k in keys if k.kind == "sru"} >= {"flip_share", "gamma_drift", "margin_share"}
    assert GateKey("cru", "layer1.0.conv2", "beta_entropy") in keys
    one = history[history["metric"] == "sru/layer1.0.conv2/flip_share"]
    assert sorted(one["epoch"]) == [0, 1] and set(one["run_id"]) == {result.run_id}
