"""Running a study: the parent's set-up, workers (in-process or spawned, one GPU each) and the progress bar.

Coordination is Optuna's storage, nothing home-made: workers pop enqueued trials, and workers with nothing left
to pop wait for running trials, so they also pick up the retry of a trial whose worker died. One MLflow parent
run per study holds one nested child run per trial.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
import warnings
from typing import Any, Callable

from ablate import track
from ablate.device import CPU_SHARE_ENV
from ablate.errors import redact_url
from ablate.names import (
    FAILURE_ATTR,
    LABEL_ATTR,
    OPTUNA_STATE_TAG,
    OPTUNA_STUDY_TAG,
    ROLE_STUDY,
    ROLE_TAG,
    RUN_ID_ATTR,
    SURPLUS_ATTR,
)
from ablate.study.grid import (
    check_cells,
    claim_slot,
    enqueue_missing_cells,
    enqueue_missing_slots,
    finished_cells,
    log_skipped,
)
from ablate.study.objective import make_objective
from ablate.study.settings import StudySettings, check_same_settings
from ablate.study.storage import load_study, recover_lost_runs

#: Seconds between looks at the store while a worker waits for other workers' trials.
WAIT_POLL_S = 2
#: Exit status of a worker process stopped by Ctrl-C (the shell's 128 + SIGINT).
INTERRUPTED_EXIT = 130


def prepare(settings: StudySettings) -> tuple[Any, str, list[tuple[dict, str]]]:
    """Create schemas, the study, the experiment and the parent run; enqueue missing grid cells (or the missing
    places of a sampled study).

    Runs in the parent before any worker starts; a ``--set`` that makes a grid cell unbuildable stops it before
    anything is created. Returns the study, the parent run id and the skipped cells with their reasons.
    """
    check_cells(settings)
    study = load_study(settings, create=True)
    check_same_settings(study, settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # set_metric_names is flagged experimental
        study.set_metric_names(list(settings.space.objectives))
    client = track.client(settings.tracking_uri)
    experiment_id = track.ensure_experiment(client, settings.study_name)
    parent_id = _parent_run(client, experiment_id, settings)
    describe_for_ui(client, experiment_id, parent_id, settings)
    recover_lost_runs(study, settings.tracking_uri)
    skipped: list[tuple[dict, str]] = []
    if settings.space.is_grid:
        skipped = enqueue_missing_cells(study, settings)
    else:
        enqueue_missing_slots(study, settings)
    log_skipped(client, parent_id, skipped)
    return study, parent_id, skipped


def _parent_run(client, experiment_id: str, settings: StudySettings) -> str:
    """The study's parent run (reopened on a rerun), named after the study."""
    runs = client.search_runs([experiment_id], filter_string=(
        f"tags.`{ROLE_TAG}` = '{ROLE_STUDY}' and tags.`{OPTUNA_STUDY_TAG}` = '{settings.study_name}'"), max_results=1)
    if runs:
        client.update_run(runs[0].info.run_id, status=track.RUNNING)
        return runs[0].info.run_id
    space = settings.space
    params = {"space": space.name, "sampler": space.sampler, "pruner": space.pruner,
              "objectives": ",".join(space.objectives), "directions": ",".join(space.directions),
              "storage": redact_url(settings.storage_url),
              **{f"base.{k}": v for k, v in space.fixed_settings(settings.overrides).items()}}
    from ablate.ui import source_tags

    run = track.TrackedRun.start(client, experiment_id, settings.study_name, params,
                                 {ROLE_TAG: ROLE_STUDY, OPTUNA_STUDY_TAG: settings.study_name,
                                  **source_tags("ablate study")})
    return run.run_id


def view_columns(space) -> tuple[list[str], str, bool]:
    """(variant params, primary metric, maximize) of a study's saved view: the swept params (less the seed),
    sorted by the first objective (val_acc when that is a static one such as params or MACs)."""
    from ablate.study.spaces import STATIC_OBJECTIVES

    params = [k for k in space.params if k != "seed"]
    if space.variants:  # a named variant sets several params: show the ones any variant sets
        params += [k for v in space.variants.values() for k in v if k not in params]
    primary, direction = space.objectives[0], space.directions[0]
    if primary in STATIC_OBJECTIVES:
        primary, direction = "val_acc", "maximize"
    return params, primary, direction == "maximize"


