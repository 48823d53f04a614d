"""Log a written report back to MLflow, next to the runs it explains."""

from __future__ import annotations

from pathlib import Path

from ablate.names import (
    REPORT_ARTIFACT_DIR,
    REPORT_BASELINE_TAG,
    REPORT_FROM_EPOCH_TAG,
    REPORT_GROUP_BY_TAG,
    ROLE_REPORT,
    ROLE_TAG,
)
from analysis.report.data import ReportData
from analysis.runs import study_parent_run


def log_report(client, data: ReportData, out_dir: str | Path) -> str:
    """Log the report folder as artifacts (``report/``) of the study's parent run, else of a new report run."""
    parent = study_parent_run(client, data.runs.experiment_id)
    tags = {REPORT_BASELINE_TAG: data.baseline, REPORT_GROUP_BY_TAG: ",".join(data.runs.group_by),
            REPORT_FROM_EPOCH_TAG: str(data.from_epoch)}
    if parent is not None:
        run_id = parent.info.run_id
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
        client.log_artifacts(run_id, str(out_dir), REPORT_ARTIFACT_DIR)
        return run_id
    run = client.create_run(data.runs.experiment_id, run_name=f"report-{data.runs.experiment_name}",
                            tags={ROLE_TAG: ROLE_REPORT, **tags})
    try:
        client.log_artifacts(run.info.run_id, str(out_dir), REPORT_ARTIFACT_DIR)
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id
