"""The fluctuation report: compute everything (``build_report_data``), then write it (``write_report``)
and log it back to MLflow (``log_report``).

Files in the output folder: ``index.html`` (plotly figures with plotly.js embedded once, readable
offline), ``summary.md`` (key table and findings with effect sizes, CIs and p-values),
``comparisons.csv`` (``analysis.stats.compare_groups``), ``run_metrics.csv`` (one row per run),
and when the runs have them ``gate_layer_epoch.csv``, ``flip_coupling.csv``, ``gate_association.csv``,
``churn.csv``, ``sensitivity.csv``.

Every figure follows Optuna's split: ``get_<figure>_info(data)`` returns plain data (tests read it)
and ``get_<figure>_plot(info)`` only draws it.

Honest p-values: a comparison whose arms have fewer than 2 runs has no p-value (``compare_groups``
gives NaN) and the report prints none; it says how many seeds per variant a test needs
(``min_seeds_for(ALPHA)``) and, when the arms are too small to ever reach ``ALPHA``, the smallest
attainable p (``p_floor``).
"""

from __future__ import annotations

import html
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd

from ablate.config import ConfigError
from analysis import churn as churn_mod
from analysis import fluctuation, gates, stats
from analysis.runs import RunSet, assign_variants, list_artifact_paths, load_runs, study_parent_run

ALPHA = 0.05
PRIMARY = "val_loss.resid_sd"
KEY_METRICS = ("val_loss.resid_sd", "val_loss.excess_tv", "val_loss.spike_count", "val_acc.resid_sd",
               "val_train_resid_ratio")
CHURN_METRICS = ("flip_rate_mean", "forgetting_events_per_example", "stable_pred_share_of_change_pooled",
                 "top5_share_of_change_pooled")
PREDICTIONS_ARTIFACT = "val_predictions.npz"
REPORT_ARTIFACT_DIR = "report"
REPORT_ROLE = "report"


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


# -- compute -----------------------------------------------------------------------------------


def build_report_data(client, experiment: str, group_by: Sequence[str] | None = None, baseline: str | None = None,
                      from_epoch: int = 0, sensitivity: bool = False, n_boot: int = 2000) -> ReportData:
    """Read the runs and compute every table; raises ConfigError on bad input, writes nothing."""
    if from_epoch < 0:
        raise ConfigError(f"--from-epoch={from_epoch!r} is not valid; accepted: an integer >= 0")
    rs = assign_variants(load_runs(client, experiment), group_by, baseline)
    last = int(rs.history["epoch"].max())
    if from_epoch > last:
        raise ConfigError(f"--from-epoch={from_epoch} is not valid; accepted: 0..{last} (the runs have epochs 0..{last})")
    gate_df = gates.gate_frame(rs.history, rs.runs)
    churn_df = churn_table(client, rs, from_epoch)
    table = run_metric_table(rs, from_epoch, gate_df, churn_df)
    metric_cols = [c for c in table.columns if c.split(".")[0] in fluctuation.CURVES
                   or c in fluctuation.METRIC_DOCS or c.startswith("churn.")]
    metric_cols = [c for c in metric_cols if table[c].dtype.kind in "fi"]
    comparisons = stats.compare_groups(table, rs.baseline, "variant", metric_cols, n_boot=n_boot)
    points = gates.flip_points(gate_df, rs.history, from_epoch)
    association = (gates.gate_association(table.set_index("run_id"), PRIMARY)
                   if any(c.startswith("gate.") for c in table.columns) and PRIMARY in table else pd.DataFrame())
    data = ReportData(
        runs=rs, from_epoch=from_epoch, run_metrics=table, comparisons=comparisons,
        gates=gate_df, layer_stats=gates.layer_epoch_stats(gate_df) if len(gate_df) else pd.DataFrame(),
        flip_points=points, flip_coupling=gates.flip_coupling(points), gate_association=association, churn=churn_df,
    )
    if sensitivity:
        data.sensitivity = report_sensitivity(client, rs, data.notes)
    return data


