"""The report's "Mechanism evidence": what the gate mode implies, the scale-free gate statistics, flip coupling,
gate association and perturbation sensitivity, as sentences, CSV tables and figures.

:func:`mechanism_section` is what the report shows; every number comes from a table it also returns, so the
page and the CSV files cannot disagree. Sentences claim a coupling, association or sensitivity difference only
when its BH q-value is at most ``ALPHA``; everything else is reported with its numbers and no ranking.
The sensitivity comparison is exploratory: its own BH family, separate from the report's primary family.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from ablate.names import SENS_KINDS, SENS_SLOPE_METRIC
from ablate.ui.palette import variant_colors
from analysis import gates, stats
from analysis.report.data import ALPHA, PRIMARY, ReportData
from analysis.report.flip_scatter import get_flip_scatter_info, get_flip_scatter_plot

#: ``sens/slope`` at or below this reads as the hard-gate 1/sqrt(eps) signature (half way between a smooth
#: network's 0 and a hard gate's -0.5; docs/scconv.md measures -0.43 to -0.57 for binary, about 0 otherwise).
HARD_GATE_SLOPE = -0.25
SENS_COLUMNS = ["variant", "metric", "eps", "median", "min", "max", "n_runs", "vs_baseline", "p_value", "q_value"]
GATE_SUMMARY_COLUMNS = ["variant", "stat", "median", "min", "max", "n_runs"]

#: What each SRU gate mode implies, in words (ablate/nn/sru.py, ``SRU.gate``).
GATE_MODE_TEXT = {
    "binary": ("W1 = 1[R > t] is a step function of R, so no gradient reaches GroupNorm's gamma or beta: the SRU has "
               "no trainable parameter (gamma and beta move only through terms outside the loss, such as weight "
               "decay). With gamma and beta at their initial 1 and 0 and t = 0.5, the mask is x > the per-sample "
               "group mean. The mask is discontinuous in the input, so the output change per unit input "
               "perturbation grows like 1/sqrt(eps) (`sens/slope` near -0.5)"),
    "ste": ("the forward pass is the binary mask 1[R > t] (the same discontinuity and 1/sqrt(eps) sensitivity as "
            "`binary`); the backward pass takes dW1/dR = 1, so gamma and beta learn through that surrogate"),
    "soft": ("W1 = R and W2 = 1 - R: the gate is smooth, gamma and beta get gradients and no mask bit jumps, so "
             "the output sensitivity is flat in eps (`sens/slope` near 0)"),
    "reference": ("positions with R > t get weight 1 and the others R: gamma and beta get gradients through the "
                  "positions below t, and W1 jumps from t to 1 (W2 from t to 0) where R crosses t: a "
                  "discontinuity like the binary gate's, of size 1 - t instead of 1"),
}


class MechanismSection(NamedTuple):
    """What the report's "Mechanism evidence" part shows."""

    lines: list[str]  #: markdown sentences, in page order
    tables: dict[str, pd.DataFrame]  #: CSV file name -> table (only tables with rows)
    figures: list  #: plotly figures, in page order


def mechanism_section(data: ReportData) -> MechanismSection:
    """Sentences, CSV tables and figures of the "Mechanism evidence" part of the report."""
    gate_summary = scale_free_summary(data.run_metrics)
    sens = sensitivity_table(data.runs.history, data.runs.runs, data.baseline, data.runs.variants, data.from_epoch)
    lines = [*gate_mode_lines(data), *gate_summary_lines(gate_summary), *coupling_lines(data.flip_coupling),
             *association_lines(data.gate_association), *sensitivity_lines(sens, data.baseline)]
    tables = {"flip_coupling.csv": data.flip_coupling, "gate_association.csv": data.gate_association,
              "gate_scale_free.csv": gate_summary, "perturbation_sensitivity.csv": sens}
    figures = []
    if len(data.flip_points) and data.flip_points["flip_resid"].notna().any():
        figures.append(get_flip_scatter_plot(get_flip_scatter_info(data)))
    curves = get_sensitivity_info(sens, data.runs.variants)
    if curves.variants:
        figures.append(get_sensitivity_plot(curves))
    return MechanismSection(lines, {k: t for k, t in tables.items() if len(t)}, figures)


