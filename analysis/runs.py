"""MLflow -> tidy pandas frames: one row per run (params, tags) and one per run x epoch x metric.

Works on any MLflow runs that log ``train_loss`` and ``val_loss`` per epoch (``step`` = epoch),
not only on runs made by ``ablate``: runs without both histories (a study's parent run, a report
run) are skipped and listed in ``RunSet.skipped``.

Grouping rule (``default_group_by``), so that seeds of one configuration form one *variant*:
1. candidates are the params that take more than one value across the runs (a missing param counts
   as a value of its own), less ``seed`` and less :data:`BOOKKEEPING_PARAMS` (names and paths that
   do not change what is trained: ``run_name``, ``data_root``, ``device``...);
2. candidates are visited in :func:`ablate.config.RunConfig.to_params` order (then by name) and a
   candidate is kept only when it splits the runs further than the ones kept before it; so a param
   determined by an earlier one (``scconv.gate_mode`` when ``scconv.preset`` varies) stays out;
3. when seeds repeat across runs (seed is a replicate index), a candidate that splits the runs
   exactly as the seed does within the kept groups (``run_name = variant-s3``) is left out too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import pandas as pd

from ablate.config import RunConfig
from ablate.errors import ConfigError
from ablate.names import (
    BOOKKEEPING_PARAMS, GATE_STATS_ARTIFACT, HISTORY_ARTIFACT, ROLE_REPORT, ROLE_STUDY, ROLE_TAG, GateKey,
)

REQUIRED_METRICS = ("train_loss", "val_loss")
SEED_PARAM = "seed"
ORDER_PARAM = "scconv.order"
BASELINE_ORDER = "none"
_MISSING = "<unset>"
_PAGE = 1000


@dataclass
class RunSet:
    """The usable runs of one experiment, as tidy frames.

    ``runs``: one row per run (index ``run_id``; ``run_name``, ``start_time``, ``seed``, ``variant``
    and every non-MLflow tag as ``tag.<name>``). ``params``: run_id x param (strings as logged).
    ``history``: long form ``run_id, epoch, metric, value``. ``skipped``: ``(run_id, run_name, reason)``.
    """

    experiment_name: str
    experiment_id: str
    runs: pd.DataFrame
    params: pd.DataFrame
    history: pd.DataFrame
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    group_by: tuple[str, ...] = ()
    baseline: str | None = None

    @property
    def variants(self) -> list[str]:
        """Variant labels, baseline first, then sorted."""
        labels = sorted(self.runs["variant"].unique())
        if self.baseline in labels:
            labels.remove(self.baseline)
            labels.insert(0, self.baseline)
        return labels

    def wide_history(self, metrics: Sequence[str] | None = None) -> pd.DataFrame:
        """One row per run x epoch, one column per metric (``run_id``, ``variant``, ``seed``, ``epoch``, ...)."""
        long = self.history if metrics is None else self.history[self.history["metric"].isin(list(metrics))]
        wide = long.pivot_table(index=["run_id", "epoch"], columns="metric", values="value", aggfunc="last")
        wide.columns.name = None
        wide = wide.reset_index()
        meta = self.runs[["variant", "seed"]]
        return wide.join(meta, on="run_id")[["run_id", "variant", "seed", "epoch", *wide.columns[2:]]]

    def run_history(self, run_id: str, metrics: Sequence[str] | None = None) -> pd.DataFrame:
        """One run's history: ``epoch`` plus one column per metric, sorted by epoch."""
        wide = self.wide_history(metrics)
        one = wide[wide["run_id"] == run_id].drop(columns=["run_id", "variant", "seed"])
        return one.sort_values("epoch").reset_index(drop=True)


# -- tracking store ----------------------------------------------------------------------------


def make_client(tracking_uri: str | None = None):
    """An MlflowClient on the resolved store (argument, else ``MLFLOW_TRACKING_URI``, else ``mlruns/mlflow.db``).

    A sqlite store that does not exist is a ConfigError: reading must never create an empty store.
    """
    from ablate.track import client, resolve_tracking_uri, sqlite_path

    uri = resolve_tracking_uri(tracking_uri)
    db = sqlite_path(uri)
    if db is not None and ":memory:" not in str(db) and not db.is_file():
        raise ConfigError(f"--tracking-uri={uri!r} is not valid: {db} does not exist; "
                          "accepted: an existing MLflow store (run `ablate study` or `ablate train` first)")
    return client(uri)  # the one client rule: quiet alembic, the installed PostgreSQL driver


def get_experiment(client, name: str):
    """The experiment called ``name``; unknown names raise ConfigError listing the existing ones."""
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage != "active":
        names = sorted(e.name for e in client.search_experiments())
        raise ConfigError(f"--experiment={name!r} not found; existing experiments: {', '.join(names) or '(none)'}")
    return exp


