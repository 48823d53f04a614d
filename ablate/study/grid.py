"""Grid cells and sampled places: labels, which trial holds a cell or place, enqueueing the missing ones, and the
cells a space cannot build.

Every trial is *enqueued*: the parent puts every missing grid cell (or, for a sampled space, every missing one of
its ``n_trials`` places, without params) in the storage as a WAITING trial, and workers only pop WAITING trials.
So a cell is trained once and a sampled study runs exactly ``n_trials``, also with many workers on many machines
(Optuna's GridSampler alone repeats cells under parallel workers, and workers that each create a trial while the
count looks short overshoot). A popped cell or place that an earlier trial already holds is given up (two parents
that enqueued at the same time).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import Any

from ablate.config import ModelConfig, blame_user_keys
from ablate.errors import ConfigError
from ablate.names import CELL_ATTR, FAILURE_ATTR, LABEL_ATTR, SKIPPED_CELLS_ARTIFACT, SLOT_ATTR, SURPLUS_ATTR
from ablate.study.settings import StudySettings
from ablate.study.spaces import Space

#: Failures that a retry cannot fix (the run is deterministic): the cell is done, and a rerun does not train it.
FINAL_FAILURES = ("nonfinite_loss", "nonfinite_objective")


def cell_label(space: Space, params: dict[str, Any]) -> str:
    """A trial's variant label: the swept values except the seed, joined by ``,`` (e.g. ``sru_cru``)."""
    parts = [_fmt(params[k]) for k in space.swept_keys() if k in params and k != "seed"]
    return ",".join(parts) if parts else "base"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def cell_key(cell: dict[str, Any]) -> tuple:
    """A hashable key of a cell's exact values (not the rounded label: 0.12345 and 0.12346 are different cells)."""
    return tuple(sorted(cell.items()))


