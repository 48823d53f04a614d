"""The report's numbers, as plain frames: ``build_report_data`` reads the runs and computes every table."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ablate.errors import ConfigError
from ablate.names import PREDICTIONS_ARTIFACT
from analysis import churn as churn_mod
from analysis import fluctuation, gates, stats
from analysis.runs import RunSet, assign_variants, list_artifact_paths, load_runs

ALPHA = 0.05
PRIMARY = "val_loss.resid_sd"
KEY_METRICS = ("val_loss.resid_sd", "val_loss.excess_tv", "val_loss.spike_count", "val_acc.resid_sd",
               "val_train_resid_ratio")
#: Metrics compared between variants: the primary, the rest of val loss's fluctuation, one fluctuation metric
#: of each other curve and the run-level ones (with the churn metrics when logged). The other curves' remaining
#: metrics mostly repeat val loss's (val_acc moves with val_loss) and would only widen the exploratory BH
#: family; they stay in run_metrics.csv.
COMPARED = (*(f"val_loss.{m}" for m in fluctuation.CURVE_METRICS), "val_acc.resid_sd", "train_loss.resid_sd",
            "val_train_resid_ratio", "gen_gap_final")
CHURN_METRICS = ("flip_rate_mean", "forgetting_events_per_example", "stable_pred_share_of_change_pooled",
                 "top5_share_of_change_pooled")


@dataclass
class ReportData:
    """Everything the report shows, as plain frames (no figures)."""

    runs: RunSet
    from_epoch: int
    run_metrics: pd.DataFrame
    comparisons: pd.DataFrame
    gates: pd.DataFrame
    layer_stats: pd.DataFrame
    flip_points: pd.DataFrame
    flip_coupling: pd.DataFrame
    gate_association: pd.DataFrame
    churn: pd.DataFrame
    sensitivity: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
    settle_epochs: dict[str, int | None] = field(default_factory=dict)  #: run_id -> settle epoch of val_loss
    window_rule: bool = True  #: True: from_epoch came from the window rule; False: from --from-epoch

    @property
    def baseline(self) -> str:
        return self.runs.baseline

    @property
    def descriptive(self) -> bool:
        """True when no variant has 2 runs: nothing can be tested, so no p-value is printed."""
        return max(self.runs_per_variant().values()) < 2

    def runs_per_variant(self) -> dict[str, int]:
        counts = self.runs.runs["variant"].value_counts()
        return {v: int(counts[v]) for v in self.runs.variants}


def build_report_data(client, experiment: str, group_by: Sequence[str] | None = None, baseline: str | None = None,
                      from_epoch: int | None = None, sensitivity: bool = False) -> ReportData:
    """Read the runs and compute every table; raises ConfigError on bad input, writes nothing.

    ``from_epoch`` None applies the window rule (``window_epochs``); an integer overrides it.
    """
    if from_epoch is not None and from_epoch < 0:
        raise ConfigError(f"--from-epoch={from_epoch!r} is not valid; accepted: an integer >= 0")
    rs = assign_variants(load_runs(client, experiment), group_by, baseline)
    last = int(rs.history["epoch"].max())
    if from_epoch is not None and from_epoch > last:
        raise ConfigError(f"--from-epoch={from_epoch} is not valid; accepted: 0..{last} (the runs have epochs 0..{last})")
    settles = settle_epochs(rs)
    rule = from_epoch is None
    if rule:
        from_epoch = fluctuation.window_start(list(settles.values()), last)
    gate_df = gates.gate_frame(rs.history, rs.runs)
    churn_df = churn_table(client, rs, from_epoch)
    table = run_metric_table(rs, from_epoch, gate_df, churn_df)
    metric_cols = [c for c in table.columns if c in COMPARED or c.startswith("churn.")]
    metric_cols = [c for c in metric_cols if table[c].dtype.kind in "fi"]
    comparisons = stats.compare_groups(table, rs.baseline, "variant", metric_cols,
                                       primary=PRIMARY if PRIMARY in metric_cols else None)
    points = gates.flip_points(gate_df, rs.history, from_epoch)
    association = (gates.gate_association(table.set_index("run_id"), PRIMARY)
                   if any(c.startswith("gate.") for c in table.columns) and PRIMARY in table else pd.DataFrame())
    data = ReportData(
        runs=rs, from_epoch=from_epoch, run_metrics=table, comparisons=comparisons,
        gates=gate_df, layer_stats=gates.layer_epoch_stats(gate_df) if len(gate_df) else pd.DataFrame(),
        flip_points=points, flip_coupling=gates.flip_coupling(points), gate_association=association, churn=churn_df,
        settle_epochs=settles, window_rule=rule,
    )
    if sensitivity:
        data.sensitivity = report_sensitivity(client, rs, data.notes)
    return data


def settle_epochs(rs: RunSet) -> dict[str, int | None]:
    """Per run, the epoch where val_loss's trend is within ``SETTLE_FRACTION`` of its final level (None: too short).

    The report's window starts at the largest of them (``analysis.fluctuation.window_start``), so the
    warm-up transient of the slowest run is left out of every run's metrics alike.
    """
    if "val_loss" not in set(rs.history["metric"]):
        return {}
    wide = rs.wide_history(["val_loss"])
    out = {}
    for run_id, hist in wide.groupby("run_id", sort=False):
        out[run_id] = fluctuation.settle_epoch(hist[["epoch", "val_loss"]], breaks=_breaks(rs, run_id))
    return out


def _breaks(rs: RunSet, run_id: str) -> tuple[int, ...]:
    milestones = rs.params.at[run_id, "milestones"] if "milestones" in rs.params.columns else None
    return fluctuation.parse_breaks(milestones)


def run_metric_table(rs: RunSet, from_epoch: int, gate_df: pd.DataFrame, churn_df: pd.DataFrame) -> pd.DataFrame:
    """One row per run: run_id, variant, seed, the fluctuation metrics, ``churn.*`` and ``gate.*`` columns."""
    curves = [c for c in fluctuation.CURVES if c in set(rs.history["metric"])]
    wide = rs.wide_history(curves)
    rows = []
    for run_id, hist in wide.groupby("run_id", sort=False):
        row = {"run_id": run_id, "variant": rs.runs.at[run_id, "variant"], "seed": rs.runs.at[run_id, "seed"]}
        # A scheduled lr drop is a step in the trend, not fluctuation.
        row.update(fluctuation.run_metrics(hist[["epoch", *curves]], from_epoch, breaks=_breaks(rs, run_id)))
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(churn_df):
        keep = ["run_id", *CHURN_METRICS, "kind"]
        table = table.merge(churn_df[keep].rename(columns=lambda c: c if c == "run_id" else f"churn.{c}"),
                            on="run_id", how="left")
    summary = gates.run_gate_summary(gate_df, from_epoch) if len(gate_df) else pd.DataFrame()
    if len(summary):
        table = table.merge(summary, left_on="run_id", right_index=True, how="left")
    order = {v: i for i, v in enumerate(rs.variants)}
    table = table.sort_values(["variant", "seed"], key=lambda c: c.map(order) if c.name == "variant"
                              else pd.to_numeric(c, errors="coerce"))
    return table.reset_index(drop=True)


def churn_table(client, rs: RunSet, from_epoch: int = 0) -> pd.DataFrame:
    """``churn_summary`` (+ ``kind``) of every run with a val_predictions.npz artifact (rows from from_epoch)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="analysis-churn-") as tmp:
        for run_id in rs.runs.index:
            if PREDICTIONS_ARTIFACT not in list_artifact_paths(client, run_id):
                continue
            path = client.download_artifacts(run_id, PREDICTIONS_ARTIFACT, str(Path(tmp) / run_id))
            with np.load(path) as npz:
                pred, loss, target = npz["pred"][from_epoch:], npz["loss"][from_epoch:], npz["target"]
            summary = churn_mod.churn_summary(pred, loss, target)
            rows.append({"run_id": run_id, "variant": rs.runs.at[run_id, "variant"], **summary,
                         "kind": churn_mod.fluctuation_kind(summary)})
    return pd.DataFrame(rows)


def report_sensitivity(client, rs: RunSet, notes: list[str]) -> pd.DataFrame | None:
    """Sensitivity of the lowest-seed run with a checkpoint of each variant, on the baseline's images."""
    from analysis.attribution import has_checkpoint, run_sensitivity

    chosen: dict[str, str] = {}
    for variant in rs.variants:
        runs = rs.runs[rs.runs["variant"] == variant].sort_values("seed")
        for run_id in runs.index:
            if has_checkpoint(client, run_id):
                chosen[variant] = run_id
                break
    if len(chosen) < len(rs.variants):
        missing = [v for v in rs.variants if v not in chosen]
        notes.append(f"sensitivity: no checkpoint artifact for {', '.join(missing)}")
    if not chosen:
        return None
    try:
        return run_sensitivity(client, chosen)
    except ConfigError as e:
        notes.append(f"sensitivity skipped: {e}")
        return None
