"""Checkpoints are plain data read with weights_only=True: a crafted pickle never runs, and a corrupt or foreign
checkpoint is one line naming the run and the reason, exit 2, with no run's status changed."""

from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from test_runs import log_run

from ablate.cli import main as ablate_main
from ablate.config import RunConfig
from ablate.errors import CheckpointError
from ablate.names import RESUMED_FROM_EPOCH_TAG
from ablate.train import run_training
from ablate.train.checkpoint import RESUME_KEYS, load_model, save_checkpoint
from analysis.cli import main as analysis_main

FAST = {"dataset": "digits", "backbone": "resnet20", "image_size": 16, "batch_size": 32, "max_steps_per_epoch": 2,
        "probe_size": 8, "epochs": 1, "experiment": "ckpt", "scconv.order": "sru"}


class Plant:
    """Unpickling this creates ``marker`` (``open(marker, "w")``): what an attacker's checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mlflow_schema):
    """One real 1-epoch run (order sru) and its checkpoint, in a store of its own."""
    tmp = tmp_path_factory.mktemp("ckpt")
    shutil.copy(mlflow_schema, tmp / "mlflow.db")
    ns = SimpleNamespace(tmp=tmp, uri=f"sqlite:///{tmp / 'mlflow.db'}", artifacts=str(tmp / "artifacts"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", ns.uri)
        mp.setenv("SCCONV_ARTIFACT_ROOT", ns.artifacts)
        torch.set_num_threads(1)
        ns.run_id = run_training(RunConfig.from_dict(FAST), tracking_uri=ns.uri, progress=False).run_id
    client = MlflowClient(ns.uri)
    ns.ckpt = Path(client.download_artifacts(ns.run_id, "checkpoint/checkpoint.pt", str(tmp / "real")))
    ns.params = client.get_run(ns.run_id).data.params
    ns.experiment_id = client.get_experiment_by_name("ckpt").experiment_id
    return ns


@pytest.fixture
def env(trained, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained.uri)
    monkeypatch.setenv("SCCONV_ARTIFACT_ROOT", trained.artifacts)
    return trained


def planted_run(ns, tmp_path: Path, payload: bytes) -> str:
    """A FINISHED run with the real run's params whose checkpoint/checkpoint.pt holds ``payload``."""
    client = MlflowClient(ns.uri)
    run_id = log_run(client, ns.experiment_id, ns.params, {"val_loss": np.array([1.0])},
                     tags={"ablate.role": "run", "ablate.variant": "resnet20/sru"})
    path = tmp_path / run_id / "checkpoint.pt"
    path.parent.mkdir()
    path.write_bytes(payload)
    client.log_artifact(run_id, str(path), "checkpoint")
    return run_id


def torch_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_real_checkpoint_is_plain_data(trained):
    assert torch.serialization.get_unsafe_globals_in_checkpoint(trained.ckpt) == []
    state = torch.load(trained.ckpt, weights_only=True)
    assert set(RESUME_KEYS) <= set(state) and state["epoch"] == 0 and state["step"] is None
    model, cfg = load_model(trained.ckpt)
    assert cfg.model.scconv.order == "sru" and not model.training


def test_the_crafted_checkpoint_is_live(tmp_path):
    """The control: the planted payload calls open(), and does run when unpickled the unsafe way."""
    marker = tmp_path / "control"
    payload = {"config": {}, "epoch": 0, "model": Plant(marker)}
    path = tmp_path / "evil.pt"
    path.write_bytes(torch_bytes(payload))
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == ["io.open"]
    pickle.loads(pickle.dumps(payload, protocol=2))["model"].close()
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
@pytest.mark.parametrize("entry", ["load_model", "train --resume", "analysis sensitivity",
                                   "analysis report --sensitivity"])
