"""`ablate study`: each grid cell trained once (also with several workers), crash recovery, failures, pruning,
the MLflow layout and every bad input (exit 2, one line, nothing created).

Trials are tiny (1 epoch of 2 steps on 16 px digits), so a trial takes about a second.
"""

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from ablate import track
from ablate.cli import main
from ablate.names import CELL_ATTR, RUN_ID_ATTR, SUMMARY_METRICS, SURPLUS_ATTR
from ablate.ui import decode_view_tag, variant_color
from ablate.study import (
    StudySettings,
    available,
    cell_key,
    enqueue_missing_cells,
    load_space,
    load_study,
    make_pruner,
    prepare,
    recover_lost_runs,
    run_worker,
)

TINY_SET = ["--set", "epochs=1", "--set", "max_steps_per_epoch=2", "--set", "image_size=16", "--set", "batch_size=32"]
TINY_BASE = 'dataset = "digits"\nbackbone = "resnet20"\nmax_steps_per_epoch = 2\nimage_size = 16\nbatch_size = 32\n'
ORDERS = ["none", "sru", "cru", "sru_cru", "cru_sru", "parallel"]


@contextlib.contextmanager
def one_thread():
    """Train on one thread, restored afterwards: on a shared 2-core box two threads thrash (epochs ~6x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_cli(*args: str, storage: str, tracking: str) -> int:
    return main(["study", *args, "--storage", storage, "--tracking-uri", tracking, "--quiet"])


def write_space(tmp_path: Path, name: str, study: str, base: str, params: str) -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(f"[study]\n{study}\n[base]\n{TINY_BASE}{base}\n[params]\n{params}\n")
    return str(path)


def all_trials(storage: str, name: str):
    return optuna.load_study(study_name=name, storage=track.database_url(storage)).get_trials()


def live(trials):
    """Trials that stand for a cell (not the surplus pops of a worker that found no cell left)."""
    return [t for t in trials if not t.user_attrs.get(SURPLUS_ATTR)]


def runs(tracking: str, experiment: str, role: str = "run"):
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name(experiment)
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`ablate.role` = '{role}'")
    return sorted(found, key=lambda r: int(r.data.tags.get("optuna.trial_number", -1)))


def assert_each_cell_once(storage: str, tracking: str, name: str, cells: list[dict]) -> None:
    """Every cell has exactly one COMPLETE trial and exactly one MLflow run: it was trained once."""
    complete = [t for t in live(all_trials(storage, name)) if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(cell_key(t.params) for t in complete) == sorted(cell_key(c) for c in cells)
    children = runs(tracking, name)
    assert len(children) == len(cells)
    assert {r.info.status for r in children} == {track.FINISHED}


# -- one finished grid, looked at from several sides ---------------------------------------------


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The smoke space (six orders, one seed) with 1 epoch, run once on a fresh store."""
    tmp = tmp_path_factory.mktemp("grid")
    ns = SimpleNamespace(tmp=tmp, tracking=f"sqlite:///{tmp / 'mlflow.db'}", storage=f"sqlite:///{tmp / 'optuna.db'}",
                         artifacts=str(tmp / "artifacts"))
    with pytest.MonkeyPatch.context() as mp, one_thread():
        mp.setenv("MLFLOW_TRACKING_URI", ns.tracking)
        mp.setenv("SCCONV_ARTIFACT_ROOT", ns.artifacts)
        ns.rc = run_cli("--space", "smoke", *TINY_SET, storage=ns.storage, tracking=ns.tracking)
    return ns


