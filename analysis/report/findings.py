"""The report's words: the header, the key table, and the findings as English sentences with their numbers.

The findings open the report (``findings_sections``): the pre-declared question first, each variant against
the baseline on ``PRIMARY`` with the ratio of geometric means, its CI (by inverting the permutation test) and
its BH q over the primary family; supported effects ranked by effect size, then what was tested and not
supported, then exploratory results (secondary metrics, their own BH family), then the mechanism evidence.
An arm with fewer runs than ``analysis.stats.min_seeds_for(ALPHA)`` gets "too few runs" instead of a CI.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis import fluctuation, stats
from analysis.report.data import ALPHA, PRIMARY, ReportData
from analysis.report.fluctuation_bars import get_fluctuation_info

EXPLORATORY_SHOWN = 8  #: exploratory rows listed in the findings (the rest are in comparisons.csv)


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


def too_few(c) -> str | None:
    """"too few runs (n=..., need ...)" when an arm of comparison row ``c`` is below ``min_seeds_for(ALPHA)``."""
    need = stats.min_seeds_for(ALPHA)
    n = min(int(c.n_variant), int(c.n_baseline))
    return f"too few runs (n={n}, need {need})" if n < need else None


def _estimate_text(c) -> str:
    """"ratio 1.5 [1.1, 2.2]" (or "difference ..."), or the estimate and "too few runs" without a CI."""
    name = "ratio" if c.statistic == stats.RATIO else "difference"
    short = too_few(c)
    if short:
        return f"{name} {_f(c.estimate)}, {short}"
    return f"{name} {_f(c.estimate)} [{_f(c.ci_low)}, {_f(c.ci_high)}]"


def key_table(data: ReportData) -> pd.DataFrame:
    """Per variant: runs, and per key metric the median and estimate to baseline [CI] (+ delta, p, q on the primary)."""
    tested = has_tests(data)
    rows = []
    for variant in data.runs.variants:
        row = {"variant": variant, "runs": data.runs_per_variant()[variant]}
        for metric in get_fluctuation_info(data).metrics:
            row[metric] = _f(_median(data, variant, metric))
            cmp = data.comparisons[(data.comparisons["metric"] == metric) & (data.comparisons["variant"] == variant)]
            if variant == data.baseline or cmp.empty:
                row[f"{metric} vs baseline"] = "baseline" if variant == data.baseline else "n/a"
                continue
            c = cmp.iloc[0]
            row[f"{metric} vs baseline"] = _estimate_text(c)
            if metric == PRIMARY and tested:
                row[f"{metric} cliffs_delta"] = _f(c.cliffs_delta, 2)
                row[f"{metric} p"] = _f(c.p_value, 2)
                row[f"{metric} q"] = _f(c.q_value, 2)
        rows.append(row)
    return pd.DataFrame(rows).fillna("")


def _primary(data: ReportData) -> pd.DataFrame:
    cmp = data.comparisons
    return cmp[cmp["family"] == stats.PRIMARY_FAMILY] if len(cmp) else cmp


def _effect(c) -> float:
    """Effect size for ranking: |log ratio| (or |Cliff's delta| for a difference of means)."""
    if c.statistic == stats.RATIO and np.isfinite(c.estimate) and c.estimate > 0:
        return abs(float(np.log(c.estimate)))
    return abs(float(c.cliffs_delta)) if np.isfinite(c.cliffs_delta) else 0.0


def _supported(c) -> bool:
    return bool(np.isfinite(c.q_value) and c.q_value <= ALPHA and too_few(c) is None)


def _primary_sentence(data: ReportData, c, family_size: int) -> str:
    base = data.baseline
    nv, nb = int(c.n_variant), int(c.n_baseline)
    head = (f"`{c.variant}` vs `{base}`: {PRIMARY} {c.statistic} {_f(c.estimate)} "
            f"(medians {_f(_median(data, c.variant, PRIMARY))} vs {_f(_median(data, base, PRIMARY))}, {nv} vs {nb} runs)")
    if min(nv, nb) == 0:
        return (f"`{c.variant}` vs `{base}`: {PRIMARY} cannot be computed for the runs of "
                f"`{c.variant if nv == 0 else base}` (too few epochs from epoch {data.from_epoch}).")
    short = too_few(c)
    if short:
        floor = stats.p_floor(nv, nb)
        floor_text = (f"; the smallest attainable p is {floor:.2g}" if np.isfinite(floor) else "; no test is possible")
        return f"{head}: {short} for a CI or a test at the {ALPHA} level{floor_text}."
    return (f"{head}, 95% CI {_f(c.ci_low)} to {_f(c.ci_high)} (inverted permutation test), "
            f"q = {c.q_value:.2g} (BH over the {family_size} primary comparisons; {_p_text(c.p_value)}), "
            f"Cliff's delta {_f(c.cliffs_delta, 2)}: {_verdict(c)}.")


def fluctuation_findings(data: ReportData) -> dict[str, list[str]]:
    """The primary question's sentences: ``supported`` (ranked by effect size) and ``not_supported``."""
    if len(data.runs.variants) < 2:
        return {"supported": [], "not_supported": [
            f"Only one variant (`{data.baseline}`): nothing to compare; pass --group-by to split the runs."]}
    primary = _primary(data)
    family = int(primary["p_value"].notna().sum())
    rows = sorted(primary.itertuples(), key=_effect, reverse=True)
    return {"supported": [_primary_sentence(data, c, family) for c in rows if _supported(c)],
            "not_supported": [_primary_sentence(data, c, family) for c in rows if not _supported(c)]}


def exploratory_findings(data: ReportData) -> list[str]:
    """Secondary metrics with q <= ALPHA in their own BH family, ranked by effect size; labelled exploratory."""
    cmp = data.comparisons
    rest = cmp[cmp["family"] == stats.EXPLORATORY_FAMILY] if len(cmp) else cmp
    tested = rest[rest["q_value"].notna()]
    if tested.empty:
        return []
    hits = sorted((c for c in tested.itertuples() if _supported(c)), key=_effect, reverse=True)
    lines = [f"`{c.variant}` {c.metric}: {_estimate_text(c)}, q = {c.q_value:.2g}" for c in hits[:EXPLORATORY_SHOWN]]
    more = f" ({len(hits) - EXPLORATORY_SHOWN} more in comparisons.csv)" if len(hits) > EXPLORATORY_SHOWN else ""
    intro = (f"Exploratory, not the pre-declared question: {len(hits)} of {len(tested)} secondary comparisons have "
             f"q <= {ALPHA} within their own BH family{more}" + (":" if hits else "."))
    return [intro, *lines]


def mechanism_findings(data: ReportData) -> list[str]:
    """The mechanism evidence sentences (``analysis.report.mechanism``, which also gives its tables and figures)."""
    from analysis.report.mechanism import mechanism_lines

    return mechanism_lines(data)


def findings_sections(data: ReportData) -> list[tuple[str, list[str]]]:
    """(title, sentences) of the Findings: supported, not supported, exploratory, mechanism (empty ones dropped)."""
    primary = fluctuation_findings(data)
    parts = [(f"Supported effects on {PRIMARY} (q <= {ALPHA}, ranked by effect size)", primary["supported"]),
             ("Tested and not supported", primary["not_supported"]),
             ("Exploratory (secondary metrics, own BH family)", exploratory_findings(data)),
             ("Mechanism evidence", mechanism_findings(data))]
    return [(t, lines) for t, lines in parts if lines]


def _verdict(c) -> str:
    """The sentence's conclusion, from q (the primary family's BH) and the estimate's side of no change."""
    if not (np.isfinite(c.q_value) and c.q_value <= ALPHA):
        return f"no difference supported at q <= {ALPHA}{_bounds(c)}"
    more = c.estimate > (1.0 if c.statistic == stats.RATIO else 0.0)
    return f"it fluctuates {'more' if more else 'less'} than the baseline"


def _bounds(c) -> str:
    """What an unsupported comparison still rules out: the effects outside its 95% CI (empty without a CI).

    A CI that holds 1 (or 0) but is narrow is a clear negative answer to "is the effect this large?"; the
    sentence says where that line lies, e.g. "; the CI rules out more than x1.23 and less than x0.585".
    """
    if not (np.isfinite(c.ci_low) and np.isfinite(c.ci_high)):
        return ""
    if c.statistic == stats.RATIO:
        return f"; the CI rules out more than x{_f(c.ci_high)} and less than x{_f(c.ci_low)}"
    return f"; the CI rules out differences above {_f(c.ci_high)} and below {_f(c.ci_low)}"


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


def window_line(data: ReportData) -> str:
    """Which epochs the metrics use and why (the window rule, or --from-epoch)."""
    if not data.window_rule:
        return f"Window: epochs >= {data.from_epoch}, set by --from-epoch."
    known = [e for e in data.settle_epochs.values() if e is not None]
    spread = (f"settle epochs over the {len(known)} runs {min(known)} to {max(known)}, median "
              f"{_f(float(np.median(known)))}" if known else "no run long enough to estimate its settle epoch")
    capped = (f"; capped at epoch {data.from_epoch} to leave {fluctuation.MIN_WINDOW} epochs, so some runs' "
              "transient is inside the window" if known and data.from_epoch < max(known) else "")
    return (f"Window: epochs >= {data.from_epoch}, by the window rule: a run settles at the first epoch where the "
            f"trend of its val_loss is within {fluctuation.SETTLE_FRACTION:g} of its initial fall of its lowest level; "
            f"the window starts at the latest settle epoch over all runs ({spread}{capped}), so no run's warm-up "
            f"counts as fluctuation. --from-epoch overrides it.")


def header_lines(data: ReportData) -> list[str]:
    """What was read, how it was grouped, the window and the pre-declared question."""
    rs = data.runs
    per = ", ".join(f"`{v}` {n}" for v, n in data.runs_per_variant().items())
    group = (f"variants grouped by {', '.join(rs.group_by)}" if rs.group_by
             else "no param varies apart from the seed, so all runs form one variant")
    lines = [f"Experiment `{rs.experiment_name}`: {len(rs.runs)} FINISHED runs with train/val loss histories; "
             f"{group}; baseline `{data.baseline}`; runs per variant: {per}."]
    if rs.skipped:
        reasons = pd.Series([s[2] for s in rs.skipped]).value_counts()
        lines.append("Skipped: " + "; ".join(f"{n} run(s) with {r}" for r, n in reasons.items()) + ".")
    lines.append(window_line(data))
    lines.append(f"Pre-declared question: does a variant change {PRIMARY} against the baseline? Statistic: ratio of "
                 f"geometric means over seeds; test: two-sided permutation test of the mean log difference; 95% CI: "
                 f"the ratios that test does not reject; Benjamini-Hochberg q over the variant-vs-baseline comparisons "
                 f"on {PRIMARY} only. Other metrics are exploratory, with their own BH family.")
    need = stats.min_seeds_for(ALPHA)
    fewest = min(data.runs_per_variant().values(), default=0)
    if fewest < need:
        lines.append(f"This report is descriptive: with {fewest} run(s) in the smallest variant no comparison can "
                     f"reach the {ALPHA} level; a two-sided permutation test needs at least {need} seeds per variant "
                     f"(e.g. `ablate study --space sru_cru_order`).")
    lines.extend(data.notes)
    return lines


def definitions(data: ReportData) -> dict[str, str]:
    """One-line definition of each metric in the key table."""
    return {m: fluctuation.METRIC_DOCS.get(m, m) for m in get_fluctuation_info(data).metrics}


def sections(data: ReportData) -> list[tuple[str, list[str]]]:
    """(title, sentences) of each detail section after the Findings that has something to say, in page order."""
    parts = [("Prediction churn", churn_findings(data)), ("Sensitivity to input perturbations", sensitivity_findings(data))]
    return [(t, lines) for t, lines in parts if lines]