def run_metric_table(rs: RunSet, from_epoch: int, gate_df: pd.DataFrame, churn_df: pd.DataFrame) -> pd.DataFrame:
    """One row per run: run_id, variant, seed, the fluctuation metrics, ``churn.*`` and ``gate.*`` columns."""
    curves = [c for c in fluctuation.CURVES if c in set(rs.history["metric"])]
    wide = rs.wide_history(curves)
    rows = []
    for run_id, hist in wide.groupby("run_id", sort=False):
        row = {"run_id": run_id, "variant": rs.runs.at[run_id, "variant"], "seed": rs.runs.at[run_id, "seed"]}
        milestones = rs.params.at[run_id, "milestones"] if "milestones" in rs.params.columns else None
        # A scheduled lr drop is a step in the trend, not fluctuation.
        row.update(fluctuation.run_metrics(hist[["epoch", *curves]], from_epoch,
                                           breaks=fluctuation.parse_breaks(milestones)))
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


# -- figure infos ------------------------------------------------------------------------------


class CurveInfo(NamedTuple):
    """Per variant, per run: seed, epochs and the train/val loss values."""

    variants: list[str]
    runs: dict[str, list[dict]]


def get_loss_curves_info(data: ReportData) -> CurveInfo:
    """Train and val loss of every run, grouped by variant (seeds overlaid)."""
    wide = data.runs.wide_history(["train_loss", "val_loss"])
    out: dict[str, list[dict]] = {v: [] for v in data.runs.variants}
    for run_id, hist in wide.groupby("run_id", sort=False):
        hist = hist.sort_values("epoch")
        out[hist["variant"].iloc[0]].append({
            "run_id": run_id, "seed": hist["seed"].iloc[0], "epoch": hist["epoch"].tolist(),
            "train_loss": hist["train_loss"].tolist(), "val_loss": hist["val_loss"].tolist()})
    for runs in out.values():
        runs.sort(key=lambda r: str(r["seed"]))
    return CurveInfo(data.runs.variants, out)


class FluctuationInfo(NamedTuple):
    """Per-run values of the key metrics, and their ratios to the baseline with CIs."""

    metrics: list[str]
    values: pd.DataFrame  # variant, seed, metric, value
    ratios: pd.DataFrame  # metric, variant, ratio, ci_low, ci_high, p_value


def get_fluctuation_info(data: ReportData, metrics: Sequence[str] = KEY_METRICS) -> FluctuationInfo:
    """The key fluctuation metrics present in the runs."""
    present = [m for m in metrics if m in data.run_metrics and data.run_metrics[m].notna().any()]
    values = data.run_metrics.melt(id_vars=["variant", "seed"], value_vars=present, var_name="metric")
    ratios = data.comparisons[data.comparisons["metric"].isin(present)]
    return FluctuationInfo(present, values, ratios[["metric", "variant", "ratio", "ci_low", "ci_high", "p_value"]])


class HeatmapInfo(NamedTuple):
    """One gate statistic as a layer x epoch matrix per variant (mean over seeds; NaN where not logged)."""

    kind: str
    stat: str
    variants: list[str]
    layers: list[str]
    epochs: list[int]
    z: dict[str, list[list[float]]]


def get_gate_heatmap_info(data: ReportData, kind: str, stat: str) -> HeatmapInfo | None:
    """Heatmap data of one gate stat, or None when no run logged it."""
    if data.layer_stats.empty or stat not in data.layer_stats:
        return None
    sel = data.layer_stats[(data.layer_stats["kind"] == kind) & data.layer_stats[stat].notna()]
    if sel.empty:
        return None
    layers = sorted(sel["layer"].unique(), key=gates.layer_sort_key)
    epochs = sorted(int(e) for e in sel["epoch"].unique())
    variants = [v for v in data.runs.variants if v in set(sel["variant"])]
    z = {}
    for v in variants:
        grid = sel[sel["variant"] == v].pivot(index="layer", columns="epoch", values=stat)
        z[v] = grid.reindex(index=layers, columns=epochs).to_numpy(dtype=float).tolist()
    return HeatmapInfo(kind, stat, variants, layers, epochs, z)


