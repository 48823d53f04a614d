"""Preemption-safe runs: checkpoints reach the tracking store during the run (also an HTTP server with proxied
artifacts, also inside long epochs), a run resumes from them with every epoch's metrics once, and a trial whose
worker was SIGKILLed continues from its last checkpoint in a new run on another worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from ablate import track
from ablate.cli import main as ablate_main
from ablate.config import RunConfig
from ablate.names import RESUMED_FROM_EPOCH_TAG, RESUMED_FROM_RUN_TAG, SURPLUS_ATTR
from ablate.train import run_training

FAST = {"dataset": "digits", "backbone": "resnet20", "image_size": 16, "batch_size": 32, "max_steps_per_epoch": 3,
        "probe_size": 8, "scconv.order": "sru_cru", "seed": 1}
CURVES = ("train_loss", "train_acc", "val_loss", "val_acc")


def _cfg(**kw) -> RunConfig:
    return RunConfig.from_dict({**FAST, "experiment": "resume", **kw})


def steps(client, run_id: str, key: str = "val_loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def curve(client, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def stop_at(epoch: int):
    """An on_epoch that interrupts the run after ``epoch`` (as Ctrl-C would)."""
    def on_epoch(e, metrics):
        if e == epoch:
            raise KeyboardInterrupt

    return on_epoch


def killed_run(client, experiment: str, exclude: set[str]) -> str:
    exp = client.get_experiment_by_name(experiment)
    (run,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_id not in exclude]
    assert run.info.status == track.KILLED
    return run.info.run_id


def test_an_epoch_interrupted_mid_way_resumes_with_the_uninterrupted_result(tracking_uri, monkeypatch):
    """checkpoint_every_minutes tiny: a checkpoint between every two steps; the kill comes right after one."""
    import ablate.train.runner as runner

    cfg = _cfg(epochs=2, checkpoint_every_minutes=1e-6)
    full = run_training(cfg, tracking_uri=tracking_uri, progress=False)
    real_save = runner.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if state["epoch"] == 1 and state["step"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, tracking_uri=tracking_uri, progress=False)
    monkeypatch.setattr(runner, "save_checkpoint", real_save)
    client = MlflowClient(tracking_uri)
    killed = killed_run(client, "resume", {full.run_id})
    assert steps(client, killed) == [0]

    resumed = run_training(cfg, tracking_uri=tracking_uri, resume_run_id=killed, progress=False)
    assert resumed.run_id == killed and resumed.status == track.FINISHED
    assert client.get_run(killed).data.tags[RESUMED_FROM_EPOCH_TAG] == "1"
    for key in CURVES:  # train_loss/train_acc of epoch 1 cover its 2 batches before the kill and 1 after
        assert steps(client, killed, key) == [0, 1]
        assert curve(client, killed, key) == pytest.approx(curve(client, full.run_id, key), rel=1e-6)


def test_a_new_run_continues_the_last_checkpoint_of_dead_runs_with_each_epoch_once(tracking_uri):
    cfg = _cfg(epochs=3)
    full = run_training(cfg, tracking_uri=tracking_uri, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, tracking_uri=tracking_uri, on_epoch=stop_at(0), progress=False)
    client = MlflowClient(tracking_uri)
    dead = killed_run(client, "resume", {full.run_id})
    # A first retry dies before writing a checkpoint of its own (while it replays epoch 0).
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, tracking_uri=tracking_uri, continue_from=dead, on_epoch=stop_at(0), progress=False)
    retry = killed_run(client, "resume", {full.run_id, dead})
    assert client.get_run(retry).data.tags[RESUMED_FROM_RUN_TAG] == dead

    replayed = []
    result = run_training(cfg, tracking_uri=tracking_uri, continue_from=retry, progress=False,
                          on_epoch=lambda e, m: replayed.append(e))
    assert result.run_id not in (dead, retry, full.run_id) and result.status == track.FINISHED
    assert replayed == [0, 1, 2]  # a study's pruner sees the restored epoch too
    run = client.get_run(result.run_id)  # the checkpoint it continued is the first dead run's
    assert run.data.tags[RESUMED_FROM_RUN_TAG] == dead and run.data.tags[RESUMED_FROM_EPOCH_TAG] == "1"
    for key in CURVES:
        assert steps(client, result.run_id, key) == [0, 1, 2]
        assert curve(client, result.run_id, key) == pytest.approx(curve(client, full.run_id, key), rel=1e-6)
    assert client.get_run(dead).info.status == track.KILLED  # the dead run is left as it was
    assert steps(client, dead) == [0]


def test_a_dead_run_without_a_checkpoint_is_trained_from_the_start(tracking_uri):
    cfg = _cfg(epochs=1, log_checkpoint=False)
    first = run_training(cfg, tracking_uri=tracking_uri, progress=False)
    result = run_training(cfg, tracking_uri=tracking_uri, continue_from=first.run_id, progress=False)
    tags = MlflowClient(tracking_uri).get_run(result.run_id).data.tags
    assert RESUMED_FROM_RUN_TAG not in tags and RESUMED_FROM_EPOCH_TAG not in tags
    assert result.history[0]["val_loss"] == pytest.approx(first.history[0]["val_loss"], rel=1e-6)


# -- an HTTP tracking server with proxied artifacts -----------------------------------------------


def run_dirs(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("ablate-*"))


def test_http_server_holds_the_checkpoint_during_the_run_and_resume_downloads_it(http_tracking, tmp_path,
                                                                                  monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the run's temporary copies go
    experiment = f"http-{uuid.uuid4().hex[:8]}"
    cfg = _cfg(epochs=2, experiment=experiment)
    client = MlflowClient(http_tracking)
    seen = []

    def look_then_die(epoch, metrics):
        (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        seen.append([f.path for f in client.list_artifacts(run.info.run_id, "checkpoint")])
        raise KeyboardInterrupt  # preempted right after epoch 0

    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, tracking_uri=http_tracking, on_epoch=look_then_die, progress=False)
    assert seen == [["checkpoint/checkpoint.pt"]]  # on the server while the run was still going
    assert run_dirs(tmp_path) == []  # the local copy went with the run
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")

    rc = ablate_main(["train", "--resume", run.info.run_id, "--tracking-uri", http_tracking, "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert f"run {run.info.run_id} FINISHED after 2 epochs" in capsys.readouterr().out
    assert steps(client, run.info.run_id) == [0, 1]
    assert client.get_run(run.info.run_id).data.tags[RESUMED_FROM_EPOCH_TAG] == "1"
    assert run_dirs(tmp_path) == []


def test_http_run_without_log_checkpoint_leaves_no_checkpoint_on_the_server(http_tracking, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    experiment = f"http-{uuid.uuid4().hex[:8]}"
    result = run_training(_cfg(epochs=1, experiment=experiment, log_checkpoint=False), tracking_uri=http_tracking,
                          progress=False)
    client = MlflowClient(http_tracking)
    assert result.status == track.FINISHED
    assert client.list_artifacts(result.run_id, "checkpoint") == []
    assert "history.csv" in {f.path for f in client.list_artifacts(result.run_id)}
    assert run_dirs(tmp_path) == []


# -- two machines in miniature: PostgreSQL + mlflow server, a worker SIGKILLed mid-trial ----------


TINY_BASE = ('dataset = "digits"\nbackbone = "resnet20"\nmax_steps_per_epoch = 2\nimage_size = 16\nbatch_size = 32\n'
             'probe_size = 8\n"scconv.order" = "none"\n')


def worker(space: str, storage: str, tracking: str, name: str, cwd: Path) -> subprocess.Popen:
    """``ablate study`` in its own working folder, as on another machine sharing the storage and the server."""
    cwd.mkdir()
    cmd = [sys.executable, "-m", "ablate.cli", "study", "--space", space, "--study-name", name, "--storage", storage,
           "--tracking-uri", tracking, "--heartbeat", "1", "--quiet"]
    log = (cwd / "worker.log").open("w")
    env = {k: v for k, v in os.environ.items() if k != "SCCONV_ARTIFACT_ROOT"}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                            env={**env, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": tracking})


def checkpointed_running_run(client, name: str) -> str | None:
    """A RUNNING trial run of study ``name`` whose checkpoint is already on the server."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return None
    for run in client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING' and "
                                                                     "tags.`ablate.role` = 'run'"):
        if client.list_artifacts(run.info.run_id, "checkpoint"):
            return run.info.run_id
    return None


