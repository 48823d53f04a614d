"""How a space is run: where its study is stored, with which workers, and the settings every trial shares."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablate import track
from ablate.config import RunConfig
from ablate.errors import ConfigError
from ablate.names import SETTINGS_ATTR
from ablate.study.spaces import Space

DEFAULT_STORAGE_FILE = "optuna.db"


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


def check_data(settings: StudySettings) -> None:
    """Raise ConfigError before anything is created when a dataset that a trial needs is not on disk."""
    from ablate.data import check_available

    space = settings.space
    cells = space.cells() if space.is_grid else ([{"variant": v} for v in space.variants] or [{}])
    for data in {space.run_config(cell, settings.overrides).resolved().data for cell in cells}:
        check_available(data)
