"""The trial table of a study: one row per trial that stands for a cell, as a frame or as text."""

from __future__ import annotations

from collections import Counter
from typing import Any

from ablate.names import CELL_ATTR, EPOCHS_ATTR, FAILURE_ATTR, LABEL_ATTR, RUN_ID_ATTR, SURPLUS_ATTR
from ablate.study.grid import retried_numbers
from ablate.study.storage import LOST


def pending_trials(study) -> int:
    """Trials still queued or running (a finished study has none)."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
               if not t.user_attrs.get(SURPLUS_ATTR))


def failure_summary(study) -> tuple[str | None, bool]:
    """(a line on the trials that failed, or None; whether every finished trial failed), counting a retried
    trial once. A study in which no trial succeeded is a failed command, not a result."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    finished = [t for t in trials if t.state.is_finished() and not t.user_attrs.get(SURPLUS_ATTR)
                and t.number not in retried]
    failed = [t for t in finished if t.state == TrialState.FAIL]
    if not failed:
        return None, False
    reasons = Counter(t.user_attrs.get(FAILURE_ATTR) or "unknown" for t in failed)
    why = ", ".join(f"{reason} x{count}" for reason, count in reasons.most_common())
    every = len(failed) == len(finished)
    head = f"all {len(failed)} finished trials failed" if every else f"{len(failed)} of {len(finished)} finished trials failed"
    return f"{head} ({why}); see the failure column and each run's failure tag", every


def trial_table(study) -> Any:
    """One row per trial: number, label, seed, state, epochs run, objective value(s), failure, MLflow run id."""
    import pandas as pd

    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
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
