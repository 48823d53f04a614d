"""The report's words: the header, the key table, the findings as English sentences with their numbers.

Honest p-values: a sentence gives a p-value only when both arms have 2 or more runs; otherwise it says
how many seeds per variant a test needs (``analysis.stats.min_seeds_for``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis import fluctuation, stats
from analysis.report.data import ALPHA, PRIMARY, ReportData
from analysis.report.fluctuation_bars import get_fluctuation_info


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
    """The "Mechanism evidence" sentences (``analysis.report.mechanism``)."""
    from analysis.report.mechanism import mechanism_section

    return mechanism_section(data).lines


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


def sections(data: ReportData) -> list[tuple[str, list[str]]]:
    """(title, sentences) of each findings section that has something to say, in page order."""
    sections = [("Does the variant fluctuate more than the baseline?", fluctuation_findings(data)),
                ("Gates", gate_findings(data)), ("Prediction churn", churn_findings(data)),
                ("Sensitivity to input perturbations", sensitivity_findings(data))]
    return [(t, lines) for t, lines in sections if lines]
