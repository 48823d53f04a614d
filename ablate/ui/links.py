"""Direct links into MLflow's UI: a study's runs page (model-training mode, comparison view), the compare page
of its runs, and its report artifact. The UI routes after ``#`` are those of MLflow's UI bundle."""

from __future__ import annotations

import json
from typing import NamedTuple, Sequence
from urllib.parse import quote, urlencode, urlparse

from ablate.names import REPORT_ARTIFACT_DIR
from ablate.track import is_http
from ablate.ui.view import VIEW_QUERY_PARAM

#: Port of ``ablate ui``'s server unless ``--port`` says otherwise.
DEFAULT_UI_PORT = 5000
#: The Runs page's query parameter that selects model training instead of the GenAI pages, and its value.
WORKFLOW_QUERY_PARAM, MODEL_TRAINING_WORKFLOW = "workflowType", "machine_learning"
#: The report's page inside REPORT_ARTIFACT_DIR.
REPORT_PAGE = "index.html"


class UiLinks(NamedTuple):
    """Where to click: the runs page, the compare page of the child runs, the report (None without a study run)."""

    runs: str
    compare: str
    report: str | None


def ui_base(tracking_uri: str, port: int = DEFAULT_UI_PORT) -> str:
    """The UI's address: a tracking server serves it itself (credentials left out), else ``ablate ui`` on
    127.0.0.1:``port``."""
    if is_http(tracking_uri):
        parsed = urlparse(tracking_uri)
        return parsed._replace(netloc=parsed.netloc.rsplit("@", 1)[-1]).geturl().rstrip("/")
    return f"http://127.0.0.1:{port}"


def runs_url(base: str, experiment_id: str, view_id: str | None = None) -> str:
    """The experiment's runs page in model-training mode, with the saved view ``view_id`` applied when given."""
    query = {WORKFLOW_QUERY_PARAM: MODEL_TRAINING_WORKFLOW}
    if view_id:
        query[VIEW_QUERY_PARAM] = view_id
    return f"{base}/#/experiments/{quote(str(experiment_id))}/runs?{urlencode(query)}"


def compare_url(base: str, experiment_id: str, run_ids: Sequence[str]) -> str:
    """The compare page of ``run_ids`` (params, metrics and charts side by side)."""
    def as_json(values) -> str:
        return quote(json.dumps(list(values), separators=(",", ":")), safe="")
    return f"{base}/#/compare-runs?runs={as_json(run_ids)}&experiments={as_json([str(experiment_id)])}"


def artifact_url(base: str, experiment_id: str, run_id: str, path: str) -> str:
    """The artifact ``path`` of a run, opened in the run page's artifact browser."""
    return f"{base}/#/experiments/{quote(str(experiment_id))}/runs/{quote(run_id)}/artifacts/{quote(path)}"


def ui_links(tracking_uri: str, experiment_id: str, run_ids: Sequence[str], parent_run_id: str | None, *,
             port: int = DEFAULT_UI_PORT, view_id: str | None = None) -> UiLinks:
    """The links ``ablate ui`` prints for a study: runs page, compare page, report."""
    base = ui_base(tracking_uri, port)
    report = None
    if parent_run_id:
        report = artifact_url(base, experiment_id, parent_run_id, f"{REPORT_ARTIFACT_DIR}/{REPORT_PAGE}")
    return UiLinks(runs_url(base, experiment_id, view_id), compare_url(base, experiment_id, run_ids), report)