def test_a_crafted_checkpoint_never_runs(env, tmp_path, capsys, entry, fmt):
    marker = tmp_path / "pwned"
    state = torch.load(env.ckpt, weights_only=True)
    state["model"] = Plant(marker)
    payload = torch_bytes(state) if fmt == "torch" else pickle.dumps(state, protocol=2)
    client = MlflowClient(env.uri)
    if entry == "load_model":
        path = tmp_path / "evil.pt"
        path.write_bytes(payload)
        with pytest.raises(CheckpointError, match="refused: it holds" if fmt == "torch" else "refused|not usable"):
            load_model(path)
        assert not marker.exists()
        return
    if entry == "analysis report --sensitivity":
        run_id = report_runs(client, tmp_path, payload)
        rc = analysis_main(["report", "--experiment", "evil", "--sensitivity", "--no-log", "--tracking-uri", env.uri,
                            "--out", str(tmp_path / "report")])
    else:
        run_id = planted_run(env, tmp_path, payload)
        if entry == "train --resume":
            rc = ablate_main(["train", "--resume", run_id, "--tracking-uri", env.uri, "--quiet"])
        else:
            rc = analysis_main(["sensitivity", "--run-id", run_id, "--tracking-uri", env.uri, "--images", "2"])
    assert rc == 2
    line = one_line(capsys)
    assert run_id in line and ("refused" in line or "not usable" in line), line
    assert not marker.exists()
    assert client.get_run(run_id).info.status == "FINISHED"


def report_runs(client, tmp_path: Path, payload: bytes) -> str:
    """Experiment ``evil``: a baseline run with a real checkpoint and an sru run whose checkpoint is ``payload``."""
    if client.get_experiment_by_name("evil") is None:
        client.create_experiment("evil", artifact_location=(tmp_path / "evil-artifacts").as_uri())
    exp = client.get_experiment_by_name("evil").experiment_id
    for run in client.search_runs([exp]):
        client.delete_run(run.info.run_id)
    ids = {}
    for order in ("none", "sru"):
        cfg = _config(order)
        ids[order] = log_run(client, exp, cfg.to_params(), {"train_loss": np.array([1.0, 0.8]),
                                                            "val_loss": np.array([1.1, 0.9])}, run_name=order)
        path = tmp_path / order / "checkpoint.pt"
        path.parent.mkdir()
        if order == "none":
            save_checkpoint(path, {"config": cfg.to_dict(), "model": _model_weights(order), "epoch": 1})
        else:
            path.write_bytes(payload)
        client.log_artifact(ids[order], str(path), "checkpoint")
    return ids["sru"]


def _config(order: str) -> RunConfig:
    return RunConfig.from_dict({**FAST, "scconv.order": order, "num_classes": 10}).resolved()


def _model_weights(order: str) -> dict:
    from ablate.models import build_model

    return build_model(_config(order).model).state_dict()


def _corrupt(kind: str, ns) -> bytes:
    real = ns.ckpt.read_bytes()
    state = torch.load(ns.ckpt, weights_only=True)
    if kind == "truncated":
        return real[: len(real) // 2]
    if kind == "random":
        return random.Random(0).randbytes(4096)
    if kind == "empty":
        return b""
    if kind == "missing keys":
        return torch_bytes({"config": state["config"], "epoch": 0})
    if kind == "another variant's weights":
        return torch_bytes({**state, "model": _model_weights("cru")})
    return torch_bytes({**state, "config": _config("cru").to_dict()})  # another variant's config


CORRUPT = {"truncated": "not usable", "random": "not usable", "empty": "empty", "missing keys": "missing model",
           "another variant's weights": "model does not fit", "another variant's config": "scconv.order=cru vs sru"}


@pytest.mark.parametrize("kind", list(CORRUPT))
@pytest.mark.parametrize("entry", ["train --resume", "analysis sensitivity"])
def test_a_corrupt_or_foreign_checkpoint_is_one_line_and_changes_no_run(env, tmp_path, capsys, kind, entry):
    run_id = planted_run(env, tmp_path, _corrupt(kind, env))
    client = MlflowClient(env.uri)
    before = client.get_run(run_id)
    if entry == "train --resume":
        rc = ablate_main(["train", "--resume", run_id, "--tracking-uri", env.uri, "--quiet"])
    else:
        rc = analysis_main(["sensitivity", "--run-id", run_id, "--tracking-uri", env.uri, "--images", "2"])
    assert rc == 2
    line = one_line(capsys)
    assert run_id in line and CORRUPT[kind] in line, line
    after = client.get_run(run_id)
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time
    assert after.data.tags == before.data.tags and RESUMED_FROM_EPOCH_TAG not in after.data.tags
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [0]
