"""A saved view of the MLflow Runs page, stored on the experiment, that opens a study ready to compare.

MLflow keeps a saved view as the experiment tag ``mlflow.sharedViewState.<id>``: JSON
``{"name", "createdAt", "updatedAt", "state"}`` whose ``state`` is the Runs page's state as JSON text,
optionally ``"deflate;"`` + base64(zlib(JSON)). The format is internal to MLflow's UI bundle, so it is
written only for the MLflow versions in SAVED_VIEW_VERSIONS (docs/ui.md, "The saved view").
"""

from __future__ import annotations

import base64
import json
import logging
import time
import zlib
from typing import Any, Iterable, Mapping

from ablate.names import VARIANT_TAG

#: Experiment tag prefix of a saved view; the view id follows it.
SAVED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
#: The id of the view a study stores (one per experiment, overwritten when the study starts again).
SAVED_VIEW_ID = "ablate-compare"
#: The URL query parameter of the Runs page that applies a saved view.
VIEW_QUERY_PARAM = "viewStateShareKey"
#: MLflow versions [low, high) whose UI reads the view as written here (3.17.2 is tested).
SAVED_VIEW_VERSIONS = ("3.15", "3.18")
#: MLflow's limit on an experiment tag value (the UI refuses a larger view too).
MAX_VIEW_CHARS = 20_000
#: Marks a compressed state, as the UI writes it.
DEFLATE_PREFIX = "deflate;"
#: Column id of the run name in the Runs table; its width is set so that ``<variant>-seed<k>`` shows whole.
RUN_NAME_COLUMN = "attributes.`Run Name`"
RUN_NAME_WIDTH = 260

#: The Runs page's search facets and their defaults (a view replaces all of them).
SEARCH_FACETS: dict[str, Any] = {
    "searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
    "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
}
#: The Runs page's UI state a view carries, with the UI's defaults; runsExpanded, runsPinned, runsHidden,
#: runsVisibilityMap and autoRefreshEnabled are never part of a view.
UI_STATE: dict[str, Any] = {
    "selectedColumns": [], "columnOrder": [], "columnWidths": {}, "runsHiddenMode": "FIRST_10_RUNS",
    "viewMaximized": False, "runListHidden": False, "isAccordionReordered": False,
    "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "groupBy": None, "groupsExpanded": {},
    "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
}
GROUP_MODES = ("tag", "param")

log = logging.getLogger(__name__)


def column(kind: str, name: str) -> str:
    """The Runs table's id of a column: ``metrics.`val_acc```, ``params.`scconv.order```, ``tags.`x```."""
    return f"{kind}.`{name}`"


def supported(mlflow_version: str) -> bool:
    """Whether the UI of ``mlflow_version`` reads saved views as this module writes them."""
    from packaging.version import InvalidVersion, Version

    try:
        version = Version(mlflow_version)
    except InvalidVersion:
        return False
    low, high = (Version(v) for v in SAVED_VIEW_VERSIONS)
    return low <= Version(version.base_version) < high


def view_state(variant_params: Iterable[str], metrics: Iterable[str], *, primary_metric: str = "val_acc",
               maximize: bool = True, group_by: tuple[str, str] = ("tag", VARIANT_TAG),
               search_filter: str = "") -> dict[str, Any]:
    """The Runs page's state: run name, ``variant_params`` and ``metrics`` as columns, sorted by
    ``primary_metric``, grouped by ``group_by`` (mode, name) with the group means in the table, every run shown
    in the charts in its own colour."""
    mode, key = group_by
    if mode not in GROUP_MODES:
        raise ValueError(f"group_by mode {mode!r} is not one of {GROUP_MODES}")
    params = list(dict.fromkeys(variant_params))
    names = list(dict.fromkeys([primary_metric, *metrics]))
    columns = [column("params", p) for p in params] + [column("metrics", m) for m in names]
    return {
        **SEARCH_FACETS, **UI_STATE,
        "searchFilter": search_filter,
        "orderByKey": column("metrics", primary_metric),
        "orderByAsc": not maximize,
        "selectedColumns": columns,
        "columnWidths": {RUN_NAME_COLUMN: RUN_NAME_WIDTH},
        # The UI's default shows only the first 10 runs in the charts; a study has more.
        "runsHiddenMode": "SHOW_ALL",
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": mode, "groupByData": key}]},
        # The table shows each variant's mean; the charts show every run in its variant's colour.
        "useGroupedValuesInCharts": False,
    }


def encode_state(state: Mapping[str, Any], compress: bool = True) -> str:
    """The ``state`` text of a view: JSON, or as the UI writes it, ``deflate;`` + base64 of zlib's output."""
    text = json.dumps(state, separators=(",", ":"))
    if not compress:
        return text
    return DEFLATE_PREFIX + base64.b64encode(zlib.compress(text.encode("utf-8"), 9)).decode("ascii")


def decode_view_tag(value: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(envelope, state) of a saved-view tag value, read as the UI reads it; ValueError when it is not one."""
    try:
        envelope = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"a saved view is JSON: {e}") from None
    if not (isinstance(envelope, dict) and isinstance(envelope.get("name"), str)
            and isinstance(envelope.get("createdAt"), (int, float)) and isinstance(envelope.get("state"), str)):
        raise ValueError("a saved view has a string name, a number createdAt and a string state")
    text = envelope["state"]
    if text.startswith(DEFLATE_PREFIX):
        text = zlib.decompress(base64.b64decode(text[len(DEFLATE_PREFIX):])).decode("utf-8")
    return envelope, json.loads(text)


def comparison_view_tags(mlflow_version: str, variant_params: Iterable[str], summary_metrics: Iterable[str], *,
                         primary_metric: str = "val_acc", maximize: bool = True,
                         extra_metrics: Iterable[str] = ("peak_memory_mb",),
                         group_by: tuple[str, str] = ("tag", VARIANT_TAG), name: str = "Compare variants",
                         view_id: str = SAVED_VIEW_ID, search_filter: str = "",
                         now_ms: int | None = None) -> dict[str, str]:
    """The experiment tag of the comparison view (see :func:`view_state`); ``{}``, with one log line saying
    why, when ``mlflow_version`` is outside SAVED_VIEW_VERSIONS or the view exceeds MLflow's tag limit."""
    if not supported(mlflow_version):
        low, high = SAVED_VIEW_VERSIONS
        log.info("no saved comparison view: MLflow %s stores saved views in a format not checked here "
                 "(checked: %s <= version < %s)", mlflow_version, low, high)
        return {}
    state = view_state(variant_params, [*summary_metrics, *extra_metrics], primary_metric=primary_metric,
                       maximize=maximize, group_by=group_by, search_filter=search_filter)
    now = int(time.time() * 1000) if now_ms is None else int(now_ms)
    value = json.dumps({"name": name, "createdAt": now, "updatedAt": now, "state": encode_state(state)})
    if len(value) > MAX_VIEW_CHARS:
        log.info("no saved comparison view: %d characters, over MLflow's limit of %d", len(value), MAX_VIEW_CHARS)
        return {}
    return {SAVED_VIEW_TAG_PREFIX + view_id: value}


#: Experiment tag that tells MLflow's UI what kind of work an experiment holds.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
#: Its value for model training (the UI otherwise guesses, and opens empty experiments on the GenAI pages).
MODEL_TRAINING_KIND = "custom_model_development"


def experiment_kind_tags() -> dict[str, str]:
    """The experiment tag that marks a study as model training."""
    return {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
