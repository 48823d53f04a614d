"""Optuna studies over SCConv spaces: one trial = one tracked training run.

A space (``studies/NAME.toml``, read by :mod:`ablate.study.spaces`; format in ``docs/spaces.md``) becomes a
study in an Optuna RDB storage (:mod:`~ablate.study.storage`). Grid cells are enqueued once and claimed by
workers (:mod:`~ablate.study.grid`), each trial trains through :mod:`~ablate.study.objective`, and
:mod:`~ablate.study.workers` runs the workers; :mod:`~ablate.study.table` shows the result.
"""

from ablate.study.spaces import (
    SPACES_DIR,
    STATIC_OBJECTIVES,
    Range,
    Space,
    available,
    check_study_name,
    load_space,
    parse_space,
    space_path,
)
from ablate.study.settings import DEFAULT_STORAGE_FILE, StudySettings, check_data, check_same_settings, resolve_storage
from ablate.study.storage import (
    LOST,
    MAX_RETRY,
    LostTrialCallback,
    load_study,
    make_pruner,
    make_sampler,
    make_storage,
    mark_run_lost,
    recover_lost_runs,
)
from ablate.study.grid import FINAL_FAILURES, cell_key, cell_label, cell_problem, enqueue_missing_cells
from ablate.study.objective import make_objective
from ablate.study.workers import prepare, run_study, run_worker
from ablate.study.table import format_trial_table, pending_trials, trial_table

__all__ = [
    "DEFAULT_STORAGE_FILE", "FINAL_FAILURES", "LOST", "MAX_RETRY", "SPACES_DIR", "STATIC_OBJECTIVES",
    "LostTrialCallback", "Range", "Space", "StudySettings", "available", "cell_key", "cell_label", "cell_problem",
    "check_data", "check_same_settings", "check_study_name", "enqueue_missing_cells", "format_trial_table",
    "load_space", "load_study", "make_objective", "make_pruner", "make_sampler", "make_storage", "mark_run_lost",
    "parse_space", "pending_trials", "prepare", "recover_lost_runs", "resolve_storage", "run_study", "run_worker",
    "space_path", "trial_table",
]