def get_flip_scatter_info(data: ReportData) -> pd.DataFrame:
    """Points of first difference of flip share vs |delta val loss| (one per run, SRU layer and epoch)."""
    return data.flip_points


# -- figures -----------------------------------------------------------------------------------


def get_loss_curves_plot(info: CurveInfo):
    """One panel per variant; every seed's train (dashed) and val (solid) loss."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    cols = min(len(info.variants), 3)
    rows = math.ceil(len(info.variants) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=info.variants, shared_yaxes=True)
    for i, variant in enumerate(info.variants):
        r, c = divmod(i, cols)
        for run in info.runs[variant]:
            name = f"{variant} seed {run['seed']}"
            fig.add_trace(go.Scatter(x=run["epoch"], y=run["val_loss"], mode="lines+markers", name=f"{name} val",
                                     legendgroup=variant, showlegend=False, line={"width": 1.5}), r + 1, c + 1)
            fig.add_trace(go.Scatter(x=run["epoch"], y=run["train_loss"], mode="lines", name=f"{name} train",
                                     legendgroup=variant, showlegend=False, line={"width": 1, "dash": "dash"},
                                     opacity=0.6), r + 1, c + 1)
    fig.update_layout(title="Validation (solid) and training (dashed) loss per variant, seeds overlaid",
                      height=320 * rows)
    fig.update_xaxes(title_text="epoch")
    return fig


def get_fluctuation_plot(info: FluctuationInfo, baseline: str):
    """Per key metric: each run's value by variant, and the median ratio to the baseline with its 95% CI."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n = len(info.metrics)
    fig = make_subplots(rows=2, cols=max(n, 1), subplot_titles=[*info.metrics, *[f"{m} / {baseline}" for m in info.metrics]],
                        vertical_spacing=0.18)
    for i, metric in enumerate(info.metrics):
        vals = info.values[info.values["metric"] == metric]
        fig.add_trace(go.Box(x=vals["variant"], y=vals["value"], boxpoints="all", name=metric, showlegend=False,
                             hovertext=[f"seed {s}" for s in vals["seed"]]), 1, i + 1)
        rat = info.ratios[info.ratios["metric"] == metric]
        err_hi = (rat["ci_high"] - rat["ratio"]).tolist()
        err_lo = (rat["ratio"] - rat["ci_low"]).tolist()
        fig.add_trace(go.Scatter(x=rat["variant"], y=rat["ratio"], mode="markers", showlegend=False,
                                 error_y={"type": "data", "array": err_hi, "arrayminus": err_lo},
                                 hovertext=[f"p = {p:.2g}" if np.isfinite(p) else "no test (n < 2)"
                                            for p in rat["p_value"]]), 2, i + 1)
        fig.add_hline(y=1.0, line_dash="dot", row=2, col=i + 1)
    fig.update_layout(title=f"Fluctuation metrics per run (top) and ratio of medians to {baseline} with 95% "
                            "bootstrap CI (bottom)", height=700)
    return fig


def get_gate_heatmap_plot(info: HeatmapInfo):
    """One layer x epoch heatmap per variant, one shared colour scale."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(info.variants), subplot_titles=info.variants, shared_yaxes=True)
    for i, variant in enumerate(info.variants):
        fig.add_trace(go.Heatmap(z=info.z[variant], x=info.epochs, y=info.layers, coloraxis="coloraxis"), 1, i + 1)
    fig.update_layout(title=f"{info.kind} {info.stat} per layer and epoch (mean over seeds)",
                      coloraxis={"colorscale": "Viridis"}, height=max(300, 40 * len(info.layers) + 150))
    fig.update_xaxes(title_text="epoch")
    return fig


def get_flip_scatter_plot(points: pd.DataFrame):
    """First difference of flip share vs |delta val loss|, one colour per variant."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for variant, grp in points.groupby("variant", sort=False):
        fig.add_trace(go.Scatter(x=grp["d_flip"], y=grp["abs_d_val_loss"], mode="markers", name=variant,
                                 hovertext=[f"{l} epoch {e}" for l, e in zip(grp["layer"], grp["epoch"])],
                                 marker={"size": 6, "opacity": 0.6}))
    fig.update_layout(title="Flip share change vs |change of val loss| (per run, SRU layer and epoch)", height=450,
                      xaxis_title="flip_share[e] - flip_share[e-1]", yaxis_title="|val_loss[e] - val_loss[e-1]|")
    return fig


