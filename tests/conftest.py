"""Shared test set-up: no telemetry, no network, never the repo's mlruns/."""

import os

import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store with artifacts in the test's temp dir."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SCCONV_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    return uri


@pytest.fixture
def storage_url(tmp_path):
    """A fresh SQLite Optuna storage."""
    return f"sqlite:///{tmp_path / 'optuna.db'}"