def mechanism_lines(data: ReportData) -> list[str]:
    """The sentences of :func:`mechanism_section` (for the report's Findings)."""
    return mechanism_section(data).lines


# -- what the gate mode implies ---------------------------------------------------------------


def gate_modes(params: pd.DataFrame, runs: pd.DataFrame, gated: set[str]) -> dict[str, str | None]:
    """Variant -> its runs' ``scconv.gate_mode`` (None when missing or mixed), for the variants in ``gated``."""
    out: dict[str, str | None] = {}
    for variant in gated:
        ids = runs.index[runs["variant"] == variant]
        values = (params.loc[ids, "scconv.gate_mode"].dropna().unique()
                  if "scconv.gate_mode" in params.columns else [])
        out[variant] = str(values[0]) if len(values) == 1 else None
    return out


def _thresholds(params: pd.DataFrame, runs: pd.DataFrame) -> dict[str, float]:
    """Variant -> its ``scconv.gate_threshold`` when every run logged the same number."""
    if "scconv.gate_threshold" not in params.columns:
        return {}
    values = pd.to_numeric(params["scconv.gate_threshold"], errors="coerce").groupby(runs["variant"]).unique()
    return {v: float(vals[0]) for v, vals in values.items() if len(vals) == 1 and np.isfinite(vals[0])}


def gate_mode_lines(data: ReportData) -> list[str]:
    """One sentence per gate mode in use (its variants named): what the mode implies, then each variant's measured
    gamma drift and, for a hard gate, a threshold other than 0.5."""
    if data.gates.empty:
        return []
    sru = data.gates[data.gates["kind"] == "sru"]
    modes = gate_modes(data.runs.params, data.runs.runs, set(sru["variant"]))
    thresholds = _thresholds(data.runs.params, data.runs.runs)
    drift = sru[sru["stat"] == "gamma_drift"]
    ordered = [v for v in data.runs.variants if v in modes]
    out = []
    unknown = [v for v in ordered if modes[v] is None]
    if unknown:
        out.append(f"{_names(unknown)}: gate mode unknown or mixed across the runs (param `scconv.gate_mode`).")
    for mode in dict.fromkeys(modes[v] for v in ordered if modes[v] is not None):
        variants = [v for v in ordered if modes[v] == mode]
        verb = "uses" if len(variants) == 1 else "use"
        text = f"{_names(variants)} {verb} gate mode `{mode}`: {GATE_MODE_TEXT.get(mode, 'no description')}."
        for variant in variants:
            if mode in ("binary", "ste") and thresholds.get(variant) not in (None, 0.5):
                text += (f" `{variant}` has threshold t = {thresholds[variant]:g}, not 0.5, so at init its mask is "
                         "x > group mean + (logit(t) / w) x group SD, with w = 1/C.")
        measured = []
        for variant in variants:
            mine = drift[drift["variant"] == variant]
            if len(mine):
                last = mine[mine["epoch"] == mine.groupby("run_id")["epoch"].transform("max")]["value"]
                measured.append(f"`{variant}` median {_f(last.median())}, max {_f(last.max())} "
                                f"({mine['run_id'].nunique()} runs)")
        if measured:
            text += " Measured gamma drift from init at the last epoch (over runs and layers): " + "; ".join(measured) + "."
        out.append(text)
    return out


def _names(variants) -> str:
    return ", ".join(f"`{v}`" for v in variants)


# -- scale-free gate statistics ---------------------------------------------------------------


def scale_free_summary(run_metrics: pd.DataFrame) -> pd.DataFrame:
    """Per variant and scale-free stat: median, min, max over runs of the run's mean over layers and epochs."""
    rows = []
    for stat in gates.SCALE_FREE_STATS:
        col = f"gate.sru.{stat}"
        if col not in run_metrics:
            continue
        for variant, vals in run_metrics.groupby("variant", sort=False)[col]:
            vals = vals.dropna()
            if len(vals):
                rows.append({"variant": variant, "stat": stat, "median": vals.median(), "min": vals.min(),
                             "max": vals.max(), "n_runs": len(vals)})
    return pd.DataFrame(rows, columns=GATE_SUMMARY_COLUMNS)