@pytest.mark.postgres
def test_sigkilled_worker_trial_continues_on_the_other_worker(tmp_path, http_tracking):
    storage = os.environ.get("SCCONV_TEST_POSTGRES_URL")
    if not storage:
        pytest.skip("SCCONV_TEST_POSTGRES_URL is unset (.ci/run starts a PostgreSQL server and sets it)")
    name = f"preempt-{uuid.uuid4().hex[:8]}"
    space = tmp_path / "preempt.toml"
    space.write_text(f'[study]\nsampler = "grid"\npruner = "none"\n[base]\n{TINY_BASE}\n[params]\nepochs = [4, 1, 2]\n')
    client = MlflowClient(http_tracking)
    first = worker(str(space), storage, http_tracking, name, tmp_path / "machine-a")
    second = None
    try:
        deadline = time.monotonic() + 180
        victim = None
        while victim is None and time.monotonic() < deadline and first.poll() is None:
            victim = checkpointed_running_run(client, name)
            time.sleep(0.2)
        assert victim is not None, (tmp_path / "machine-a" / "worker.log").read_text()[-2000:]
        second = worker(str(space), storage, http_tracking, name, tmp_path / "machine-b")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        assert second.wait(timeout=300) == 0, (tmp_path / "machine-b" / "worker.log").read_text()[-2000:]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()

    trials = [t for t in optuna.load_study(study_name=name, storage=track.database_url(storage)).get_trials()
              if not t.user_attrs.get(SURPLUS_ATTR)]
    complete = sorted(t.params["epochs"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert complete == [1, 2, 4]  # every cell completed once
    exp = client.get_experiment_by_name(name)
    children = client.search_runs([exp.experiment_id], filter_string="tags.`ablate.role` = 'run'")
    finished = {int(r.data.params["epochs"]): r for r in children if r.info.status == track.FINISHED}
    assert sorted(finished) == [1, 2, 4] and len(children) == 4
    dead = client.get_run(victim)
    assert dead.info.status == track.FAILED and dead.data.tags["failure"] == "worker_lost"
    (cell,) = [r for r in finished.values() if r.data.tags.get(RESUMED_FROM_RUN_TAG) == victim]
    assert int(cell.data.tags[RESUMED_FROM_EPOCH_TAG]) >= 1
    epochs = int(cell.data.params["epochs"])
    for key in CURVES:  # every epoch's metrics exactly once, the restored ones included
        assert [m.step for m in sorted(client.get_metric_history(cell.info.run_id, key), key=lambda m: m.step)] \
            == list(range(epochs))
