"""Optuna studies over SCConv spaces: one trial = one tracked training run (``run_training``).

Coordination is Optuna's storage, nothing home-made:
- Grid spaces are *enqueued*: the parent puts every missing cell in the storage as a WAITING trial, and
  workers only pop WAITING trials. A cell is therefore trained once, also with many workers on many machines
  (Optuna's GridSampler alone repeats cells under parallel workers). Two safeguards make that hold on any store:
  SQLite transactions start with ``BEGIN IMMEDIATE`` (SQLite ignores ``SELECT ... FOR UPDATE``, so two workers
  could otherwise pop the same trial), and a popped cell that an earlier trial already holds is given up (two
  parents that enqueued at the same time).
- Crash safety: RDB heartbeats; a trial whose worker went silent for the grace period is failed, its MLflow
  run (left RUNNING by the dead process) is marked FAILED, and the cell is enqueued again. Workers with nothing
  left to pop wait for running trials, so they also pick up the retry of a trial whose worker died.
- One MLflow parent run per study, one nested child run per trial; the trial keeps the run id as a user
  attribute and the run carries ``optuna.study`` / ``optuna.trial_number`` / ``optuna.state`` tags.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ablate import track
from ablate.config import ConfigError, RunConfig
from ablate.spaces import STATIC_OBJECTIVES, Range, Space

DEFAULT_STORAGE_FILE = "optuna.db"
RUN_ID_ATTR = "mlflow_run_id"
CELL_ATTR = "cell"
LABEL_ATTR = "label"
EPOCHS_ATTR = "epochs_run"
SURPLUS_ATTR = "ablate_surplus"
FAILURE_ATTR = "failure"
SETTINGS_ATTR = "ablate_settings"
#: Failures that a retry cannot fix (the run is deterministic): the cell is done, and a rerun does not train it.
FINAL_FAILURES = ("nonfinite_loss", "nonfinite_objective")
#: Times a trial whose worker died is enqueued again.
MAX_RETRY = 3
LOST = "worker_lost"
#: Seconds between looks at the store while a worker waits for other workers' trials.
WAIT_POLL_S = 2


@dataclass(frozen=True)
class StudySettings:
    """How to run a space: where to store it and how many workers."""

    space: Space
    storage_url: str
    tracking_uri: str
    study_name: str
    overrides: dict[str, Any]
    n_trials: int | None = None
    workers: int = 1
    heartbeat_interval: int = 10
    grace_period: int = 30
    progress: bool = True


def resolve_storage(url: str | None) -> str:
    """The Optuna storage URL: the argument, else ``sqlite:///mlruns/optuna.db``."""
    if url:
        if "://" not in url:
            raise ConfigError(f"storage={url!r} is not valid; accepted: sqlite:///path.db or postgresql://user@host/db")
        return url
    return f"sqlite:///{Path(track.DEFAULT_STORE_DIR, DEFAULT_STORAGE_FILE).resolve()}"


def _redact(url: str) -> str:
    # Never record or print a database password.
    return re.sub(r"//([^:/@]+):[^@]+@", r"//\1:***@", url)