def gate_summary_lines(summary: pd.DataFrame) -> list[str]:
    """One sentence per variant with both scale-free statistics (median and range over runs), then what they mean."""
    out = []
    for variant, grp in summary.groupby("variant", sort=False):
        parts = [f"{r.stat} {_f(r.median)} (range {_f(r.min)} to {_f(r.max)})" for r in grp.itertuples()]
        out.append(f"`{variant}` gate statistics (mean over layers and epochs, median over {int(grp['n_runs'].max())} "
                   f"run(s)): " + "; ".join(parts) + ".")
    if out:
        out.append("margin_share: share of positions whose gate logit lies within 0.1 of its own SD from the "
                   "threshold's; perturb_flip_share: share of the bits R > t (the mask a hard gate uses) that flip "
                   "under a fixed 1e-3 RMS input perturbation. Both are scale-free; near_threshold_share is not "
                   "shown: it is about 1 by construction (R stays near 0.5 when w = gamma / sum(gamma) is about 1/C).")
    return out


# -- flip coupling and association ------------------------------------------------------------


def coupling_lines(coupling: pd.DataFrame, alpha: float = ALPHA) -> list[str]:
    """Significant couplings (q <= alpha) with their numbers, else one sentence saying none was found."""
    tested = coupling[coupling["p_value"].notna()]
    if coupling.empty:
        return []
    method = ("per run, Spearman rho of the detrended flip share vs the detrended |delta val loss| per epoch; "
              "t-test of the runs' Fisher-z rhos; BH over every variant and layer")
    if tested.empty:
        return [f"Flip coupling ({method}): not tested, no variant has {gates.MIN_COUPLING_RUNS} runs with at least "
                f"{gates.MIN_COUPLING_EPOCHS} epoch pairs in the window; per-layer values in flip_coupling.csv."]
    hits = tested[tested["q_value"] <= alpha]
    if hits.empty:
        best = tested.loc[tested["q_value"].idxmin()]
        return [f"Flip coupling ({method}): no layer's flip share goes with the jumps of val loss at q <= {alpha} "
                f"({len(tested)} variant-layer pairs tested, smallest q = {best.q_value:.2g}); "
                "per-layer rhos in flip_coupling.csv."]
    found = "; ".join(f"`{r.variant}` {r.layer}: mean per-run rho {_f(r.rho, 2)}, p = {r.p_value:.2g}, "
                      f"q = {r.q_value:.2g}, {int(r.n_runs)} runs" for r in hits.itertuples())
    return [f"Flip coupling ({method}): {len(hits)} of {len(tested)} variant-layer pairs at q <= {alpha}: {found}."]


def association_lines(assoc: pd.DataFrame, alpha: float = ALPHA) -> list[str]:
    """Within-variant associations of gate statistics with the primary metric: only q <= alpha ones are claimed."""
    if assoc.empty:
        return []
    tested = assoc[assoc["p_value"].notna()]
    if tested.empty:
        return [f"Gate statistics vs {PRIMARY} within each variant: not tested (fewer than 3 runs per variant, "
                "or a statistic constant across runs)."]
    hits = tested[tested["q_value"] <= alpha]
    n = int(tested["n_runs"].max())
    if hits.empty:
        return [f"Gate statistics vs {PRIMARY} across the runs of each variant (Spearman, permutation p, BH over "
                f"{len(tested)} variant-statistic pairs, up to {n} runs each): no association at q <= {alpha} "
                f"(smallest q = {tested['q_value'].min():.2g}); values in gate_association.csv."]
    found = "; ".join(f"`{r.variant}` {r.gate_stat}: rho {_f(r.rho, 2)}, p = {r.p_value:.2g}, q = {r.q_value:.2g}, "
                      f"{int(r.n_runs)} runs" for r in hits.itertuples())
    return [f"Gate statistics vs {PRIMARY} across the runs of each variant: {found}."]


# -- perturbation sensitivity -----------------------------------------------------------------


