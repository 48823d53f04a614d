"""Direct links into MLflow's UI: a study's runs page (model-training mode, comparison view), the compare page
of its runs, and its report artifact. The UI routes after ``#`` are those of MLflow's UI bundle."""

from __future__ import annotations

import json
import shlex
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


class StudyLinks(NamedTuple):
    """The links of one study in the store, and whether its report exists yet."""

    study: str
    links: UiLinks
    has_report: bool


def study_links(client, tracking_uri: str, *, port: int = DEFAULT_UI_PORT, experiment: str | None = None
                ) -> list[StudyLinks]:
    """The links of every study in the store (or of ``experiment``): the latest run tagged ``ablate.role = study``
    of each experiment, its finished child runs, its report."""
    from ablate.names import PARENT_RUN_TAG, ROLE_STUDY, ROLE_TAG
    from ablate.ui.view import SAVED_VIEW_ID, SAVED_VIEW_TAG_PREFIX

    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        experiments = [found] if found is not None and found.lifecycle_stage == "active" else []
    else:
        experiments = client.search_experiments()
    out = []
    for exp in sorted(experiments, key=lambda e: e.name):
        parents = client.search_runs([exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = '{ROLE_STUDY}'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
        if not parents:
            continue
        parent = parents[0].info.run_id
        finished_children = f"tags.`{PARENT_RUN_TAG}` = '{parent}' and attributes.status = 'FINISHED'"
        children = client.search_runs([exp.experiment_id], filter_string=finished_children,
                                      order_by=["attributes.start_time ASC"], max_results=1000)
        view_id = SAVED_VIEW_ID if SAVED_VIEW_TAG_PREFIX + SAVED_VIEW_ID in exp.tags else None
        has_report = any(f.path == REPORT_ARTIFACT_DIR for f in client.list_artifacts(parent))
        links = ui_links(tracking_uri, exp.experiment_id, [r.info.run_id for r in children], parent, port=port,
                         view_id=view_id)
        out.append(StudyLinks(exp.name, links, has_report))
    return out


def format_study_links(found: list[StudyLinks]) -> list[str]:
    """The lines ``ablate ui`` prints: per study its runs page, compare page and report (or how to write it)."""
    lines = []
    for item in found:
        report = item.links.report if item.has_report else \
            f"not written yet: analysis report --experiment {shlex.quote(item.study)}"
        lines += [f"study {item.study}:", f"  runs:    {item.links.runs}", f"  compare: {item.links.compare}",
                  f"  report:  {report}"]
    return lines
