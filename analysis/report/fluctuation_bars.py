"""Figure: the key fluctuation metrics per run, and each variant's estimate against the baseline with its CI."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd

from ablate.ui.palette import variant_color
from analysis.report.data import KEY_METRICS, ReportData


class FluctuationInfo(NamedTuple):
    """Per-run values of the key metrics, and their estimates against the baseline with CIs (``analysis.stats``)."""

    metrics: list[str]
    values: pd.DataFrame  # variant, seed, metric, value
    ratios: pd.DataFrame  # metric, variant, statistic, estimate, ci_low, ci_high, q_value
    baseline: str
    colors: dict[str, str]


def get_fluctuation_info(data: ReportData, metrics: Sequence[str] = KEY_METRICS) -> FluctuationInfo:
    """The key fluctuation metrics present in the runs."""
    present = [m for m in metrics if m in data.run_metrics and data.run_metrics[m].notna().any()]
    values = data.run_metrics.melt(id_vars=["variant", "seed"], value_vars=present, var_name="metric")
    ratios = data.comparisons[data.comparisons["metric"].isin(present)]
    cols = ["metric", "variant", "statistic", "estimate", "ci_low", "ci_high", "q_value"]
    variants = list(data.runs.variants)
    return FluctuationInfo(present, values, ratios[cols], data.baseline,
                           {v: variant_color(v, variants) for v in variants})


def get_fluctuation_plot(info: FluctuationInfo):
    """Per key metric: each run's value by variant, and the estimate against the baseline with its 95% CI."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n = len(info.metrics)
    baseline = info.baseline
    fig = make_subplots(rows=2, cols=max(n, 1), subplot_titles=[*info.metrics, *[f"{m} / {baseline}" for m in info.metrics]],
                        vertical_spacing=0.18)
    for i, metric in enumerate(info.metrics):
        vals = info.values[info.values["metric"] == metric]
        for variant, group in vals.groupby("variant", sort=False):
            fig.add_trace(go.Box(x=group["variant"], y=group["value"], boxpoints="all", name=variant, showlegend=False,
                                 marker_color=info.colors.get(variant), hovertext=[f"seed {s}" for s in group["seed"]]),
                          1, i + 1)
        rat = info.ratios[info.ratios["metric"] == metric]
        err_hi = (rat["ci_high"] - rat["estimate"]).tolist()
        err_lo = (rat["estimate"] - rat["ci_low"]).tolist()
        fig.add_trace(go.Scatter(x=rat["variant"], y=rat["estimate"], mode="markers", showlegend=False,
                                 marker_color=[info.colors.get(v) for v in rat["variant"]],
                                 error_y={"type": "data", "array": err_hi, "arrayminus": err_lo},
                                 hovertext=[f"{st}, q = {q:.2g}" if np.isfinite(q) else f"{st}, no test"
                                            for st, q in zip(rat["statistic"], rat["q_value"])]), 2, i + 1)
        no_change = 1.0 if (rat["statistic"] == "ratio of geometric means").all() else 0.0
        fig.add_hline(y=no_change, line_dash="dot", row=2, col=i + 1)
    fig.update_layout(title=f"Fluctuation metrics per run (top) and each variant against {baseline} (bottom): ratio of "
                            "geometric means (difference of means for metrics with zeros) with its 95% CI from the "
                            "inverted permutation test; no bar: too few runs", height=700)
    return fig