def sens_metrics(names) -> list[tuple[str, str, float]]:
    """``(metric, kind, eps)`` of every sensitivity metric among ``names``; the slope has kind "slope", eps NaN."""
    out = []
    for name in names:
        if name == SENS_SLOPE_METRIC:
            out.append((name, "slope", float("nan")))
            continue
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "sens" and parts[1] in SENS_KINDS and parts[2].startswith("eps_"):
            try:
                out.append((name, parts[1], float(parts[2][4:])))
            except ValueError:
                continue
    return sorted(out, key=lambda m: (m[1], m[2]))


def run_sensitivity(history: pd.DataFrame, from_epoch: int = 0) -> pd.DataFrame:
    """One row per run, one column per sensitivity metric: the median over the run's epochs >= from_epoch."""
    names = [m for m, _, _ in sens_metrics(history["metric"].unique())]
    sel = history[history["metric"].isin(names) & (history["epoch"] >= from_epoch)]
    if sel.empty:
        return pd.DataFrame()
    table = sel.pivot_table(index="run_id", columns="metric", values="value", aggfunc="median")
    table.columns.name = None
    return table


def sensitivity_table(history: pd.DataFrame, runs: pd.DataFrame, baseline: str, variants, from_epoch: int = 0,
                      seed: int = 0) -> pd.DataFrame:
    """Per variant and sensitivity metric: :data:`SENS_COLUMNS`.

    Run value: median over the run's epochs >= from_epoch. ``vs_baseline``: median over the variant's runs / the
    baseline's (for ``sens/slope``: the difference of medians). ``p_value``: two-sided permutation test of the
    difference of means against the baseline, on log values for ``sens/out`` and ``sens/loss`` (sensitivities
    span orders of magnitude; a mean of logs is a log geometric mean) and raw for the slope; NaN with fewer than 2
    runs in an arm. ``q_value``: BH over this table's p-values (an exploratory family of its own).
    """
    per_run = run_sensitivity(history, from_epoch)
    if per_run.empty:
        return pd.DataFrame(columns=SENS_COLUMNS)
    per_run = per_run.join(runs["variant"])
    rows = []
    for metric, kind, eps in sens_metrics(per_run.columns):
        base = per_run.loc[per_run["variant"] == baseline, metric].dropna().to_numpy(dtype=float)
        for variant in variants:
            vals = per_run.loc[per_run["variant"] == variant, metric].dropna().to_numpy(dtype=float)
            if not vals.size:
                continue
            row = {"variant": variant, "metric": metric, "eps": eps, "median": float(np.median(vals)),
                   "min": float(vals.min()), "max": float(vals.max()), "n_runs": int(vals.size),
                   "vs_baseline": float("nan"), "p_value": float("nan")}
            if variant != baseline and base.size:
                log = kind != "slope" and (vals > 0).all() and (base > 0).all()
                if kind == "slope":
                    row["vs_baseline"] = row["median"] - float(np.median(base))
                elif np.median(base) > 0:
                    row["vs_baseline"] = row["median"] / float(np.median(base))
                a, b = (np.log(vals), np.log(base)) if log else (vals, base)
                row["p_value"] = stats.permutation_pvalue(a, b, seed=seed)
            rows.append(row)
    table = pd.DataFrame(rows, columns=[c for c in SENS_COLUMNS if c != "q_value"])
    table["q_value"] = gates.bh_qvalues(table["p_value"])
    return table[SENS_COLUMNS]


