"""Shared test set-up: no telemetry, no network, never the repo's mlruns/."""

import os
import shutil

import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")


@pytest.fixture(autouse=True)
def single_thread():
    """Every test runs torch on one thread, restored afterwards: tests use tiny tensors, and on a busy 2-core
    machine two threads thrash (a tiny forward/backward: 1-10 ms on one thread, 0.5-1.2 s on two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mlflow_schema(tmp_path_factory):
    """An empty MLflow SQLite store made once per session: creating the schema takes seconds, copying it none."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("schema") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch, mlflow_schema):
    """A fresh SQLite MLflow store (a copy of the empty schema) with artifacts in the test's temp dir."""
    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_schema, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SCCONV_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    return uri


@pytest.fixture
def store(tracking_uri):
    """Alias of ``tracking_uri`` for the analysis tests."""
    return tracking_uri


@pytest.fixture
def storage_url(tmp_path):
    """A fresh SQLite Optuna storage."""
    return f"sqlite:///{tmp_path / 'optuna.db'}"