# -- text --------------------------------------------------------------------------------------


def _f(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}g}"


def _p_text(p: float) -> str:
    return f"p = {p:.2g}"


def _median(data: ReportData, variant: str, metric: str) -> float:
    vals = data.run_metrics.loc[data.run_metrics["variant"] == variant, metric].dropna()
    return float(vals.median()) if len(vals) else float("nan")


def has_tests(data: ReportData) -> bool:
    """True when some comparison has a p-value (both arms with 2 or more runs)."""
    return bool(data.comparisons["p_value"].notna().any())


def key_table(data: ReportData) -> pd.DataFrame:
    """Per variant: runs, and per key metric the median and ratio to baseline [CI] (+ delta, p, q when tested)."""
    tested = has_tests(data)
    rows = []
    for variant in data.runs.variants:
        row = {"variant": variant, "runs": data.runs_per_variant()[variant]}
        for metric in get_fluctuation_info(data).metrics:
            row[metric] = _f(_median(data, variant, metric))
            cmp = data.comparisons[(data.comparisons["metric"] == metric) & (data.comparisons["variant"] == variant)]
            if variant == data.baseline or cmp.empty:
                row[f"{metric} ratio"] = "baseline" if variant == data.baseline else "n/a"
                continue
            c = cmp.iloc[0]
            ci = f" [{_f(c.ci_low)}, {_f(c.ci_high)}]" if np.isfinite(c.ci_low) else ""
            row[f"{metric} ratio"] = f"{_f(c.ratio)}{ci}"
            if metric == PRIMARY and tested:
                row[f"{metric} cliffs_delta"] = _f(c.cliffs_delta, 2)
                row[f"{metric} p"] = _f(c.p_value, 2)
                row[f"{metric} q"] = _f(c.q_value, 2)
        rows.append(row)
    return pd.DataFrame(rows).fillna("")


def fluctuation_findings(data: ReportData) -> list[str]:
    """One sentence per variant: does it fluctuate more than the baseline (primary metric), with numbers."""
    base = data.baseline
    need = stats.min_seeds_for(ALPHA)
    if len(data.runs.variants) < 2:
        return [f"Only one variant (`{base}`): nothing to compare; pass --group-by to split the runs."]
    out = []
    for variant in data.runs.variants[1:]:
        cmp = data.comparisons[(data.comparisons["metric"] == PRIMARY) & (data.comparisons["variant"] == variant)]
        if cmp.empty:
            continue
        c = cmp.iloc[0]
        nv, nb = int(c.n_variant), int(c.n_baseline)
        head = (f"`{variant}` vs `{base}`: {PRIMARY} {_f(_median(data, variant, PRIMARY))} vs "
                f"{_f(_median(data, base, PRIMARY))} (median of {nv} vs {nb} runs), ratio {_f(c.ratio)}")
        if min(nv, nb) == 0:
            out.append(f"`{variant}` vs `{base}`: {PRIMARY} cannot be computed for the runs of "
                       f"`{variant if nv == 0 else base}` (too few epochs from --from-epoch {data.from_epoch}).")
            continue
        if not np.isfinite(c.p_value):
            out.append(f"{head}. Descriptive only: with {min(nv, nb)} run(s) in an arm no test is possible; "
                       f"a two-sided permutation test needs at least {need} seeds per variant to reach "
                       f"the {ALPHA} level.")
            continue
        verdict = _verdict(c)
        floor = stats.p_floor(nv, nb)
        tail = ""
        if floor > ALPHA:
            tail = (f" With {nv} vs {nb} runs the smallest attainable p is {floor:.2g}, so this comparison cannot "
                    f"reach {ALPHA}; run at least {need} seeds per variant.")
        out.append(f"{head} (95% CI {_f(c.ci_low)} to {_f(c.ci_high)}), Cliff's delta {_f(c.cliffs_delta, 2)}, "
                   f"{_p_text(c.p_value)} (two-sided permutation), q = {c.q_value:.2g}: {verdict}.{tail}")
    return out


