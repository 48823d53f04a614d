"""MLflow tracking: stores, experiments, the run lifecycle and its statuses.

The default store is SQLite (``sqlite:///mlruns/mlflow.db``) with artifacts beside it, never MLflow's file store.
Run status is the truth: FINISHED, FAILED (exception or non-finite loss) or KILLED (interrupt, pruned).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import parse_qsl, unquote, urlencode, urlparse

from ablate.errors import ConfigError, redact_url
from ablate.fileio import writable_problem
from ablate.names import FAILURE_TAG, GIT_COMMIT_TAG, PARENT_RUN_TAG, ROLE_RUN, ROLE_TAG

DEFAULT_STORE_DIR = "mlruns"
DEFAULT_DB = "mlflow.db"

#: Run statuses as MLflow names them.
FINISHED, FAILED, KILLED, RUNNING = "FINISHED", "FAILED", "KILLED", "RUNNING"
#: The failure reason of a run (and of its trial) stopped by Ctrl-C.
INTERRUPTED = "interrupted"

#: Seconds a tracking server or database gets to answer the first request before the command gives up.
CONNECT_TIMEOUT_S = 5
#: MLflow's HTTP limits for this process unless the user set them: its defaults (120 s, 7 retries with
#: backoff) keep a command silent for minutes when the server is gone.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3"}


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: the argument, else ``MLFLOW_TRACKING_URI``, else the repo-local SQLite store."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{Path(DEFAULT_STORE_DIR, DEFAULT_DB).resolve()}"
    if uri.startswith("file:") or "://" not in uri:
        raise ConfigError(
            f"tracking_uri={uri!r} is not valid; accepted: a database URI (sqlite:///path.db, postgresql://...) or "
            "an http(s):// tracking server (MLflow's file store is not supported)"
        )
    return uri


def database_url(url: str) -> str:
    """``url`` with a PostgreSQL driver that is installed (SQLAlchemy 2.1 reads a bare ``postgresql://`` as
    psycopg 3, while the ``postgres`` extra installs psycopg2) and a bounded ``connect_timeout``."""
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        url = "postgresql+psycopg2://" + url[len("postgresql://"):]
    if url.startswith("postgresql"):
        parsed = urlparse(url)
        query = dict(parse_qsl(parsed.query))
        if "connect_timeout" not in query:
            # Without it an unreachable host keeps libpq waiting for the kernel's TCP timeout (minutes).
            query["connect_timeout"] = str(CONNECT_TIMEOUT_S)
            url = parsed._replace(query=urlencode(query)).geturl()
    return url


def is_http(uri: str) -> bool:
    """Whether ``uri`` names a tracking server rather than a database."""
    return uri.startswith(("http://", "https://"))


@functools.lru_cache(maxsize=None)
def check_reachable(uri: str, name: str = "tracking_uri") -> None:
    """Raise ConfigError (naming the option ``name``) within a few seconds unless the tracking server or database
    of ``uri`` answers. SQLite files are not checked (see :func:`check_writable`). Only success is cached.
    """
    if sqlite_path(uri) is not None:
        return
    shown = redact_url(uri)
    try:
        if is_http(uri):
            import urllib.error
            import urllib.request

            try:
                urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=CONNECT_TIMEOUT_S).close()
            except urllib.error.HTTPError:
                pass  # the server answered (an auth proxy may refuse /health): it is reachable
        else:
            import sqlalchemy

            engine = sqlalchemy.create_engine(database_url(uri), poolclass=sqlalchemy.pool.NullPool)
            try:
                engine.connect().close()
            finally:
                engine.dispose()
    except Exception as e:  # noqa: BLE001 - refused, timed out, unknown host, missing driver, bad credentials
        reason = str(getattr(e, "reason", None) or e).strip().splitlines()
        reason_text = redact_url(reason[0] if reason else type(e).__name__)[:200]
        what = "start the server (mlflow server ...) or check the URL" if is_http(uri) else \
            "start the database or check the URL and credentials"
        raise ConfigError(f"{name}={shown!r} is not reachable within {CONNECT_TIMEOUT_S} s ({reason_text}); "
                          f"{what}") from None


def check_writable(uri: str, name: str = "tracking_uri") -> None:
    """Raise ConfigError (creating nothing) when a ``sqlite:///`` store cannot be created or written."""
    db = sqlite_path(uri)
    if db is None:
        return
    problem = writable_problem(db)
    if problem:
        raise ConfigError(f"{name}={redact_url(uri)!r} is not writable: {problem}; accepted: a sqlite:/// path in a "
                          "folder you can write")