def retried_numbers(trials) -> set[int]:
    """Numbers of trials that were enqueued again after their worker died."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def occupies(trial) -> bool:
    """Whether a trial holds its cell (or place): queued, running, done, or failed for good."""
    from optuna.trial import TrialState

    if trial.user_attrs.get(SURPLUS_ATTR):
        return False
    if trial.state in (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.user_attrs.get(FAILURE_ATTR) in FINAL_FAILURES


def finished_cells(trials, by_cell: bool) -> tuple[int, int]:
    """(cells whose trial has finished, cells planned), counting a retried trial once; by trial when not by_cell."""
    retried = retried_numbers(trials)
    live = [t for t in trials if not t.user_attrs.get(SURPLUS_ATTR) and t.number not in retried]

    def key(t) -> tuple:
        return cell_key(t.user_attrs[CELL_ATTR]) if by_cell and CELL_ATTR in t.user_attrs else (t.number,)

    return len({key(t) for t in live if t.state.is_finished()}), len({key(t) for t in live})


def cell_problem(settings: StudySettings, cell: dict[str, Any]) -> str | None:
    """Why a cell cannot be built (a layer rule it breaks), or None when it can."""
    try:
        cfg = settings.space.run_config(cell, settings.overrides, settings.study_name).resolved()
    except ConfigError as e:
        return str(e)
    return model_problem(cfg.model)


@functools.lru_cache(maxsize=1024)
def model_problem(model: ModelConfig) -> str | None:
    """Why ``model`` cannot be built, or None; cached, since cells that differ only in seed share a model."""
    import torch

    from ablate.models import build_model

    try:
        with torch.device("meta"):  # validation needs shapes, not memory
            build_model(model)
    except ConfigError as e:
        return str(e)
    return None


def check_cells(settings: StudySettings) -> None:
    """Raise ConfigError, before anything is created, when ``--set`` makes a grid cell unbuildable that the space
    alone builds, or when no cell can be built. Cells the space itself cannot build are skipped (and logged)."""
    space = settings.space
    if not space.is_grid:
        return
    cells = space.cells()
    problems = [cell_problem(settings, cell) for cell in cells]
    if settings.overrides:
        bare = dataclasses.replace(settings, overrides={})
        given = " ".join(f"{k}={v}" for k, v in settings.overrides.items())
        for cell, problem in zip(cells, problems):
            if problem and cell_problem(bare, cell) is None:
                reason = blame_user_keys(ConfigError(problem), settings.overrides)
                raise ConfigError(f"--set {given} makes cell {cell} of space {space.name!r} unbuildable: {reason}; "
                                  "accepted: settings that every cell the space builds can build")
    if cells and all(problems):
        raise ConfigError(f"space {space.name!r} has no cell that can be built ({len(cells)} cells; the first: "
                          f"{problems[0]}); accepted: a space and --set with at least one buildable cell")


def enqueue_missing_cells(study, settings: StudySettings) -> list[tuple[dict, str]]:
    """Enqueue every buildable cell that no trial holds yet (up to ``n_trials`` new ones); return skipped cells."""
    trials = study.get_trials(deepcopy=False)
    taken = {cell_key(t.user_attrs[CELL_ATTR]) for t in trials if CELL_ATTR in t.user_attrs and occupies(t)}
    skipped = []
    budget = settings.n_trials
    for cell in settings.space.cells():
        if cell_key(cell) in taken:
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


def enqueue_missing_slots(study, settings: StudySettings) -> int:
    """Enqueue a params-free trial for every place of a sampled study's ``n_trials`` that no trial holds; returns
    how many. The sampler fills in the params when a worker pops one. Like a cell, a place whose trial failed
    for a reason other than FINAL_FAILURES (an exception, Ctrl-C) is free again for a rerun."""
    n_trials = settings.n_trials or settings.space.n_trials
    holders = [t for t in study.get_trials(deepcopy=False) if occupies(t)]
    held = {t.user_attrs[SLOT_ATTR] for t in holders if SLOT_ATTR in t.user_attrs}
    free = [i for i in range(n_trials) if i not in held][:max(0, n_trials - len(holders))]
    for slot in free:
        study.enqueue_trial({}, user_attrs={SLOT_ATTR: slot})
    return len(free)


def claim_slot(trial) -> bool:
    """Whether a popped trial of a sampled study holds its place: enqueued with one that no earlier trial holds."""
    slot = trial.user_attrs.get(SLOT_ATTR)
    if slot is None:
        return False  # created by a worker whose pop found the queue empty
    return not any(other.number < trial.number and other.user_attrs.get(SLOT_ATTR) == slot and occupies(other)
                   for other in trial.study.get_trials(deepcopy=False))


def log_skipped(client, parent_id: str, skipped: list[tuple[dict, str]]) -> None:
    """Say why cells were skipped: one line each on stderr and ``skipped_cells.csv`` on the parent run."""
    if not skipped:
        return
    import tempfile

    import pandas as pd

    for cell, reason in skipped:
        print(f"skipped {cell}: {reason}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, SKIPPED_CELLS_ARTIFACT)
        pd.DataFrame([{**cell, "reason": reason} for cell, reason in skipped]).to_csv(path, index=False)
        client.log_artifact(parent_id, str(path))


def claim_cell(trial, space: Space) -> dict[str, Any] | None:
    """The enqueued cell of a popped grid trial, or None (a fresh trial, or a cell an earlier trial holds)."""
    cell = trial.user_attrs.get(CELL_ATTR)
    if cell is None:
        return None
    key = cell_key(cell)
    for other in trial.study.get_trials(deepcopy=False):
        held = other.user_attrs.get(CELL_ATTR)
        if other.number < trial.number and held is not None and cell_key(held) == key and occupies(other):
            return None
    axes = space.axes()
    # The whole axis as choices (the enqueued value is what Optuna returns), so every trial shares one distribution.
    return {k: trial.suggest_categorical(k, axes[k] if v in axes.get(k, []) else [v]) for k, v in cell.items()}