def sensitivity_lines(sens: pd.DataFrame, baseline: str, alpha: float = ALPHA) -> list[str]:
    """Per variant: its ``sens/slope`` (median, range) and whether it reads as the hard-gate signature, how the slope
    compares with the baseline's, and the eps at which output or loss sensitivity differs from the baseline at
    q <= alpha."""
    if sens.empty:
        return []
    out = []
    base_runs = sens.loc[sens["variant"] == baseline, "n_runs"]
    for variant in dict.fromkeys(sens["variant"]):
        mine = sens[sens["variant"] == variant]
        slope = mine[mine["metric"] == SENS_SLOPE_METRIC]
        if len(slope):
            r = slope.iloc[0]
            reading = ("reads as the hard-gate 1/sqrt(eps) signature" if r["median"] <= HARD_GATE_SLOPE
                       else "a flat sensitivity (no hard-gate signature)")
            text = (f"`{variant}`: `sens/slope` {_f(r['median'], 2)} (range {_f(r['min'], 2)} to {_f(r['max'], 2)}, "
                    f"{int(r['n_runs'])} run(s)): {reading}")
            if variant != baseline and np.isfinite(r["p_value"]):
                verdict = "differs from" if r["q_value"] <= alpha else f"not different at q <= {alpha} from"
                text += (f"; {verdict} `{baseline}` (difference {_f(r['vs_baseline'], 2)}, p = {r['p_value']:.2g}, "
                         f"q = {r['q_value']:.2g})")
        else:
            text = f"`{variant}`: no `sens/slope` logged"
        tested = mine[(mine["metric"] != SENS_SLOPE_METRIC) & mine["p_value"].notna()]
        for kind in SENS_KINDS:
            rows = tested[tested["metric"].str.startswith(f"sens/{kind}/")
                          & (tested["q_value"] <= alpha)].sort_values("eps")
            if len(rows):
                text += (f"; {kind} sensitivity vs `{baseline}` at q <= {alpha}: "
                         + ", ".join(f"x{_f(h.vs_baseline, 2)} at eps {h.eps:g}" for h in rows.itertuples())
                         + f" (q <= {rows['q_value'].max():.2g})")
        if len(tested) and not (tested["q_value"] <= alpha).any():
            text += f"; output and loss sensitivity not different from `{baseline}` at q <= {alpha} at any eps"
        if variant != baseline and len(base_runs):
            n_var, n_base = int(mine["n_runs"].min()), int(base_runs.min())
            floor = stats.p_floor(n_var, n_base)
            if np.isfinite(floor) and floor > alpha:
                text += (f" (with {n_var} vs {n_base} runs the smallest attainable p is {floor:.2g}, so no difference "
                         f"can reach {alpha})")
        out.append(text + ".")
    out.append("Sensitivity tests are exploratory (their own BH family; permutation test against the baseline on "
               "log values of each run's median over epochs, raw values for the slope); all values in "
               "perturbation_sensitivity.csv.")
    return out


class SensitivityInfo(NamedTuple):
    """Median output sensitivity per eps for each variant, with the range over runs."""

    variants: list[str]
    eps: dict[str, list[float]]
    median: dict[str, list[float]]
    low: dict[str, list[float]]
    high: dict[str, list[float]]
    colors: dict[str, str]


def get_sensitivity_info(sens: pd.DataFrame, variants) -> SensitivityInfo:
    """Output sensitivity (``sens/out``) against eps per variant, from :func:`sensitivity_table`."""
    out = sens[sens["metric"].str.startswith("sens/out/")] if len(sens) else sens
    present = [v for v in variants if len(out) and v in set(out["variant"])]
    info = SensitivityInfo(present, {}, {}, {}, {}, variant_colors(variants))
    for v in present:
        grp = out[out["variant"] == v].sort_values("eps")
        info.eps[v], info.median[v] = grp["eps"].tolist(), grp["median"].tolist()
        info.low[v], info.high[v] = grp["min"].tolist(), grp["max"].tolist()
    return info


def get_sensitivity_plot(info: SensitivityInfo):
    """Log-log output sensitivity vs eps, one line per variant (median over runs, range as error bars)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for v in info.variants:
        med = np.asarray(info.median[v])
        fig.add_trace(go.Scatter(
            x=info.eps[v], y=med, mode="lines+markers", name=v, line={"color": info.colors[v]},
            error_y={"type": "data", "symmetric": False, "array": np.asarray(info.high[v]) - med,
                     "arrayminus": med - np.asarray(info.low[v])}))
    fig.update_layout(title="Output change per unit input perturbation (median over runs, range as bars); "
                            "slope -0.5 is a hard gate", height=450)
    fig.update_xaxes(type="log", title_text="eps (perturbation / RMS of the input)")
    fig.update_yaxes(type="log", title_text="||f(x + delta) - f(x)|| / ||delta||")
    return fig


def _f(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}g}"