def describe_for_ui(client, experiment_id: str, parent_id: str, settings: StudySettings) -> None:
    """What makes the study readable in MLflow's UI (docs/ui.md): the saved comparison view and the model-training
    kind on the experiment, its description, and the study run's note (the report link comes with the report)."""
    import mlflow

    from ablate.names import SUMMARY_METRICS
    from ablate.ui import (
        NOTE_TAG, SAVED_VIEW_ID, comparison_view_tags, experiment_description, experiment_kind_tags, parent_note,
        runs_url, ui_base,
    )

    params, primary, maximize = view_columns(settings.space)
    view = comparison_view_tags(mlflow.__version__, params, SUMMARY_METRICS, primary_metric=primary,
                                maximize=maximize, extra_metrics=())
    report = f"analysis report --experiment {shlex.quote(settings.study_name)}"
    description = experiment_description(settings.study_name, variant_params=params, primary_metric=primary,
                                         view_name="Compare variants" if view else None, report_command=report)
    for key, value in {**view, **experiment_kind_tags(), NOTE_TAG: description}.items():
        client.set_experiment_tag(experiment_id, key, value)
    view_url = runs_url(ui_base(settings.tracking_uri), experiment_id, SAVED_VIEW_ID if view else None)
    if NOTE_TAG not in client.get_run(parent_id).data.tags:  # a rerun keeps the note a report wrote
        client.set_tag(parent_id, NOTE_TAG, parent_note(None, study=settings.study_name, view_url=view_url,
                                                        report_command=report))


def _next_step(study) -> str:
    """``run`` (an enqueued trial to pop), ``wait`` (others still run: their trials may come back) or ``done``."""
    from optuna.trial import TrialState

    live = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SURPLUS_ATTR)]
    if any(t.state == TrialState.WAITING for t in live):
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
    objective = _guarded(make_objective(settings, parent_id), settings)
    callbacks = [lambda _study, _trial: on_progress()] if on_progress else []
    while (step := _next_step(study)) != "done":
        if step == "run":
            study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=callbacks, gc_after_trial=True)
        else:
            time.sleep(min(settings.heartbeat_interval, WAIT_POLL_S))
            recover_lost_runs(study, settings.tracking_uri)
            if on_progress:
                on_progress()


class _QuietInterrupt(logging.Filter):
    """Drops Optuna's warning and traceback about a trial stopped by Ctrl-C: the command says so in one line."""

    def __init__(self) -> None:
        super().__init__()
        self.trials: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(record.getMessage().startswith(f"Trial {n} failed") for n in self.trials)


_QUIET_INTERRUPT = _QuietInterrupt()


def _guarded(objective: Callable, settings: StudySettings) -> Callable:
    """The objective, plus what every trial needs around it: a sampled trial must hold one of the study's places,
    and a trial stopped by Ctrl-C is recorded as interrupted (trial attribute, run tag) before Optuna fails it."""
    import optuna

    logging.getLogger("optuna.study._optimize").addFilter(_QUIET_INTERRUPT)

    def run(trial: optuna.Trial):
        if not settings.space.is_grid and not claim_slot(trial):
            trial.set_user_attr(SURPLUS_ATTR, True)
            raise optuna.TrialPruned("no place left for this trial")
        try:
            return objective(trial)
        except KeyboardInterrupt:
            _QUIET_INTERRUPT.trials.add(trial.number)
            trial.set_user_attr(FAILURE_ATTR, track.INTERRUPTED)
            run_id = trial.user_attrs.get(RUN_ID_ATTR)
            if run_id:
                track.client(settings.tracking_uri).set_tag(run_id, OPTUNA_STATE_TAG, "FAIL")
            raise

    return run


def _worker_entry(settings: StudySettings, parent_id: str, threads: int) -> None:
    """A spawned worker process: its own threads (and GPU when several are visible); Ctrl-C ends it quietly."""
    import torch

    torch.set_num_threads(threads)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    try:
        run_worker(settings, parent_id)
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED_EXIT)


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
    """Start one worker; with several GPUs it sees only ``gpu``. Its share of the CPU cores (``threads``) goes in
    ``CPU_SHARE_ENV`` for ``num_workers = "auto"``. Both are set around the start and inherited by the child."""
    env = {CPU_SHARE_ENV: str(threads), **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})}
    old = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        p = ctx.Process(target=_worker_entry, args=(settings, parent_id, threads), name=f"ablate-worker-{index}")
        p.start()
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return p


def _visible_gpus() -> list[str]:
    """The ids of the GPUs this process may use (``CUDA_VISIBLE_DEVICES`` order), empty without CUDA."""
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no CUDA runtime means no GPUs
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v for v in visible.split(",") if v] if visible else [str(i) for i in range(n)]
    return ids[:n]


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
        _, planned = finished_cells(self.study.get_trials(deepcopy=False), self.settings.space.is_grid)
        if self.settings.space.is_grid:
            return planned
        return max(planned, self.settings.n_trials or self.settings.space.n_trials or 0)

    def refresh(self) -> None:
        """Redraw with the current count of finished cells and the best value."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        done, _ = finished_cells(trials, self.settings.space.is_grid)
        self.bar.total = self._total()
        self.bar.n = min(done, self.bar.total)
        complete = [t for t in trials if t.state == TrialState.COMPLETE and not t.user_attrs.get(SURPLUS_ATTR)]
        if complete and not self.settings.space.multi_objective:
            pick = max if self.settings.space.directions[0] == "maximize" else min
            best = pick(complete, key=lambda t: t.value)
            self.bar.set_postfix(best=f"{best.value:.4f}", label=best.user_attrs.get(LABEL_ATTR, ""), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        """A last refresh, then close the bar."""
        self.refresh()
        self.bar.close()