@contextlib.contextmanager
def first_use_lock(db: Path) -> Iterator[None]:
    """Hold an exclusive lock (``<db>.lock`` beside the database) while a fresh SQLite store gets its tables:
    two processes opening one at the same moment would both create them, and one would fail."""
    import fcntl

    with open(db.with_name(db.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(unquote(uri[len("sqlite:///"):]))


def default_artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: ``SCCONV_ARTIFACT_ROOT``, else ``artifacts/`` beside a SQLite file.

    None lets a tracking server choose (its ``--artifacts-destination``).
    """
    root = os.environ.get("SCCONV_ARTIFACT_ROOT")
    if root:
        return Path(root).resolve().as_uri()
    db = sqlite_path(uri)
    if db is not None:
        return (db.resolve().parent / "artifacts").as_uri()
    return None


@functools.lru_cache(maxsize=None)
def quiet_mlflow() -> None:
    # Alembic prints a dozen INFO lines when it creates the schema, the system metrics monitor four per run;
    # users need none of them.
    for name in ("alembic", "alembic.runtime.migration", "mlflow.store.db.utils", "mlflow.system_metrics"):
        logging.getLogger(name).setLevel(logging.WARNING)


def client(uri: str | None = None):
    """An MlflowClient on the resolved store: a SQLite file is created (its folder too) under a lock, a server or
    database that does not answer within a few seconds is a ConfigError."""
    from mlflow.tracking import MlflowClient

    quiet_mlflow()
    uri = resolve_tracking_uri(uri)
    if is_http(uri):
        for key, value in HTTP_LIMITS.items():
            os.environ.setdefault(key, value)
    check_reachable(uri)
    if sqlite_path(uri) is not None:
        _open_sqlite(uri)
    return MlflowClient(tracking_uri=database_url(uri))


@functools.lru_cache(maxsize=None)
def _open_sqlite(uri: str) -> None:
    """Create the schema of a SQLite store once per process, one process at a time."""
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        with first_use_lock(db):
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except OSError as e:
        raise ConfigError(f"tracking_uri={uri!r} is not writable ({e.strerror or e}); accepted: a sqlite:/// path "
                          "in a folder you can write") from None


def ensure_experiment(mlflow_client, name: str) -> str:
    """The id of experiment ``name``, created (with our artifact root) when missing; restores a deleted one."""
    from mlflow.exceptions import MlflowException

    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return mlflow_client.create_experiment(name, artifact_location=default_artifact_root(mlflow_client.tracking_uri))
    except MlflowException:
        # Another worker created it between our lookup and create.
        return mlflow_client.get_experiment_by_name(name).experiment_id


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the code that runs (with ``-dirty`` when the tree has changes), or ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def local_artifact_dir(artifact_uri: str) -> Path | None:
    """The folder behind a ``file:`` artifact URI (so checkpoints can be written in place), else None."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path))
    return None


def _param_value(value: Any) -> str:
    return "None" if value is None else str(value)


class TrackedRun:
    """One MLflow run: params, per-epoch metrics, artifacts and an honest final status.

    Use as a context manager; an exception ends the run FAILED, an interrupt KILLED.
    """

    def __init__(self, mlflow_client, run_id: str):
        self.client = mlflow_client
        self.run_id = run_id
        self.status: str = RUNNING
        self._monitor = None

    @classmethod
    def start(cls, mlflow_client, experiment_id: str, run_name: str, params: Mapping[str, Any],
              tags: Mapping[str, str], parent_run_id: str | None = None) -> "TrackedRun":
        """Create a RUNNING run with its params and tags (nested under ``parent_run_id`` when given)."""
        from mlflow.entities import Param

        all_tags = {GIT_COMMIT_TAG: git_commit(), ROLE_TAG: ROLE_RUN, **tags}
        if parent_run_id:
            all_tags[PARENT_RUN_TAG] = parent_run_id
        run = mlflow_client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            mlflow_client.log_batch(run.info.run_id, params=items[i:i + 100])
        return cls(mlflow_client, run.info.run_id)

    @classmethod
    def reopen(cls, mlflow_client, run_id: str) -> "TrackedRun":
        """Mark an existing run RUNNING again (``--resume``)."""
        mlflow_client.update_run(run_id, status=RUNNING)
        return cls(mlflow_client, run_id)

    @property
    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log one point per metric at ``step`` (the epoch index), in batches."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def last_logged_step(self, key: str) -> int:
        """The largest step logged for ``key`` (-1 when none)."""
        history = self.client.get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=-1)

    def start_system_metrics(self, device=None, enabled: bool = True) -> bool:
        """Sample CPU and memory (and ``device``'s GPU with nvidia-ml-py) into the run while it runs; needs psutil
        and ``enabled`` (``RunConfig.system_metrics``), and MLflow's own switch not set to false."""
        from ablate.ui.system import start_system_metrics

        self._monitor = start_system_metrics(self.run_id, self.client.tracking_uri, device, configured=enabled)
        return self._monitor is not None

    def end(self, status: str) -> None:
        """Stop system metrics and set the final status."""
        if self._monitor is not None:
            from ablate.ui.system import stop_system_metrics

            stop_system_metrics(self._monitor)
            self._monitor = None
        self.status = status
        self.client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> "TrackedRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.status == RUNNING:
            if exc_type is None:
                self.end(FINISHED)
            elif issubclass(exc_type, KeyboardInterrupt):
                self.set_tags({FAILURE_TAG: INTERRUPTED})
                self.end(KILLED)
            else:
                self.set_tags({FAILURE_TAG: exc_type.__name__})
                self.end(FAILED)
        return False