def _verdict(c) -> str:
    if c.p_value <= ALPHA and c.ratio > 1:
        return "it fluctuates more than the baseline"
    if c.p_value <= ALPHA and c.ratio < 1:
        return "it fluctuates less than the baseline"
    return f"no difference detected at the {ALPHA} level"


def gate_findings(data: ReportData) -> list[str]:
    """Sentences on flip-share coupling per layer, across-run association and gamma drift."""
    return [*_coupling_lines(data), *_association_lines(data), *_drift_lines(data)]


def _coupling_lines(data: ReportData) -> list[str]:
    out = []
    for variant in data.runs.variants:
        ok = data.flip_coupling[(data.flip_coupling["variant"] == variant) & data.flip_coupling["rho"].notna()]
        if ok.empty:
            continue
        top, low = ok.iloc[0], ok.iloc[-1]
        p = (f"; per-run rhos differ from 0 with {_p_text(top.p_value)} (sign-flip test over "
             f"{int(top.n_runs)} runs)" if np.isfinite(top.p_value) else "")
        ranked = ", ".join(f"{r.layer} ({_f(r.rho, 2)})" for r in ok.itertuples())
        out.append(f"`{variant}`: the first difference of the flip share moves with |delta val loss| most in "
                   f"{top.layer} (Spearman rho = {_f(top.rho, 2)} over {int(top.n_pairs)} epoch pairs from "
                   f"{int(top.n_runs)} run(s), median per-run rho {_f(top.rho_run_median, 2)}{p}) and least in "
                   f"{low.layer} (rho = {_f(low.rho, 2)}). Layers ranked: {ranked}.")
    return out


def _association_lines(data: ReportData) -> list[str]:
    assoc = data.gate_association
    if assoc.empty or not assoc["rho"].notna().any():
        return []
    ok = assoc[assoc["rho"].notna()]
    tested = not data.descriptive  # one run per variant: the association is descriptive
    parts = [f"{r.gate_stat} rho = {_f(r.rho, 2)}"
             + (f" ({_p_text(r.p_value)})" if tested and np.isfinite(r.p_value) else "") for r in ok.itertuples()]
    return [f"Across the {int(ok['n_runs'].max())} runs with gates (variants pooled, so differences between "
            f"variants count too), {PRIMARY} rises or falls with: " + "; ".join(parts) + "."]


def _drift_lines(data: ReportData) -> list[str]:
    if data.gates.empty:
        return []
    drift = gates.final_stat(data.gates, "sru", "gamma_drift")
    out = []
    for variant in data.runs.variants:
        vals = drift.loc[drift["variant"] == variant, "value"].to_numpy(dtype=float)
        if not vals.size:
            continue
        mode = _param_of(data, variant, "scconv.gate_mode")
        note = ""
        if mode == "binary":
            how = ("gamma never moved, so it does not learn" if np.all(vals == 0)
                   else "gamma moved only through terms outside the loss, such as weight decay")
            note = f" The binary gate passes no gradient to gamma (scconv-spec.md): {how}."
        out.append(f"`{variant}` (gate_mode {mode or 'unknown'}): gamma drift from its initial value at the last epoch "
                   f"is {_f(float(np.median(vals)))} (median over layers; range {_f(vals.min())} to {_f(vals.max())})."
                   f"{note}")
    return out


def _param_of(data: ReportData, variant: str, param: str) -> str | None:
    if param not in data.runs.params:
        return None
    ids = data.runs.runs.index[data.runs.runs["variant"] == variant]
    values = data.runs.params.loc[ids, param].dropna().unique()
    return values[0] if len(values) == 1 else None


