"""Shared test set-up: no telemetry, no network beyond 127.0.0.1, never the repo's mlruns/."""

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
# A test that forgets the tracking_uri fixture (or a subprocess it starts) must never write to the user's store
# (an MLFLOW_TRACKING_URI of their shell) nor to MLflow's default mlflow.db in the working directory.
_SESSION_STORE = Path(tempfile.mkdtemp(prefix="ablate-tests-"))
atexit.register(shutil.rmtree, _SESSION_STORE, True)
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_STORE / 'mlflow.db'}"


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
def benchmark_script():
    """``load(name)``: the module of ``benchmarks/<name>.py``, which are scripts, not a package."""
    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


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


#: Seconds a started ``mlflow server`` may take to answer /health before its tests are skipped.
MLFLOW_SERVER_START_S = 60


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, mlflow_schema):
    """The URL of an ``mlflow server`` on 127.0.0.1 with proxied artifacts: ``SCCONV_TEST_MLFLOW_URL`` (.ci/run
    starts one), else one started here for the session on a free port (skipped when not healthy within 60 s)."""
    url = os.environ.get("SCCONV_TEST_MLFLOW_URL")
    if url:
        yield url
        return
    root = tmp_path_factory.mktemp("mlflow-server")
    shutil.copy(mlflow_schema, root / "mlflow.db")  # a migrated schema: the server starts without alembic's minutes
    url = f"http://127.0.0.1:{_free_port()}"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
           "--workers", "1"]
    with (root / "server.log").open("w") as log:
        # Its own session, so the server and the workers it spawns stop together.
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + MLFLOW_SERVER_START_S
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"mlflow server did not start within {MLFLOW_SERVER_START_S} s: "
                            f"{(root / 'server.log').read_text()[-300:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture
def http_tracking(mlflow_server, monkeypatch):
    """``mlflow_server`` as the tracking URI, artifacts proxied by the server (no local artifact root)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("SCCONV_ARTIFACT_ROOT", raising=False)
    return mlflow_server
