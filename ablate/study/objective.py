"""The Optuna objective: one trial is one tracked training run (``run_training``) nested under the study's run.

The trial keeps the run id as a user attribute and the run carries ``optuna.study`` / ``optuna.trial_number`` /
``optuna.state`` tags (``docs/tracking.md``). A trial retried after its worker died continues the dead attempt's
run from its last checkpoint, in a new run tagged ``ablate.resumed_from_run`` and ``ablate.resumed_from_epoch``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from ablate import track
from ablate.names import (
    CELL_ATTR,
    EPOCHS_ATTR,
    FAILURE_ATTR,
    LABEL_ATTR,
    OPTUNA_STATE_TAG,
    OPTUNA_STUDY_TAG,
    OPTUNA_TRIAL_TAG,
    RESUME_ATTR,
    RUN_ID_ATTR,
    SURPLUS_ATTR,
    VARIANT_TAG,
)
from ablate.study.grid import cell_label, claim_cell
from ablate.study.settings import StudySettings
from ablate.study.spaces import STATIC_OBJECTIVES, Range, Space
from ablate.ui import RUN_COLOR_TAG, run_name, source_tags, variant_color


def make_objective(settings: StudySettings, parent_id: str) -> Callable:
    """The Optuna objective: take the trial's cell, train it tracked (nested under the parent), report each epoch."""
    import optuna

    from ablate.train import run_training

    space = settings.space
    labels = study_labels(space)

    def objective(trial: optuna.Trial):
        cell = claim_cell(trial, space) if space.is_grid else _sample(trial, space)
        if cell is None:  # nothing to train: another worker took the last cell, or an earlier trial holds it
            trial.set_user_attr(SURPLUS_ATTR, True)
            raise optuna.TrialPruned("no cell left for this trial")
        label = cell_label(space, cell)
        trial.set_user_attr(CELL_ATTR, cell)
        trial.set_user_attr(LABEL_ATTR, label)
        cfg = space.run_config(cell, settings.overrides, settings.study_name)
        seed = cell["seed"] if space.seeds and "seed" in cell else None
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
                run_name=run_name(label, seed),
                tags={OPTUNA_STUDY_TAG: settings.study_name, OPTUNA_TRIAL_TAG: str(trial.number), VARIANT_TAG: label,
                      RUN_COLOR_TAG: variant_color(label, labels), **source_tags("ablate study")},
                on_epoch=on_epoch, on_start=on_start, continue_from=trial.user_attrs.get(RESUME_ATTR),
                progress=False)
        except optuna.TrialPruned:
            raise  # run_training ended the run KILLED with optuna.state=PRUNED
        except Exception as e:
            trial.set_user_attr(FAILURE_ATTR, type(e).__name__)
            if started:
                track.client(settings.tracking_uri).set_tag(started[0], OPTUNA_STATE_TAG, "FAIL")
            raise
        trial.set_user_attr(EPOCHS_ATTR, result.epochs_run)
        client = track.client(settings.tracking_uri)
        if result.status != track.FINISHED:
            # A non-finite loss is a result, not a crash: Optuna records FAIL (from the NaN) without a traceback.
            trial.set_user_attr(FAILURE_ATTR, "nonfinite_loss")
            client.set_tag(result.run_id, OPTUNA_STATE_TAG, "FAIL")
            return _nan(space)
        values = [objective_value(o, result.final, cfg) for o in space.objectives]
        if not all(math.isfinite(v) for v in values):
            trial.set_user_attr(FAILURE_ATTR, "nonfinite_objective")
            client.set_tag(result.run_id, OPTUNA_STATE_TAG, "FAIL")
            return _nan(space)
        client.set_tag(result.run_id, OPTUNA_STATE_TAG, "COMPLETE")
        return values[0] if len(values) == 1 else tuple(values)

    return objective


def study_labels(space: Space) -> list[str]:
    """The variant labels a study can have (a grid's cells; a sampled space's named variants or categorical
    values), so that each variant's colour does not depend on which trials ran first."""
    if space.is_grid:
        return [cell_label(space, cell) for cell in space.cells()]
    if space.variants and len(space.params) == 0:
        return list(space.variants)
    return []


def _nan(space: Space):
    return float("nan") if len(space.objectives) == 1 else tuple(float("nan") for _ in space.objectives)


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


def objective_value(name: str, final: dict[str, float], cfg) -> float:
    """One objective of a finished run: a static one (params, MACs) from the model, else the last epoch's metric."""
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