def churn_findings(data: ReportData) -> list[str]:
    """Per variant: how much of the val-loss movement comes from examples whose prediction did not change."""
    out = []
    if data.churn.empty:
        return out
    for variant in data.runs.variants:
        grp = data.churn[data.churn["variant"] == variant]
        if grp.empty:
            continue
        share = grp["stable_pred_share_of_change_pooled"].median()
        kinds = grp["kind"].value_counts()
        out.append(f"`{variant}`: {_f(100 * share, 3)}% of the val-loss movement comes from examples whose prediction "
                   f"did not change (median of {len(grp)} runs; runs by fluctuation kind: "
                   + ", ".join(f"{k} {n}" for k, n in kinds.items())
                   + f"); predictions flip for {_f(100 * grp['flip_rate_mean'].median(), 3)}% of images per epoch.")
    return out


def sensitivity_findings(data: ReportData) -> list[str]:
    """Sensitivity of masks and attributions, each variant against the baseline."""
    if data.sensitivity is None or data.sensitivity.empty:
        return []
    out = []
    for r in data.sensitivity.itertuples():
        mask = (f", gate masks {_f(r.mask_sensitivity)} with {_f(100 * r.flip_share, 3)}% of gate bits flipping"
                if np.isfinite(r.mask_sensitivity) else "")
        out.append(f"`{r.label}` (run {r.run_id[:8]}): GradCAM sensitivity at {r.layer} {_f(r.attribution_sensitivity)}"
                   f"{mask} (captum sensitivity_max, {r.n_images} images, {r.n_perturb} perturbations of "
                   f"radius {r.radius}).")
    return out


def header_lines(data: ReportData) -> list[str]:
    """What was read and how it was grouped."""
    rs = data.runs
    per = ", ".join(f"`{v}` {n}" for v, n in data.runs_per_variant().items())
    group = (f"variants grouped by {', '.join(rs.group_by)}" if rs.group_by
             else "no param varies apart from the seed, so all runs form one variant")
    lines = [f"Experiment `{rs.experiment_name}`: {len(rs.runs)} FINISHED runs with train/val loss histories; "
             f"{group}; baseline `{data.baseline}`; runs per variant: {per}."]
    if rs.skipped:
        reasons = pd.Series([s[2] for s in rs.skipped]).value_counts()
        lines.append("Skipped: " + "; ".join(f"{n} run(s) with {r}" for r, n in reasons.items()) + ".")
    if data.from_epoch:
        lines.append(f"Metrics use epochs >= {data.from_epoch}.")
    need = stats.min_seeds_for(ALPHA)
    fewest = min(data.runs_per_variant().values(), default=0)
    if fewest < need:
        lines.append(f"This report is descriptive: with {fewest} run(s) in the smallest variant no p-value is "
                     f"supported; a two-sided permutation test needs at least {need} seeds per variant to reach "
                     f"the {ALPHA} level (e.g. `ablate study --space stability_seeds`).")
    lines.extend(data.notes)
    return lines


def definitions(data: ReportData) -> dict[str, str]:
    """One-line definition of each metric in the key table."""
    return {m: fluctuation.METRIC_DOCS.get(m, m) for m in get_fluctuation_info(data).metrics}


def summary_markdown(data: ReportData) -> str:
    """summary.md: header, key table, findings by section, definitions."""
    parts = [f"# Fluctuation report: {data.runs.experiment_name}", "", *header_lines(data), "",
             "## Key table", "", _markdown_table(key_table(data)), ""]
    for title, lines in _sections(data):
        parts += [f"## {title}", "", *[f"- {line}" for line in lines], ""]
    parts += ["## Definitions", "", *[f"- `{k}`: {v}" for k, v in definitions(data).items()], ""]
    return "\n".join(parts)


def _sections(data: ReportData) -> list[tuple[str, list[str]]]:
    sections = [("Does the variant fluctuate more than the baseline?", fluctuation_findings(data)),
                ("Gates", gate_findings(data)), ("Prediction churn", churn_findings(data)),
                ("Sensitivity to input perturbations", sensitivity_findings(data))]
    return [(t, lines) for t, lines in sections if lines]


def _markdown_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


# -- write and log -----------------------------------------------------------------------------