def search_all_runs(client, experiment_id: str, filter_string: str = "") -> list:
    """Every active run of the experiment matching ``filter_string``, all pages."""
    out, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=_PAGE, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def fetch_histories(client, run_ids: Sequence[str], keys: Iterable[str]) -> pd.DataFrame:
    """Long frame ``run_id, epoch, metric, value`` of every key for every run.

    Uses the SQL store's one-query-per-key bulk read when the store has it, else one
    ``get_metric_history`` call per run and key. A step logged twice keeps its latest value.
    """
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    bulk = getattr(store, "get_metric_history_bulk", None)
    rows: list[tuple[str, int, str, float, int]] = []
    for key in sorted(set(keys)):
        if bulk is not None:
            for m in bulk(list(run_ids), key, max_results=2**31 - 1):
                rows.append((m.run_id, m.step, key, m.value, m.timestamp))
        else:
            for run_id in run_ids:
                rows.extend((run_id, m.step, key, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))
    frame = pd.DataFrame(rows, columns=["run_id", "epoch", "metric", "value", "timestamp"])
    frame = frame.sort_values(["run_id", "metric", "epoch", "timestamp"])
    frame = frame.drop_duplicates(["run_id", "metric", "epoch"], keep="last").drop(columns="timestamp")
    frame["epoch"] = frame["epoch"].astype(int)
    frame["value"] = frame["value"].astype(float)
    return frame.reset_index(drop=True)


# -- loading -----------------------------------------------------------------------------------


def load_runs(client, experiment: str, artifacts: bool = True) -> RunSet:
    """Read every FINISHED run of ``experiment`` that has train/val loss histories (variant not yet set).

    With ``artifacts``, what a run keeps as artifacts instead of metrics joins its history too
    (:func:`artifact_history`: per-layer gate statistics, per-eps sensitivities). Raises ConfigError when the
    experiment is unknown or no run has the needed metrics.
    """
    exp = get_experiment(client, experiment)
    finished = search_all_runs(client, exp.experiment_id, "attributes.status = 'FINISHED'")
    usable, skipped = [], []
    for run in finished:
        missing = [k for k in REQUIRED_METRICS if k not in run.data.metrics]
        role = run.data.tags.get(ROLE_TAG)
        if missing:
            why = f"{ROLE_TAG}={role}" if role in (ROLE_STUDY, ROLE_REPORT) else f"no {', '.join(missing)} history"
            skipped.append((run.info.run_id, run.info.run_name or "", why))
        else:
            usable.append(run)
    if not usable:
        raise ConfigError(
            f"--experiment={experiment!r} has no FINISHED run with {' and '.join(REQUIRED_METRICS)} histories "
            f"({len(finished)} finished runs, {len(skipped)} without them); accepted: an experiment of training runs"
        )
    usable.sort(key=lambda r: (r.info.start_time or 0, r.info.run_id))
    keys = {k for r in usable for k in r.data.metrics}
    run_ids = [r.info.run_id for r in usable]
    history = fetch_histories(client, run_ids, keys)
    if artifacts:
        extra = [artifact_history(client, r.info.run_id, set(r.data.metrics)) for r in usable]
        history = pd.concat([history, *extra], ignore_index=True) if any(len(e) for e in extra) else history
    return RunSet(
        experiment_name=exp.name, experiment_id=exp.experiment_id,
        runs=_runs_frame(usable), params=_params_frame(usable), history=history, skipped=skipped,
    )


def artifact_history(client, run_id: str, logged: set[str]) -> pd.DataFrame:
    """Long rows ``run_id, epoch, metric, value`` of what a run did not log as metrics: the per-layer gate
    statistics of ``gate_stats.csv`` as ``GateKey(kind, layer, stat).metric_name()`` (only when the run logged
    no per-layer gate metric, so nothing is read twice), and the ``history.csv`` columns that are not among the
    ``logged`` metric names (the per-eps sensitivities ``sens/<kind>/eps_<e>``)."""
    import tempfile

    paths = list_artifact_paths(client, run_id)
    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        if GATE_STATS_ARTIFACT in paths and not any(GateKey.parse(k) for k in logged):
            gates = pd.read_csv(client.download_artifacts(run_id, GATE_STATS_ARTIFACT, tmp))
            if len(gates):
                names = [GateKey(str(k), str(l), str(s)).metric_name()
                         for k, l, s in zip(gates["kind"], gates["layer"], gates["stat"])]
                frames.append(pd.DataFrame({"run_id": run_id, "epoch": gates["epoch"], "metric": names,
                                            "value": gates["value"]}))
        if HISTORY_ARTIFACT in paths:
            table = pd.read_csv(client.download_artifacts(run_id, HISTORY_ARTIFACT, tmp))
            extra = [c for c in table.columns if c != "epoch" and c not in logged]
            if extra and "epoch" in table:
                long = table.melt(id_vars="epoch", value_vars=extra, var_name="metric", value_name="value")
                frames.append(long.assign(run_id=run_id).dropna(subset=["value"]))
    columns = ["run_id", "epoch", "metric", "value"]
    if not frames:
        return pd.DataFrame(columns=columns)
    out = pd.concat([f[columns] for f in frames], ignore_index=True)
    return out.astype({"epoch": int, "value": float})