@pytest.fixture
def grid_env(grid, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", grid.tracking)
    monkeypatch.setenv("SCCONV_ARTIFACT_ROOT", grid.artifacts)
    return grid


def test_grid_completes_six_distinct_trials(grid):
    assert grid.rc == 0
    trials = all_trials(grid.storage, "smoke")
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6
    assert sorted(t.params["scconv.order"] for t in trials) == sorted(ORDERS)
    assert all(t.user_attrs["epochs_run"] == 1 and 0.0 <= t.value <= 1.0 for t in trials)
    assert_each_cell_once(grid.storage, grid.tracking, "smoke", load_space("smoke").cells())


def test_mlflow_layout_parent_and_nested_children(grid):
    (parent,) = runs(grid.tracking, "smoke", role="study")
    assert parent.info.run_name == "smoke"
    assert parent.info.status == track.FINISHED
    assert parent.data.tags["optuna.study"] == "smoke"
    by_number = {t.number: t for t in all_trials(grid.storage, "smoke")}
    children = runs(grid.tracking, "smoke")
    assert len(children) == 6
    for run in children:
        number = int(run.data.tags["optuna.trial_number"])
        trial = by_number[number]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["optuna.study"] == "smoke"
        assert run.data.tags["optuna.state"] == "COMPLETE"
        assert run.info.run_name == trial.params["scconv.order"]  # <variant>[-seed<k>]: smoke has no seeds
        assert run.data.tags["mlflow.runColor"] == variant_color(trial.params["scconv.order"])
        assert run.data.tags["mlflow.source.name"] == "ablate study"
        assert trial.user_attrs[RUN_ID_ATTR] == run.info.run_id
        assert run.data.params["scconv.order"] == trial.params["scconv.order"]
        assert run.data.params["epochs"] == "1"
        assert run.data.metrics["val_acc"] == pytest.approx(trial.value)


def test_study_is_ready_to_compare_in_mlflows_ui(grid):
    """The saved view and model-training kind on the experiment, its description, the study run's note."""
    client = MlflowClient(grid.tracking)
    exp = client.get_experiment_by_name("smoke")
    _, state = decode_view_tag(exp.tags["mlflow.sharedViewState.ablate-compare"])
    assert state["selectedColumns"] == ["params.`scconv.order`", "metrics.`val_acc`",
                                        *(f"metrics.`{m}`" for m in SUMMARY_METRICS)]
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`val_acc`", False)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "`scconv.order`" in exp.tags["mlflow.note.content"] and "Compare variants" in exp.tags["mlflow.note.content"]
    (parent,) = runs(grid.tracking, "smoke", role="study")
    note = parent.data.tags["mlflow.note.content"]
    assert "analysis report --experiment smoke" in note
    assert f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey=ablate-compare" in note


def test_rerun_of_finished_study_trains_nothing_and_prints_the_table(grid_env, monkeypatch, capsys):
    import ablate.train

    def no_training(*args, **kwargs):
        raise AssertionError("a finished study trained a trial")

    monkeypatch.setattr(ablate.train, "run_training", no_training)
    before = all_trials(grid_env.storage, "smoke")
    assert run_cli("--space", "smoke", *TINY_SET, storage=grid_env.storage, tracking=grid_env.tracking) == 0
    after = all_trials(grid_env.storage, "smoke")
    assert [(t.number, t.state) for t in after] == [(t.number, t.state) for t in before]
    assert len(runs(grid_env.tracking, "smoke")) == 6
    assert len(runs(grid_env.tracking, "smoke", role="study")) == 1
    out = capsys.readouterr().out
    for order in ORDERS:
        assert f" {order} COMPLETE" in " ".join(out.split())
    assert "ablate ui" in out and "analysis report --experiment smoke" in out


def test_rerun_with_other_settings_is_refused(grid_env, capsys):
    args = ["--space", "smoke", "--set", "epochs=2", *TINY_SET[2:]]
    assert run_cli(*args, storage=grid_env.storage, tracking=grid_env.tracking) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "epochs=1" in err and "epochs=2" in err and "--study-name" in err
    assert len(all_trials(grid_env.storage, "smoke")) == 6


def test_status_prints_the_trial_table(grid_env, capsys):
    args = ["status", "--space", "smoke", "--storage", grid_env.storage, "--tracking-uri", grid_env.tracking]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "mlflow_run_id" in out and out.count("COMPLETE") == 6


def test_status_of_a_missing_store_creates_nothing(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert main(["status", "--space", "smoke", "--storage", storage]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


# -- workers -------------------------------------------------------------------------------------


def test_two_workers_on_sqlite_train_each_cell_once(tracking_uri, storage_url):
    assert run_cli("--space", "smoke", *TINY_SET, "--workers", "2", "--heartbeat", "1",
                   storage=storage_url, tracking=tracking_uri) == 0
    assert_each_cell_once(storage_url, tracking_uri, "smoke", load_space("smoke").cells())


@pytest.mark.postgres
def test_two_workers_on_postgresql_train_each_cell_once(tracking_uri):
    url = os.environ.get("SCCONV_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("SCCONV_TEST_POSTGRES_URL is unset (.ci/run starts a PostgreSQL server and sets it)")
    name = f"pg-{uuid.uuid4().hex[:12]}"  # reruns on the same database never collide
    assert run_cli("--space", "smoke", *TINY_SET, "--workers", "2", "--heartbeat", "1",
                   "--study-name", name, storage=url, tracking=tracking_uri) == 0
    assert_each_cell_once(url, tracking_uri, name, load_space("smoke").cells())


def _running_trial_with_run(db: Path) -> str | None:
    """The MLflow run id of a RUNNING trial, read from the Optuna SQLite file without writing to it."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            row = con.execute(
                "SELECT a.value_json FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
                "WHERE t.state = 'RUNNING' AND a.key = ?", (RUN_ID_ATTR,)).fetchone()
    except sqlite3.Error:
        return None  # not created yet, or locked for a moment
    return json.loads(row[0]) if row else None


def test_sigkilled_worker_trial_is_retried_and_its_run_failed(tmp_path, tracking_uri, storage_url):
    # The first cell runs long enough to be caught mid-trial; the second is queued when the worker dies.
    space = write_space(tmp_path, "killed", 'sampler = "grid"\npruner = "none"', '"scconv.order" = "none"',
                        "epochs = [3, 1]")
    args = ["--space", space, "--heartbeat", "1"]
    cmd = [sys.executable, "-m", "ablate.cli", "study", *args, "--storage", storage_url,
           "--tracking-uri", tracking_uri, "--quiet"]
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        victim = None
        while victim is None and time.monotonic() < deadline and worker.poll() is None:
            victim = _running_trial_with_run(tmp_path / "optuna.db")
            time.sleep(0.05)
        assert victim is not None, f"no trial started: {(tmp_path / 'worker.log').read_text()[-2000:]}"
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
        log.close()
    client = MlflowClient(tracking_uri)
    assert client.get_run(victim).info.status == track.RUNNING  # killed mid-trial: nobody ended the run

    assert run_cli(*args, storage=storage_url, tracking=tracking_uri) == 0

    trials = live(all_trials(storage_url, "killed"))
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.params["epochs"] for t in complete) == [1, 3]
    (lost,) = [t for t in trials if t.user_attrs.get(RUN_ID_ATTR) == victim]
    assert lost.state == optuna.trial.TrialState.FAIL
    run = client.get_run(victim)
    assert run.info.status == track.FAILED
    assert run.data.tags["failure"] == "worker_lost"
    exp = client.get_experiment_by_name("killed")
    statuses = [r.info.status for r in client.search_runs([exp.experiment_id])]
    assert track.RUNNING not in statuses
    assert sorted(statuses) == sorted([track.FAILED, track.FINISHED, track.FINISHED, track.FINISHED])  # + parent


# -- failures and pruning ------------------------------------------------------------------------


def test_nonfinite_loss_fails_the_trial_in_both_stores_and_the_study_goes_on(tmp_path, tracking_uri, storage_url):
    space = write_space(tmp_path, "diverge", 'sampler = "grid"\npruner = "none"',
                        'epochs = 1\n"scconv.order" = "none"', "lr = [0.05, 1e30]")
    assert run_cli("--space", space, storage=storage_url, tracking=tracking_uri) == 0
    by_lr = {t.params["lr"]: t for t in all_trials(storage_url, "diverge")}
    assert by_lr[0.05].state == optuna.trial.TrialState.COMPLETE
    bad = by_lr[1e30]
    assert bad.state == optuna.trial.TrialState.FAIL
    assert bad.user_attrs["failure"] == "nonfinite_loss"
    run = MlflowClient(tracking_uri).get_run(bad.user_attrs[RUN_ID_ATTR])
    assert run.info.status == track.FAILED
    assert run.data.tags["failure"] == "nonfinite_loss"
    assert run.data.tags["optuna.state"] == "FAIL"
    # The failure is final: a rerun does not train the diverging cell again.
    assert run_cli("--space", space, storage=storage_url, tracking=tracking_uri) == 0
    assert len(all_trials(storage_url, "diverge")) == 2


def _settings(space_path: str, storage: str, tracking: str, **kw) -> StudySettings:
    space = load_space(space_path)
    return StudySettings(space=space, storage_url=storage, tracking_uri=tracking, study_name=space.name,
                         overrides={}, heartbeat_interval=1, grace_period=3, progress=False, **kw)


def test_pruned_trial_ends_killed_with_state_tag(tmp_path, tracking_uri, storage_url):
    # A threshold no accuracy reaches prunes every trial at its first report: the mechanism, deterministically.
    space = write_space(tmp_path, "pruned", 'sampler = "grid"\npruner = "median"', "epochs = 3",
                        '"scconv.order" = ["none", "sru"]')
    settings = _settings(space, storage_url, tracking_uri)
    _, parent_id, _ = prepare(settings)
    study = load_study(settings, pruner=optuna.pruners.ThresholdPruner(lower=1.5))
    run_worker(settings, parent_id, study=study)
    trials = live(study.get_trials())
    assert [t.state for t in trials] == [optuna.trial.TrialState.PRUNED] * 2
    assert all(t.user_attrs["epochs_run"] == 1 for t in trials)
    client = MlflowClient(tracking_uri)
    for t in trials:
        run = client.get_run(t.user_attrs[RUN_ID_ATTR])
        assert run.info.status == track.KILLED
        assert run.data.tags["optuna.state"] == "PRUNED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [0]
        assert run.data.metrics["summary.final_val_acc"] == run.data.metrics["val_acc"]  # summarised as it stopped
    # A pruned cell is done: nothing is enqueued again.
    assert enqueue_missing_cells(study, settings) == []
    assert not study.get_trials(states=(optuna.trial.TrialState.WAITING,))


def test_pruner_names_map_to_optuna_pruners():
    space = load_space("tpe_alpha")
    assert isinstance(make_pruner(space), optuna.pruners.MedianPruner)
    assert isinstance(make_pruner(load_space("smoke")), optuna.pruners.NopPruner)
    from dataclasses import replace

    assert isinstance(make_pruner(replace(space, pruner="hyperband")), optuna.pruners.HyperbandPruner)


# -- safeguards, sampled spaces, skipped cells ---------------------------------------------------


def _fake_training(calls: list):
    """run_training that records its config and makes a real (tiny) MLflow run."""
    from ablate.train import RunResult

    def fake(cfg, *, tracking_uri, parent_run_id, run_name, tags, on_epoch, on_start, progress, continue_from=None):
        client = track.client(tracking_uri)
        run = track.TrackedRun.start(client, track.ensure_experiment(client, cfg.experiment), run_name, {}, tags,
                                     parent_run_id=parent_run_id)
        on_start(run.run_id)
        calls.append(cfg.model.scconv.order)
        row = {"val_acc": 0.5, "val_loss": 1.0, "train_loss": 1.0, "train_acc": 0.5}
        on_epoch(0, row)
        run.end(track.FINISHED)
        return RunResult(run.run_id, track.FINISHED, 1, [row])

    return fake


def test_a_cell_enqueued_twice_is_trained_once(tmp_path, tracking_uri, storage_url, monkeypatch):
    import ablate.train

    calls: list = []
    monkeypatch.setattr(ablate.train, "run_training", _fake_training(calls))
    space = write_space(tmp_path, "twice", 'sampler = "grid"\npruner = "none"', "epochs = 1",
                        '"scconv.order" = ["none", "sru"]')
    settings = _settings(space, storage_url, tracking_uri)
    study, parent_id, _ = prepare(settings)
    enqueued = [t.user_attrs[CELL_ATTR] for t in study.get_trials()]
    for cell in enqueued:  # what a second parent starting at the same moment would add
        study.enqueue_trial(cell, user_attrs={CELL_ATTR: cell, "label": cell["scconv.order"]})
    run_worker(settings, parent_id, study=study)
    assert sorted(calls) == ["none", "sru"]
    trials = study.get_trials()
    assert len(trials) == 4 and sum(bool(t.user_attrs.get(SURPLUS_ATTR)) for t in trials) == 2
    assert sorted(t.params["scconv.order"] for t in live(trials)) == ["none", "sru"]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # study.ask() stands in for a worker's trial
def test_a_run_left_running_by_a_finished_trial_is_failed(tmp_path, tracking_uri, storage_url):
    # A worker killed between creating the MLflow run and telling Optuna its id leaves only the run's tags.
    space = write_space(tmp_path, "window", 'sampler = "grid"\npruner = "none"', "epochs = 1",
                        '"scconv.order" = ["none"]')
    settings = _settings(space, storage_url, tracking_uri)
    study, parent_id, _ = prepare(settings)
    trial = study.ask()
    client = track.client(tracking_uri)
    run = track.TrackedRun.start(client, client.get_experiment_by_name("window").experiment_id, "orphan", {},
                                 {"optuna.study": "window", "optuna.trial_number": str(trial.number)},
                                 parent_run_id=parent_id)
    assert recover_lost_runs(study, tracking_uri) == 0  # its trial still runs: hands off
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert recover_lost_runs(study, tracking_uri) == 1
    ended = client.get_run(run.run_id)
    assert ended.info.status == track.FAILED and ended.data.tags["failure"] == "worker_lost"
    assert client.get_run(parent_id).info.status == track.RUNNING  # the parent is the study's, not a trial's


def test_sampled_space_runs_n_trials_and_a_rerun_adds_none(tmp_path, tracking_uri, storage_url, capsys):
    space = write_space(tmp_path, "sampled", 'sampler = "random"\npruner = "none"\nn_trials = 2',
                        'epochs = 1\n"scconv.order" = "none"', "lr = {low = 0.01, high = 0.1, log = true}")
    assert main(["study", "--space", space, "--storage", storage_url, "--tracking-uri", tracking_uri]) == 0
    err = capsys.readouterr().err
    assert "sampled: 100%" in err and "2/2" in err and "best=" in err  # the progress bar, with the best value
    assert run_cli("--space", space, storage=storage_url, tracking=tracking_uri) == 0
    trials = all_trials(storage_url, "sampled")
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert all(0.01 <= t.params["lr"] <= 0.1 for t in trials)
    assert len(runs(tracking_uri, "sampled")) == 2


def test_n_trials_limits_a_grid_and_a_rerun_enqueues_the_rest(tracking_uri, storage_url):
    space = load_space("smoke")
    first = StudySettings(space=space, storage_url=storage_url, tracking_uri=tracking_uri,
                          study_name="smoke", overrides={}, n_trials=2, progress=False)
    study, _, _ = prepare(first)
    assert [t.params for t in study.get_trials()] == [{}, {}]  # enqueued, not started
    assert [t.user_attrs[CELL_ATTR] for t in study.get_trials()] == space.cells()[:2]
    second = StudySettings(space=space, storage_url=storage_url, tracking_uri=tracking_uri,
                           study_name="smoke", overrides={}, progress=False)
    study, _, _ = prepare(second)
    assert [t.user_attrs[CELL_ATTR] for t in study.get_trials()] == space.cells()


def test_alpha_squeeze_skips_invalid_cells_with_a_logged_reason(tracking_uri, storage_url, capsys):
    space = load_space("alpha_squeeze")
    settings = StudySettings(space=space, storage_url=storage_url, tracking_uri=tracking_uri,
                             study_name="alpha_squeeze", overrides={}, progress=False)
    study, parent_id, skipped = prepare(settings)
    assert 0 < len(skipped) < len(space.cells())
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert len(waiting) == len(space.cells()) - len(skipped)
    err = capsys.readouterr().err.splitlines()
    assert len([line for line in err if line.startswith("skipped {")]) == len(skipped)
    for cell, reason in skipped:
        assert "layer" in reason or "not valid" in reason
    client = MlflowClient(tracking_uri)
    path = client.download_artifacts(parent_id, "skipped_cells.csv")
    import pandas as pd

    table = pd.read_csv(path)
    assert len(table) == len(skipped) and table["reason"].str.len().min() > 0


# -- the command line: listing and bad input -----------------------------------------------------


def test_spaces_lists_every_shipped_space(capsys):
    assert main(["spaces"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == available()
    assert any("grid of 6" in line for line in out if line.startswith("smoke"))
    assert any("grid of 30" in line for line in out if line.startswith("sru_cru_order"))


BAD_TOML = '[study]\nsampler = "grid"\n[base]\nepochs = = 2\n'
UNKNOWN_KEY = '[study]\nsampler = "grid"\nobjectiv = "val_acc"\n[params]\nlr = [0.1]\n'
BAD_BASE = '[study]\nsampler = "grid"\n[base]\nepochs = -1\n[params]\nlr = [0.1]\n'
BAD_PARAM = '[study]\nsampler = "grid"\n[params]\n"scconv.alpha" = [0.5, 1.5]\n'


@pytest.mark.parametrize("args, words", [
    (["--space", "sru_cru_ordr"], ["did you mean 'sru_cru_order'", "alpha_squeeze", "tpe_alpha"]),
    (["--space", "{bad_toml}"], ["bad.toml:4:", "Invalid"]),
    (["--space", "{unknown_key}"], ["unknown.toml:3:", "did you mean 'objective'"]),
    (["--space", "{bad_base}"], ["base.toml:4:", "epochs=-1"]),
    (["--space", "{bad_param}"], ["param.toml:4:", "scconv.alpha=1.5"]),
    (["--space", "smoke", "--set", "epoch=1"], ["--set", "did you mean 'epochs'"]),
    (["--space", "smoke", "--set", "lr=fast"], ["--set lr='fast'", "a number"]),
    (["--space", "smoke", "--set", "scconv.order=none"], ["sweeps scconv.order"]),
    (["--space", "smoke", "--workers", "0"], ["workers=0", "an integer >= 1"]),
    (["--space", "smoke", "--n-trials", "0"], ["n_trials=0"]),
    (["--space", "smoke", "--heartbeat", "0"], ["heartbeat=0"]),
    (["--space", "smoke", "--study-name", "a b"], ["study_name='a b'"]),
    (["--space", "smoke", "--workers", "two"], ["invalid int value"]),
    (["--space", "smoke", "--storage", "optuna.db"], ["storage='optuna.db'", "sqlite:///"]),
    (["--space", "replication_cifar100", "--set", "data_root={tmp}/no-data"], ["dataset 'cifar100' not found"]),
])
def test_bad_input_exits_2_with_one_line_and_creates_nothing(tmp_path, monkeypatch, capsys, args, words):
    files = {"bad_toml": ("bad.toml", BAD_TOML), "unknown_key": ("unknown.toml", UNKNOWN_KEY),
             "bad_base": ("base.toml", BAD_BASE), "bad_param": ("param.toml", BAD_PARAM)}
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    for key, (name, text) in files.items():
        (spaces / name).write_text(text)
    args = [a.format(tmp=tmp_path, **{k: str(spaces / name) for k, (name, _) in files.items()}) for a in args]
    store = tmp_path / "store"
    monkeypatch.chdir(tmp_path)  # a default store would land here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    stores = ["--storage", f"sqlite:///{store / 'optuna.db'}", "--tracking-uri", f"sqlite:///{store / 'mlflow.db'}"]
    rc = main(["study", *stores, *args, "--quiet"])  # a --storage in args wins
    assert rc == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    for word in words:
        assert word in lines[0], lines[0]
    assert captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spaces"]  # no store, no mlruns/
