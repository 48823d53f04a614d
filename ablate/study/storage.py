"""The Optuna storage of a study: RDB heartbeats, the retry of trials whose worker died, and their MLflow runs.

A trial whose worker went silent for the grace period is failed, its MLflow run (left RUNNING by the dead
process) is marked FAILED, and the cell is enqueued again to continue from that run's last checkpoint in a new run.
SQLite transactions start with ``BEGIN IMMEDIATE`` (SQLite ignores ``SELECT ... FOR UPDATE``, so two workers could
otherwise pop the same trial).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings

from ablate import track
from ablate.errors import ConfigError, redact_url
from ablate.names import (
    CELL_ATTR,
    FAILURE_TAG,
    LABEL_ATTR,
    OPTUNA_STATE_TAG,
    OPTUNA_STUDY_TAG,
    OPTUNA_TRIAL_TAG,
    RESUME_ATTR,
    ROLE_RUN,
    ROLE_TAG,
    RUN_ID_ATTR,
    SLOT_ATTR,
)
from ablate.study.settings import StudySettings
from ablate.study.spaces import Space

#: Times a trial whose worker died is enqueued again.
MAX_RETRY = 3
#: The failure reason of a trial (and run) whose worker died.
LOST = "worker_lost"


def _retry_class():
    """Optuna's retry-on-stale-heartbeat callback and the RDBStorage argument that takes it (renamed in 4.9)."""
    try:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        return RetryHeartbeatStaleTrialCallback, "heartbeat_stale_trial_callback"
    except ImportError:  # optuna < 4.9
        from optuna.storages import RetryFailedTrialCallback

        return RetryFailedTrialCallback, "failed_trial_callback"


class LostTrialCallback:
    """Runs when a trial's heartbeat went stale: mark its MLflow run FAILED, then enqueue the cell again."""

    def __init__(self, tracking_uri: str, max_retry: int = MAX_RETRY):
        retry_cls, _ = _retry_class()
        self.tracking_uri = tracking_uri
        self.retry = retry_cls(max_retry=max_retry)

    def __call__(self, study, trial) -> None:
        fresh = copy.deepcopy(trial)
        # The retry is a new attempt: it keeps the cell and label, and continues the dead attempt's run from its
        # last checkpoint (or the run that attempt was continuing, when it died before starting its own).
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        fresh.user_attrs = {k: v for k, v in trial.user_attrs.items() if k in (CELL_ATTR, LABEL_ATTR, SLOT_ATTR)}
        resume = run_id or trial.user_attrs.get(RESUME_ATTR)
        if resume:
            fresh.user_attrs[RESUME_ATTR] = resume
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna flags the retry callback as experimental
            self.retry(study, fresh)
        if run_id:
            try:
                mark_run_lost(track.client(self.tracking_uri), run_id)
            except Exception as e:  # noqa: BLE001 - a worker must not die of it; recover_lost_runs tries again
                logging.getLogger(__name__).warning("could not mark MLflow run %s FAILED: %s", run_id, e)


def mark_run_lost(client, run_id: str) -> bool:
    """End a run that a dead worker left RUNNING as FAILED (tag ``failure=worker_lost``); False if it had ended."""
    run = client.get_run(run_id)
    if run.info.status != track.RUNNING:
        return False
    client.set_tag(run_id, FAILURE_TAG, LOST)
    client.set_tag(run_id, OPTUNA_STATE_TAG, "FAIL")
    client.set_terminated(run_id, status=track.FAILED)
    return True


def recover_lost_runs(study, tracking_uri: str) -> int:
    """Fail trials whose worker died (stale heartbeat; they are retried) and end their MLflow runs FAILED.

    Returns the number of MLflow runs it ended. The heartbeat callback ends most of them; this sweep also ends a
    run whose trial id never reached Optuna (killed right after the run was created) or whose trial was failed by
    a process that could not reach the tracking store: a child run still RUNNING while its trial has finished.
    """
    from optuna.storages import fail_stale_trials

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fail_stale_trials is flagged experimental
        fail_stale_trials(study)
    client = track.client(tracking_uri)
    experiment = client.get_experiment_by_name(study.study_name)
    if experiment is None:
        return 0
    finished = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    running = client.search_runs([experiment.experiment_id], filter_string=(
        f"attributes.status = '{track.RUNNING}' and tags.`{OPTUNA_STUDY_TAG}` = '{study.study_name}' "
        f"and tags.`{ROLE_TAG}` = '{ROLE_RUN}'"))
    return sum(mark_run_lost(client, run.info.run_id) for run in running
               if int(run.data.tags.get(OPTUNA_TRIAL_TAG, -1)) in finished)


def make_storage(settings: StudySettings):
    """An RDB storage with heartbeats and a retry of trials whose worker died; unusable stores are ConfigErrors."""
    import optuna
    from optuna.storages import RDBStorage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = track.sqlite_path(settings.storage_url)
    if db is not None:
        # isolation_level=None hands transaction control to SQLAlchemy; _begin_immediate then starts each one.
        engine_kwargs = {"connect_args": {"timeout": 60, "isolation_level": None}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    _, callback_arg = _retry_class()
    try:
        with warnings.catch_warnings(), contextlib.ExitStack() as first_use:
            warnings.simplefilter("ignore")  # heartbeat_interval is flagged experimental
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
                first_use.enter_context(track.first_use_lock(db))  # the tables of a fresh file are created here
            storage = RDBStorage(track.database_url(settings.storage_url), engine_kwargs=engine_kwargs,
                                 heartbeat_interval=settings.heartbeat_interval, grace_period=settings.grace_period,
                                 **{callback_arg: LostTrialCallback(settings.tracking_uri)})
    except Exception as e:  # noqa: BLE001 - a bad URL, a missing driver, an unreachable server, an unwritable path
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"storage={redact_url(settings.storage_url)!r} is not usable ({reason[:200]}); accepted: "
                          "sqlite:///path.db or a reachable postgresql://user@host/db") from None
    if db is not None:
        _begin_immediate(storage.engine)
    return storage


def _begin_immediate(engine) -> None:
    """Start every SQLite transaction with a write lock, so that reading and claiming a trial is atomic."""
    from sqlalchemy import event

    @event.listens_for(engine, "begin")
    def _begin(conn):  # noqa: ANN001 - SQLAlchemy's event signature
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_sampler(space: Space, seed: int = 0):
    """The space's sampler (grid cells are enqueued with fixed params, so the sampler never picks them)."""
    import optuna

    if space.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if space.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(space: Space):
    """The space's pruner: median (after 3 trials and 1 epoch), hyperband, or none."""
    import optuna

    if space.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if space.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def load_study(settings: StudySettings, create: bool = False, pruner=None):
    """The Optuna study (created when ``create``), with this space's sampler and pruner (or ``pruner``)."""
    import optuna

    kwargs = dict(study_name=settings.study_name, storage=make_storage(settings), sampler=make_sampler(settings.space),
                  pruner=pruner or make_pruner(settings.space))
    if create:
        return optuna.create_study(directions=list(settings.space.directions), load_if_exists=True, **kwargs)
    return optuna.load_study(**kwargs)