def _runs_frame(runs: list) -> pd.DataFrame:
    rows = []
    for r in runs:
        row = {"run_id": r.info.run_id, "run_name": r.info.run_name or "", "start_time": r.info.start_time,
               "seed": _seed_value(r.data.params.get(SEED_PARAM))}
        row.update({f"tag.{k}": v for k, v in r.data.tags.items() if not k.startswith("mlflow.")})
        rows.append(row)
    frame = pd.DataFrame(rows).set_index("run_id")
    frame["variant"] = "all"
    return frame


def _seed_value(text: str | None):
    try:
        return int(text) if text is not None else None
    except ValueError:
        return text


def _params_frame(runs: list) -> pd.DataFrame:
    frame = pd.DataFrame({r.info.run_id: r.data.params for r in runs}).T
    frame.index.name = "run_id"
    return frame.reindex(columns=sorted(frame.columns, key=_param_rank))


def _param_rank(name: str) -> tuple[int, str]:
    order = list(RunConfig().to_params())
    return (order.index(name), "") if name in order else (len(order), name)


# -- grouping ----------------------------------------------------------------------------------


def _partition(params: pd.DataFrame, cols: Sequence[str]) -> int:
    """Number of groups the runs fall into when split by ``cols``."""
    if not cols:
        return 1
    return len(params[list(cols)].fillna(_MISSING).drop_duplicates())


def default_group_by(params: pd.DataFrame) -> tuple[str, ...]:
    """The params that define variants (module docstring: the grouping rule)."""
    filled = params.fillna(_MISSING)
    candidates = [c for c in filled.columns
                  if filled[c].nunique() > 1 and c != SEED_PARAM and c not in BOOKKEEPING_PARAMS]
    seeds_repeat = SEED_PARAM in filled and filled[SEED_PARAM].duplicated().any()
    kept: list[str] = []
    for col in candidates:
        with_col = _partition(filled, kept + [col])
        if with_col == _partition(filled, kept):
            continue  # determined by the params already kept
        if seeds_repeat and with_col == _partition(filled, kept + [SEED_PARAM]) == _partition(filled, kept + [SEED_PARAM, col]):
            continue  # changes with the seed, as a run name does
        kept.append(col)
    return tuple(kept)


def assign_variants(rs: RunSet, group_by: Sequence[str] | None = None, baseline: str | None = None) -> RunSet:
    """Label each run with its variant (group-by values joined by ",") and pick the baseline.

    ``group_by`` None: :func:`default_group_by`. ``baseline`` None: the variant whose
    ``scconv.order`` is ``none`` (the one with most runs if several), else the first label.
    Unknown params or labels raise ConfigError naming what exists.
    """
    cols = tuple(group_by) if group_by is not None else default_group_by(rs.params)
    unknown = [c for c in cols if c not in rs.params.columns]
    if unknown:
        raise ConfigError(f"--group-by={','.join(unknown)!r} is not a param of these runs; "
                          f"params: {', '.join(rs.params.columns)}")
    if cols:
        labels = rs.params[list(cols)].fillna(_MISSING).astype(str).agg(",".join, axis=1)
    else:
        labels = pd.Series("all", index=rs.params.index)
    rs.runs["variant"] = labels.reindex(rs.runs.index)
    rs.group_by = cols
    rs.baseline = _pick_baseline(rs, baseline)
    return rs


def _pick_baseline(rs: RunSet, baseline: str | None) -> str:
    labels = sorted(rs.runs["variant"].unique())
    if baseline is not None:
        if baseline not in labels:
            raise ConfigError(f"--baseline={baseline!r} is not a variant; variants: {', '.join(labels)}")
        return baseline
    if ORDER_PARAM in rs.params.columns:
        is_none = rs.params[ORDER_PARAM].reindex(rs.runs.index) == BASELINE_ORDER
        counts = rs.runs.loc[is_none, "variant"].value_counts()
        if len(counts):
            top = counts[counts == counts.max()].index
            return sorted(top)[0]
    return labels[0]


def study_parent_run(client, experiment_id: str):
    """The latest run tagged ``ablate.role=study`` in the experiment (any status), or None."""
    runs = search_all_runs(client, experiment_id, f"tags.`{ROLE_TAG}` = '{ROLE_STUDY}'")
    return max(runs, key=lambda r: r.info.start_time or 0) if runs else None


def list_artifact_paths(client, run_id: str) -> set[str]:
    """Paths of the artifacts at the root of a run (names only, one level)."""
    return {f.path for f in client.list_artifacts(run_id)}