# -- storage -------------------------------------------------------------------------------------


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
        # The retry is a new attempt: it keeps the cell and label, not the dead attempt's run id or progress.
        fresh.user_attrs = {k: v for k, v in trial.user_attrs.items() if k in (CELL_ATTR, LABEL_ATTR)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna flags the retry callback as experimental
            self.retry(study, fresh)
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
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
    client.set_tag(run_id, "failure", LOST)
    client.set_tag(run_id, "optuna.state", "FAIL")
    client.set_terminated(run_id, status=track.FAILED)
    return True


def make_storage(settings: StudySettings):
    """An RDB storage with heartbeats and a retry of trials whose worker died; unusable stores are ConfigErrors."""
    import optuna
    from optuna.storages import RDBStorage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = track.sqlite_path(settings.storage_url)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None hands transaction control to SQLAlchemy; _begin_immediate then starts each one.
        engine_kwargs = {"connect_args": {"timeout": 60, "isolation_level": None}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    _, callback_arg = _retry_class()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeat_interval is flagged experimental
            storage = RDBStorage(track.database_url(settings.storage_url), engine_kwargs=engine_kwargs,
                                 heartbeat_interval=settings.heartbeat_interval, grace_period=settings.grace_period,
                                 **{callback_arg: LostTrialCallback(settings.tracking_uri)})
    except Exception as e:  # noqa: BLE001 - a bad URL, a missing driver or an unreachable server
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"storage={_redact(settings.storage_url)!r} is not usable ({reason[:200]}); accepted: "
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


# -- cells and labels ----------------------------------------------------------------------------


def cell_label(space: Space, params: dict[str, Any]) -> str:
    """A trial's variant label: the swept values except the seed, joined by ``,`` (e.g. ``sru_cru``)."""
    parts = [_fmt(params[k]) for k in space.swept_keys() if k in params and k != "seed"]
    return ",".join(parts) if parts else "base"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cell_key(cell: dict[str, Any]) -> tuple:
    # Exact values (not the rounded label): 0.12345 and 0.12346 are different cells.
    return tuple(sorted(cell.items()))


def _retried_numbers(trials) -> set[int]:
    """Numbers of trials that were enqueued again after their worker died."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def _occupies(trial) -> bool:
    """Whether a trial holds its cell: queued, running, done, or failed for good."""
    from optuna.trial import TrialState

    if trial.user_attrs.get(SURPLUS_ATTR):
        return False
    if trial.state in (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.user_attrs.get(FAILURE_ATTR) in FINAL_FAILURES


# -- the parent's set-up -------------------------------------------------------------------------


def prepare(settings: StudySettings) -> tuple[Any, str, list[tuple[dict, str]]]:
    """Create schemas, the study, the experiment and the parent run; enqueue missing grid cells.

    Runs once in the parent before any worker starts (concurrent first use of a fresh SQLite store fails).
    Returns the study, the parent run id and the skipped cells with their reasons.
    """
    study = load_study(settings, create=True)
    check_same_settings(study, settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # set_metric_names is flagged experimental
        study.set_metric_names(list(settings.space.objectives))
    client = track.client(settings.tracking_uri)
    experiment_id = track.ensure_experiment(client, settings.study_name)
    parent_id = _parent_run(client, experiment_id, settings)
    recover_lost_runs(study, settings.tracking_uri)
    skipped: list[tuple[dict, str]] = []
    if settings.space.is_grid:
        skipped = enqueue_missing_cells(study, settings)
    _log_skipped(client, parent_id, skipped)
    return study, parent_id, skipped


def _settings_record(settings: StudySettings) -> dict[str, Any]:
    """What every trial of the study shares (the space's [base] and --set), normalised to MLflow param values."""
    params = RunConfig.from_dict(settings.space.fixed_settings(settings.overrides)).to_params()
    params.pop("experiment", None)
    params.pop("run_name", None)
    return json.loads(json.dumps(params, default=str))


def check_same_settings(study, settings: StudySettings) -> None:
    """Record the shared settings on a new study; a rerun with other settings is a ConfigError.

    Without this, ``--set epochs=1`` once and a full run later would report the 1-epoch cells as done.
    """
    record = _settings_record(settings)
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if stored is None:
        study.set_user_attr(SETTINGS_ATTR, record)
        return
    diff = [k for k in sorted(set(stored) & set(record)) if stored[k] != record[k]]
    if diff:
        was = ", ".join(f"{k}={stored[k]}" for k in diff)
        now = ", ".join(f"{k}={record[k]}" for k in diff)
        raise ConfigError(f"study={settings.study_name!r} exists with {was}, this run has {now}; accepted: the same "
                          "settings, or --study-name NEW for a new study")


def _parent_run(client, experiment_id: str, settings: StudySettings) -> str:
    """The study's parent run (reopened on a rerun), named after the study."""
    runs = client.search_runs([experiment_id], filter_string=(
        f"tags.`ablate.role` = 'study' and tags.`optuna.study` = '{settings.study_name}'"), max_results=1)
    if runs:
        client.update_run(runs[0].info.run_id, status=track.RUNNING)
        return runs[0].info.run_id
    space = settings.space
    params = {"space": space.name, "sampler": space.sampler, "pruner": space.pruner,
              "objectives": ",".join(space.objectives), "directions": ",".join(space.directions),
              "storage": _redact(settings.storage_url),
              **{f"base.{k}": v for k, v in space.fixed_settings(settings.overrides).items()}}
    run = track.TrackedRun.start(client, experiment_id, settings.study_name, params,
                                 {"ablate.role": "study", "optuna.study": settings.study_name})
    return run.run_id


def check_data(settings: StudySettings) -> None:
    """Raise ConfigError before anything is created when a dataset that a trial needs is not on disk."""
    from ablate.data import check_available

    space = settings.space
    cells = space.cells() if space.is_grid else ([{"variant": v} for v in space.variants] or [{}])
    for data in {space.run_config(cell, settings.overrides).resolved().data for cell in cells}:
        check_available(data)


def cell_problem(settings: StudySettings, cell: dict[str, Any]) -> str | None:
    """Why a cell cannot be built (a layer rule it breaks), or None when it can."""
    import torch

    from ablate.models import build_model

    try:
        cfg = settings.space.run_config(cell, settings.overrides, settings.study_name).resolved()
        with torch.device("meta"):  # validation needs shapes, not memory
            build_model(cfg.model)
    except ConfigError as e:
        return str(e)
    return None


def enqueue_missing_cells(study, settings: StudySettings) -> list[tuple[dict, str]]:
    """Enqueue every buildable cell that no trial holds yet (up to ``n_trials`` new ones); return skipped cells."""
    trials = study.get_trials(deepcopy=False)
    taken = {_cell_key(t.user_attrs[CELL_ATTR]) for t in trials if CELL_ATTR in t.user_attrs and _occupies(t)}
    skipped = []
    budget = settings.n_trials
    for cell in settings.space.cells():
        if _cell_key(cell) in taken:
            continue
        problem = cell_problem(settings, cell)
        if problem:
            skipped.append((cell, problem))
            continue
        if budget is not None and budget <= 0:
            break
        study.enqueue_trial(cell, user_attrs={CELL_ATTR: cell, LABEL_ATTR: cell_label(settings.space, cell)})
        budget = None if budget is None else budget - 1
    return skipped


def _log_skipped(client, parent_id: str, skipped: list[tuple[dict, str]]) -> None:
    """Say why cells were skipped: one line each on stderr and ``skipped_cells.csv`` on the parent run."""
    if not skipped:
        return
    import tempfile

    import pandas as pd

    for cell, reason in skipped:
        print(f"skipped {cell}: {reason}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "skipped_cells.csv")
        pd.DataFrame([{**cell, "reason": reason} for cell, reason in skipped]).to_csv(path, index=False)
        client.log_artifact(parent_id, str(path))


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
        f"attributes.status = '{track.RUNNING}' and tags.`optuna.study` = '{study.study_name}' "
        "and tags.`ablate.role` = 'run'"))
    return sum(mark_run_lost(client, run.info.run_id) for run in running
               if int(run.data.tags.get("optuna.trial_number", -1)) in finished)


# -- the objective -------------------------------------------------------------------------------


def make_objective(settings: StudySettings, parent_id: str) -> Callable:
    """The Optuna objective: take the trial's cell, train it tracked (nested under the parent), report each epoch."""
    import optuna

    from ablate.train import run_training

    space = settings.space

    def objective(trial: optuna.Trial):
        cell = _claim_cell(trial, space) if space.is_grid else _sample(trial, space)
        if cell is None:  # nothing to train: another worker took the last cell, or an earlier trial holds it
            trial.set_user_attr(SURPLUS_ATTR, True)
            raise optuna.TrialPruned("no cell left for this trial")
        label = cell_label(space, cell)
        trial.set_user_attr(CELL_ATTR, cell)
        trial.set_user_attr(LABEL_ATTR, label)
        cfg = space.run_config(cell, settings.overrides, settings.study_name)
        seed_suffix = f"-seed{cell['seed']}" if space.seeds and "seed" in cell else ""
        primary = space.objectives[0]
        started: list[str] = []

        def on_start(run_id: str) -> None:
            started.append(run_id)
            trial.set_user_attr(RUN_ID_ATTR, run_id)

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            trial.set_user_attr(EPOCHS_ATTR, epoch + 1)
            if space.multi_objective:
                return  # Optuna cannot prune multi-objective trials
            trial.report(metrics[primary], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        try:
            result = run_training(
                cfg, tracking_uri=settings.tracking_uri, parent_run_id=parent_id,
                run_name=f"{settings.study_name}-{trial.number}-{label}{seed_suffix}",
                tags={"optuna.study": settings.study_name, "optuna.trial_number": str(trial.number),
                      "ablate.variant": label},
                on_epoch=on_epoch, on_start=on_start, progress=False)
        except optuna.TrialPruned:
            raise  # run_training ended the run KILLED with optuna.state=PRUNED
        except Exception as e:
            trial.set_user_attr(FAILURE_ATTR, type(e).__name__)
            if started:
                track.client(settings.tracking_uri).set_tag(started[0], "optuna.state", "FAIL")
            raise
        trial.set_user_attr(EPOCHS_ATTR, result.epochs_run)
        client = track.client(settings.tracking_uri)
        if result.status != track.FINISHED:
            # A non-finite loss is a result, not a crash: Optuna records FAIL (from the NaN) without a traceback.
            trial.set_user_attr(FAILURE_ATTR, "nonfinite_loss")
            client.set_tag(result.run_id, "optuna.state", "FAIL")
            return _nan(space)
        values = [_objective_value(o, result.final, cfg) for o in space.objectives]
        if not all(math.isfinite(v) for v in values):
            trial.set_user_attr(FAILURE_ATTR, "nonfinite_objective")
            client.set_tag(result.run_id, "optuna.state", "FAIL")
            return _nan(space)
        client.set_tag(result.run_id, "optuna.state", "COMPLETE")
        return values[0] if len(values) == 1 else tuple(values)

    return objective


def _nan(space: Space):
    return float("nan") if len(space.objectives) == 1 else tuple(float("nan") for _ in space.objectives)


def _claim_cell(trial, space: Space) -> dict[str, Any] | None:
    """The enqueued cell of a popped grid trial, or None (a fresh trial, or a cell an earlier trial holds)."""
    cell = trial.user_attrs.get(CELL_ATTR)
    if cell is None:
        return None
    key = _cell_key(cell)
    for other in trial.study.get_trials(deepcopy=False):
        held = other.user_attrs.get(CELL_ATTR)
        if other.number < trial.number and held is not None and _cell_key(held) == key and _occupies(other):
            return None
    axes = space.axes()
    # The whole axis as choices (the enqueued value is what Optuna returns), so every trial shares one distribution.
    return {k: trial.suggest_categorical(k, axes[k] if v in axes.get(k, []) else [v]) for k, v in cell.items()}


def _sample(trial, space: Space) -> dict[str, Any]:
    """A sampled trial's params (a retried trial gets its original ones back from Optuna)."""
    params: dict[str, Any] = {}
    if space.variants:
        params["variant"] = trial.suggest_categorical("variant", list(space.variants))
    for key, dist in space.params.items():
        if isinstance(dist, Range):
            if dist.integer:
                params[key] = trial.suggest_int(key, int(dist.low), int(dist.high), step=int(dist.step or 1),
                                                log=dist.log)
            else:
                params[key] = trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            params[key] = trial.suggest_categorical(key, dist)
    if space.seeds:
        params["seed"] = trial.suggest_categorical("seed", list(space.seeds))
    return params


def _objective_value(name: str, final: dict[str, float], cfg) -> float:
    if name in STATIC_OBJECTIVES:
        from ablate.models import build_model
        from ablate.profile import count_macs, count_params

        resolved = cfg.resolved()
        model = build_model(resolved.model)
        if name == "params":
            return float(count_params(model))
        return float(count_macs(model, resolved.data.image_size))
    value = final.get(name, float("nan"))
    return float(value) if math.isfinite(value) else float("nan")


# -- workers -------------------------------------------------------------------------------------


def _next_step(study, settings: StudySettings) -> str:
    """``run`` (a trial to pop or sample), ``wait`` (others still run: their cells may come back) or ``done``."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    live = [t for t in trials if not t.user_attrs.get(SURPLUS_ATTR)]
    if any(t.state == TrialState.WAITING for t in live):
        return "run"
    if not settings.space.is_grid:
        retried = _retried_numbers(trials)
        counted = [t for t in live if t.number not in retried]
        if len(counted) < (settings.n_trials or settings.space.n_trials):
            return "run"
    if any(t.state == TrialState.RUNNING for t in live):
        return "wait"
    return "done"


def run_worker(settings: StudySettings, parent_id: str, on_progress: Callable[[], None] | None = None,
               study=None) -> None:
    """Run trials until the study has none left (grid: every enqueued cell; else n_trials), then wait for the rest.

    Waiting for other workers' running trials means a trial whose worker dies is retried here.
    """
    study = study or load_study(settings)
    objective = make_objective(settings, parent_id)
    callbacks = [lambda _study, _trial: on_progress()] if on_progress else []
    while (step := _next_step(study, settings)) != "done":
        if step == "run":
            study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=callbacks, gc_after_trial=True)
        else:
            time.sleep(min(settings.heartbeat_interval, WAIT_POLL_S))
            recover_lost_runs(study, settings.tracking_uri)
            if on_progress:
                on_progress()


def _worker_entry(settings: StudySettings, parent_id: str, threads: int) -> None:
    """A spawned worker process: its own threads (and GPU when several are visible)."""
    import torch

    torch.set_num_threads(threads)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    run_worker(settings, parent_id)


def run_study(settings: StudySettings) -> Any:
    """Prepare, run the workers (in-process for one), end the parent run; returns the study.

    The parent run ends FINISHED, KILLED on an interrupt, FAILED when a worker process crashed.
    """
    study, parent_id, _ = prepare(settings)
    bar = _TrialBar(study, settings)
    status = track.FAILED
    try:
        if settings.workers == 1:
            run_worker(settings, parent_id, on_progress=bar.refresh, study=study)
            crashed = 0
        else:
            crashed = _run_processes(settings, parent_id, bar)
        recover_lost_runs(study, settings.tracking_uri)
        status = track.FAILED if crashed else track.FINISHED
    except KeyboardInterrupt:
        status = track.KILLED
        raise
    finally:
        bar.close()
        track.client(settings.tracking_uri).set_terminated(parent_id, status=status)
    return study


def _run_processes(settings: StudySettings, parent_id: str, bar: "_TrialBar") -> int:
    """Run ``settings.workers`` spawned workers to the end; returns how many exited with an error."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    gpus = _visible_gpus()
    threads = max(1, (os.cpu_count() or 1) // settings.workers)
    procs = []
    for i in range(settings.workers):
        gpu = gpus[i % len(gpus)] if len(gpus) > 1 else None
        procs.append(_spawn(ctx, settings, parent_id, i, threads, gpu))
    try:
        while any(p.is_alive() for p in procs):
            bar.refresh()
            time.sleep(1.0)
    except KeyboardInterrupt:
        # Ctrl-C reached the workers too: give them time to end their runs KILLED before stopping them.
        for p in procs:
            p.join(timeout=30)
        for p in procs:
            if p.is_alive():
                p.terminate()
        raise
    finally:
        for p in procs:
            p.join()
    crashed = [p for p in procs if p.exitcode != 0]
    for p in crashed:
        print(f"ablate: {p.name} exited with status {p.exitcode}", file=sys.stderr)
    return len(crashed)


def _spawn(ctx, settings: StudySettings, parent_id: str, index: int, threads: int, gpu: str | None):
    """Start one worker; with several GPUs it sees only ``gpu`` (set around the start, inherited by the child)."""
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        p = ctx.Process(target=_worker_entry, args=(settings, parent_id, threads), name=f"ablate-worker-{index}")
        p.start()
    finally:
        if gpu is not None:
            if old is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = old
    return p


def _visible_gpus() -> list[str]:
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no CUDA runtime means no GPUs
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v for v in visible.split(",") if v] if visible else [str(i) for i in range(n)]
    return ids[:n]


# -- progress and results ------------------------------------------------------------------------


def _finished_cells(trials, by_cell: bool) -> tuple[int, int]:
    """(cells whose trial has finished, cells planned), counting a retried trial once; by trial when not by_cell."""
    retried = _retried_numbers(trials)
    live = [t for t in trials if not t.user_attrs.get(SURPLUS_ATTR) and t.number not in retried]

    def key(t) -> tuple:
        return _cell_key(t.user_attrs[CELL_ATTR]) if by_cell and CELL_ATTR in t.user_attrs else (t.number,)

    return len({key(t) for t in live if t.state.is_finished()}), len({key(t) for t in live})


class _TrialBar:
    """A tqdm bar over the study's cells (or trials) with the best value so far."""

    def __init__(self, study, settings: StudySettings):
        from tqdm.auto import tqdm

        self.study = study
        self.settings = settings
        self.bar = tqdm(total=self._total(), unit="trial", desc=settings.study_name, disable=not settings.progress,
                        dynamic_ncols=True, file=sys.stderr)
        self.refresh()

    def _total(self) -> int:
        _, planned = _finished_cells(self.study.get_trials(deepcopy=False), self.settings.space.is_grid)
        if self.settings.space.is_grid:
            return planned
        return max(planned, self.settings.n_trials or self.settings.space.n_trials or 0)

    def refresh(self) -> None:
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        done, _ = _finished_cells(trials, self.settings.space.is_grid)
        self.bar.total = self._total()
        self.bar.n = min(done, self.bar.total)
        complete = [t for t in trials if t.state == TrialState.COMPLETE and not t.user_attrs.get(SURPLUS_ATTR)]
        if complete and not self.settings.space.multi_objective:
            pick = max if self.settings.space.directions[0] == "maximize" else min
            best = pick(complete, key=lambda t: t.value)
            self.bar.set_postfix(best=f"{best.value:.4f}", label=best.user_attrs.get(LABEL_ATTR, ""), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.refresh()
        self.bar.close()


def pending_trials(study) -> int:
    """Trials still queued or running (a finished study has none)."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
               if not t.user_attrs.get(SURPLUS_ATTR))


def trial_table(study) -> "Any":
    """One row per trial: number, label, seed, state, epochs run, objective value(s), failure, MLflow run id."""
    import pandas as pd

    trials = study.get_trials(deepcopy=False)
    retried = _retried_numbers(trials)
    names = study.metric_names or (["val_acc"] if len(study.directions) == 1 else
                                   [f"value{i}" for i in range(len(study.directions))])
    rows = []
    for t in trials:
        if t.user_attrs.get(SURPLUS_ATTR):
            continue
        values = t.values or []
        cell = t.user_attrs.get(CELL_ATTR) or {}
        row = {"trial": t.number, "label": t.user_attrs.get(LABEL_ATTR, ""), "seed": cell.get("seed", ""),
               "state": t.state.name, "epochs": t.user_attrs.get(EPOCHS_ATTR, 0)}
        for i, name in enumerate(names):
            row[name] = values[i] if i < len(values) else float("nan")
        row["failure"] = t.user_attrs.get(FAILURE_ATTR) or (f"{LOST} (retried)" if t.number in retried else "")
        row["mlflow_run_id"] = t.user_attrs.get(RUN_ID_ATTR, "")
        rows.append(row)
    return pd.DataFrame(rows)


def format_trial_table(study) -> str:
    """The trial table as text (columns without content dropped)."""
    df = trial_table(study)
    if df.empty:
        return "no trials yet"
    for column in ("failure", "seed"):
        if (df[column] == "").all():
            df = df.drop(columns=[column])
    return df.to_string(index=False, float_format=lambda v: f"{v:.4f}")
