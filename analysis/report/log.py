"""Log a written report back to MLflow, next to the runs it explains: the report folder, its tags, its headline
figures as metrics of that run, and a note that links the report (docs/ui.md)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ablate.names import (
    REPORT_ARTIFACT_DIR,
    REPORT_BASELINE_TAG,
    REPORT_BEST_VARIANT_TAG,
    REPORT_FROM_EPOCH_TAG,
    REPORT_GROUP_BY_TAG,
    ROLE_REPORT,
    ROLE_TAG,
)
from analysis.report.data import ALPHA, PRIMARY, ReportData
from analysis.runs import study_parent_run

#: Prefix of the metrics a report logs on the run that holds it.
REPORT_METRIC_PREFIX = "report."
#: The accuracy that picks the best variant: each run's last logged val_acc, averaged over the variant's runs.
BEST_BY = "val_acc"


class Headline(NamedTuple):
    """What the study run shows without opening the report: the best variant and each variant's primary ratio."""

    best_variant: str | None
    best_val_acc: float
    ratios: dict[str, tuple[float, float, float, float]]  #: variant -> (ratio, ci_low, ci_high, q_value)
    significant: int  #: variants whose primary ratio has q < ALPHA


def metric_key(text: str) -> str:
    """``text`` as a valid part of an MLflow metric name (letters, digits, ``_ - . /`` and space kept; else ``_``)."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", text)


def headline(data: ReportData) -> Headline:
    """The report's headline figures from its own tables."""
    final = data.runs.wide_history([BEST_BY]).sort_values("epoch").groupby("run_id").last() \
        if BEST_BY in set(data.runs.history["metric"]) else None
    best, best_acc = None, math.nan
    if final is not None and len(final):
        means = final.groupby("variant")[BEST_BY].mean().dropna()
        if len(means):
            best, best_acc = str(means.idxmax()), float(means.max())
    ratios, significant = {}, 0
    primary = data.comparisons[data.comparisons["metric"] == PRIMARY] if len(data.comparisons) else data.comparisons
    for _, c in primary.iterrows():
        ratios[str(c["variant"])] = (float(c["ratio"]), float(c["ci_low"]), float(c["ci_high"]), float(c["q_value"]))
        significant += bool(np.isfinite(c["q_value"]) and c["q_value"] < ALPHA)
    return Headline(best, best_acc, ratios, significant)


def headline_metrics(h: Headline) -> dict[str, float]:
    """``report.best_val_acc``, ``report.significant_variants`` and ``report.<PRIMARY>_ratio.<variant>``."""
    out = {f"{REPORT_METRIC_PREFIX}best_val_acc": h.best_val_acc,
           f"{REPORT_METRIC_PREFIX}significant_variants": float(h.significant)}
    for variant, (ratio, *_rest) in h.ratios.items():
        out[f"{REPORT_METRIC_PREFIX}{PRIMARY}_ratio.{metric_key(variant)}"] = ratio
    return out


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.{digits}g}"


def headline_text(h: Headline, baseline: str) -> dict[str, str]:
    """The note's table: label -> value as text."""
    rows = {}
    if h.best_variant is not None:
        rows[f"best variant (mean final {BEST_BY})"] = f"`{h.best_variant}` ({_fmt(h.best_val_acc)})"
    for variant, (ratio, low, high, q) in h.ratios.items():
        ci = f" [{_fmt(low)}, {_fmt(high)}]" if np.isfinite(low) else ""
        qs = f", q = {q:.2g}" if np.isfinite(q) else ""
        rows[f"`{variant}`: {PRIMARY} / `{baseline}`"] = f"{_fmt(ratio)}{ci}{qs}"
    return rows


def log_report(client, data: ReportData, out_dir: str | Path) -> str:
    """Log the report folder as artifacts (``report/``) of the study's parent run, else of a new report run, with
    the headline metrics and a note linking the report."""
    parent = study_parent_run(client, data.runs.experiment_id)
    h = headline(data)
    tags = {REPORT_BASELINE_TAG: data.baseline, REPORT_GROUP_BY_TAG: ",".join(data.runs.group_by),
            REPORT_FROM_EPOCH_TAG: str(data.from_epoch)}
    if h.best_variant is not None:
        tags[REPORT_BEST_VARIANT_TAG] = h.best_variant
    if parent is not None:
        run_id = parent.info.run_id
        client.log_artifacts(run_id, str(out_dir), REPORT_ARTIFACT_DIR)
        _describe(client, run_id, data, h, tags)
        return run_id
    run = client.create_run(data.runs.experiment_id, run_name=f"report-{data.runs.experiment_name}",
                            tags={ROLE_TAG: ROLE_REPORT})
    try:
        client.log_artifacts(run.info.run_id, str(out_dir), REPORT_ARTIFACT_DIR)
        _describe(client, run.info.run_id, data, h, tags)
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


def _describe(client, run_id: str, data: ReportData, h: Headline, tags: dict[str, str]) -> None:
    """Tags, headline metrics and the note (with the report link) of the run that holds the report."""
    import time

    from mlflow.entities import Metric, RunTag

    from ablate.ui import NOTE_TAG, SAVED_VIEW_ID, artifact_url, parent_note, runs_url, ui_base
    from ablate.ui.links import REPORT_PAGE
    from ablate.ui.view import SAVED_VIEW_TAG_PREFIX

    exp_id = data.runs.experiment_id
    base = ui_base(client.tracking_uri)
    report_url = artifact_url(base, exp_id, run_id, f"{REPORT_ARTIFACT_DIR}/{REPORT_PAGE}")
    has_view = SAVED_VIEW_TAG_PREFIX + SAVED_VIEW_ID in client.get_experiment(exp_id).tags
    note = parent_note(report_url, study=data.runs.experiment_name,
                       view_url=runs_url(base, exp_id, SAVED_VIEW_ID if has_view else None),
                       headline=headline_text(h, data.baseline))
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in headline_metrics(h).items()],
                     tags=[RunTag(k, v) for k, v in {**tags, NOTE_TAG: note}.items()])
