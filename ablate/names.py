"""Names of the tracking contract: every MLflow tag, artifact and Optuna attribute the toolkit writes or reads.

One home, so that a writer and a reader can never disagree on a spelling. ``docs/tracking.md`` explains each.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# -- tags on runs ------------------------------------------------------------------------------------------
ROLE_TAG = "ablate.role"  #: what a run is: one of the ROLE_* values below
ROLE_RUN, ROLE_STUDY, ROLE_REPORT = "run", "study", "report"
VARIANT_TAG = "ablate.variant"  #: the variant label of a training run (``RunConfig.label()``)
DEVICE_TAG = "ablate.device"  #: the device a run trained on, in words
GIT_COMMIT_TAG = "ablate.git_commit"  #: the commit of the code that ran (``-dirty`` when changed)
FAILURE_TAG = "failure"  #: why a run ended FAILED or KILLED (exception name, ``nonfinite_loss``, ``worker_lost``)
REPORT_BASELINE_TAG = "ablate.report.baseline"  #: the variant a report compares against
REPORT_GROUP_BY_TAG = "ablate.report.group_by"  #: the params that define a report's groups
REPORT_FROM_EPOCH_TAG = "ablate.report.from_epoch"  #: the first epoch a report's metrics use
REPORT_BEST_VARIANT_TAG = "ablate.report.best_variant"  #: the variant with the highest mean final val_acc
PARENT_RUN_TAG = "mlflow.parentRunId"  #: MLflow's own: nests a trial's run under its study's run
RESUMED_FROM_RUN_TAG = "ablate.resumed_from_run"  #: the run whose checkpoint a run continued (a retried trial)
RESUMED_FROM_EPOCH_TAG = "ablate.resumed_from_epoch"  #: the first epoch a run trained after restoring a checkpoint
COMPILE_CHECK_TAG = "ablate.compile_check"  #: the outcome of a compiled CUDA run's SCConv check (``ablate.nn.compile_check``)

# -- Optuna, mirrored as run tags ---------------------------------------------------------------------------
OPTUNA_STUDY_TAG = "optuna.study"  #: the study a run belongs to
OPTUNA_TRIAL_TAG = "optuna.trial_number"  #: the trial a run trained
OPTUNA_STATE_TAG = "optuna.state"  #: the trial's final state (COMPLETE, PRUNED, FAIL)
FAILURE_ATTR = "failure"  #: Optuna trial user attribute with the failure reason
RUN_ID_ATTR = "mlflow_run_id"  #: Optuna trial user attribute: the MLflow run that trained the trial
CELL_ATTR = "cell"  #: Optuna trial user attribute: the trial's swept values (grid cells are enqueued with it)
LABEL_ATTR = "label"  #: Optuna trial user attribute: the variant label of the trial's cell
EPOCHS_ATTR = "epochs_run"  #: Optuna trial user attribute: epochs trained so far
SURPLUS_ATTR = "ablate_surplus"  #: Optuna trial user attribute: a worker's pop that found no cell left
SLOT_ATTR = "ablate_slot"  #: Optuna trial user attribute: which of a sampled study's n_trials places a trial holds
RESUME_ATTR = "resume_from_run"  #: Optuna trial user attribute: the dead attempt's run a retried trial continues
SETTINGS_ATTR = "ablate_settings"  #: Optuna study user attribute: the settings every trial shares

#: Run params that name or place a run without changing what is trained: the report never groups runs by them,
#: and the data ones among them are left out of a run's dataset digest.
BOOKKEEPING_PARAMS = frozenset(
    {"run_name", "experiment", "data_root", "device", "num_workers", "download", "log_checkpoint", "probe_size",
     "compile", "checkpoint_every_minutes", "num_threads", "decode", "system_metrics", "gate_metrics_per_layer",
     "scconv.recompute"}
)

# -- artifacts of a training run ----------------------------------------------------------------------------
CONFIG_ARTIFACT = "config.json"  #: the run's full RunConfig as JSON
HISTORY_ARTIFACT = "history.csv"  #: one row per epoch, every logged metric
GATE_STATS_ARTIFACT = "gate_stats.csv"  #: per-layer gate statistics per epoch, long form (GATE_STATS_COLUMNS)
GATE_STATS_COLUMNS = ("epoch", "kind", "layer", "stat", "value")  #: the columns of GATE_STATS_ARTIFACT, in order
GATE_HEATMAP_ARTIFACT = "gate_heatmap.html"  #: per-run heatmaps of the per-layer gate statistics (mlflow.log_figure)
PREDICTIONS_ARTIFACT = "val_predictions.npz"  #: per-example predictions and losses per epoch
RECOMPUTE_PLAN_ARTIFACT = "recompute_plan.json"  #: which efficient SCConvs recompute in backward, and their measured cost
CHECKPOINT_DIR = "checkpoint"  #: artifact folder of the checkpoint
CHECKPOINT_NAME = "checkpoint.pt"  #: the checkpoint file inside CHECKPOINT_DIR

# -- artifacts of a study and a report ----------------------------------------------------------------------
SKIPPED_CELLS_ARTIFACT = "skipped_cells.csv"  #: grid cells a space declared unbuildable, on the study run
REPORT_ARTIFACT_DIR = "report"  #: artifact folder of a report (on the study run and the report run)

# -- gate metrics of a training run -------------------------------------------------------------------------
GATE_KINDS = ("sru", "cru")  #: the gate modules whose statistics are logged
_GATE_METRIC = re.compile(rf"^({'|'.join(GATE_KINDS)})/(.+)/([^/]+)$")


class GateKey(NamedTuple):
    """One gate statistic of one layer, logged as the metric ``<kind>/<layer>/<stat>``."""

    kind: str  #: one of GATE_KINDS
    layer: str  #: module path of the owning SCConv, e.g. ``layer1.0.conv2``
    stat: str  #: e.g. ``flip_share`` (docs/scconv.md, "Gate statistics")

    def metric_name(self) -> str:
        """The metric name the statistic is logged under."""
        return f"{self.kind}/{self.layer}/{self.stat}"

    @classmethod
    def parse(cls, name: str) -> GateKey | None:
        """The key of a gate metric name, or None for any other metric."""
        match = _GATE_METRIC.match(name)
        return cls(*match.groups()) if match else None


# -- perturbation sensitivity of a training run (network-level metrics) ------------------------------------
SENS_KINDS = ("out", "loss")  #: output change per unit input change, and loss change per unit eps
SENS_SLOPE_METRIC = "sens/slope"  #: least-squares slope of log(output sensitivity) on log(eps)


def sens_metric(kind: str, eps: float) -> str:
    """The metric name of one sensitivity at relative perturbation ``eps``, e.g. ``sens/out/eps_1e-04``."""
    return f"sens/{kind}/eps_{eps:.0e}"


# -- metrics on runs ---------------------------------------------------------------------------------------
COMPILE_SECONDS_METRIC = "compile_seconds"  #: wall seconds of a compiled model's first training step (its compilation)
SUMMARY_PREFIX = "summary."  #: metrics logged once when a run ends, describing its whole curve
#: The summary metrics of a training run (docs/tracking.md), logged at the last epoch's step.
SUMMARY_METRICS = tuple(SUMMARY_PREFIX + name for name in (
    "best_val_acc", "final_val_acc", "val_loss_resid_sd", "val_loss_spike_count", "peak_memory_mb", "step_seconds"))