def figures(data: ReportData) -> list:
    """Every figure of the report, in page order."""
    figs = [get_loss_curves_plot(get_loss_curves_info(data))]
    info = get_fluctuation_info(data)
    if info.metrics:
        figs.append(get_fluctuation_plot(info, data.baseline))
    for kind, stat in gates.LAYER_STATS:
        heat = get_gate_heatmap_info(data, kind, stat)
        if heat is not None:
            figs.append(get_gate_heatmap_plot(heat))
    if len(data.flip_points):
        figs.append(get_flip_scatter_plot(get_flip_scatter_info(data)))
    return figs


def _md_inline(text: str) -> str:
    """Escape for HTML and turn `code` spans into <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def index_html(data: ReportData) -> str:
    """The HTML page: summary, key table, findings and figures (plotly.js embedded once)."""
    body = [f"<h1>Fluctuation report: {html.escape(data.runs.experiment_name)}</h1>"]
    body += [f"<p>{_md_inline(line)}</p>" for line in header_lines(data)]
    body += ["<h2>Key table</h2>", key_table(data).to_html(index=False, escape=True, border=0)]
    for title, lines in _sections(data):
        body += [f"<h2>{html.escape(title)}</h2>", "<ul>", *[f"<li>{_md_inline(line)}</li>" for line in lines], "</ul>"]
    body.append("<h2>Figures</h2>")
    for i, fig in enumerate(figures(data)):
        body.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    body += ["<h2>Definitions</h2>", "<ul>",
             *[f"<li><code>{html.escape(k)}</code>: {html.escape(v)}</li>" for k, v in definitions(data).items()], "</ul>"]
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
             "table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd}")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Fluctuation report</title>"
            f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>")


def csv_tables(data: ReportData) -> dict[str, pd.DataFrame]:
    """File name -> table, for the tables that have rows."""
    tables = {"comparisons.csv": data.comparisons[list(stats.RESULT_COLUMNS)], "run_metrics.csv": data.run_metrics,
              "gate_layer_epoch.csv": data.layer_stats, "flip_coupling.csv": data.flip_coupling,
              "gate_association.csv": data.gate_association, "churn.csv": data.churn}
    if data.sensitivity is not None:
        tables["sensitivity.csv"] = data.sensitivity
    return {name: t for name, t in tables.items() if name in ("comparisons.csv", "run_metrics.csv") or len(t)}


def write_report(data: ReportData, out_dir: str | Path) -> Path:
    """Write index.html, summary.md and the CSV tables into ``out_dir``; returns the index.html path.

    Everything is rendered first, then written, so a failure leaves no half-written report.
    """
    out = Path(out_dir)
    page = index_html(data)
    summary = summary_markdown(data)
    tables = csv_tables(data)
    out.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        table.to_csv(out / name, index=False)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"


def log_report(client, data: ReportData, out_dir: str | Path) -> str:
    """Log the report folder as artifacts (``report/``) of the study's parent run, else of a new report run."""
    parent = study_parent_run(client, data.runs.experiment_id)
    tags = {"ablate.report.baseline": data.baseline, "ablate.report.group_by": ",".join(data.runs.group_by),
            "ablate.report.from_epoch": str(data.from_epoch)}
    if parent is not None:
        run_id = parent.info.run_id
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
        client.log_artifacts(run_id, str(out_dir), REPORT_ARTIFACT_DIR)
        return run_id
    run = client.create_run(data.runs.experiment_id, run_name=f"report-{data.runs.experiment_name}",
                            tags={"ablate.role": REPORT_ROLE, **tags})
    try:
        client.log_artifacts(run.info.run_id, str(out_dir), REPORT_ARTIFACT_DIR)
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


def make_report(client, experiment: str, out_dir: str | Path, group_by: Sequence[str] | None = None,
                baseline: str | None = None, from_epoch: int = 0, sensitivity: bool = False,
                log: bool = True) -> tuple[Path, str | None]:
    """Validate and compute, then write the report and (``log``) log it to MLflow: (index.html, run id)."""
    data = build_report_data(client, experiment, group_by, baseline, from_epoch, sensitivity)
    index = write_report(data, out_dir)
    run_id = log_report(client, data, out_dir) if log else None
    return index, run_id
