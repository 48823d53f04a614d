"""Figure: the key fluctuation metrics per run, and each variant's ratio of medians to the baseline with its CI."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd

from analysis.report.data import KEY_METRICS, ReportData


class FluctuationInfo(NamedTuple):
    """Per-run values of the key metrics, and their ratios to the baseline (``baseline``) with CIs."""

    metrics: list[str]
    values: pd.DataFrame  # variant, seed, metric, value
    ratios: pd.DataFrame  # metric, variant, ratio, ci_low, ci_high, p_value
    baseline: str


def get_fluctuation_info(data: ReportData, metrics: Sequence[str] = KEY_METRICS) -> FluctuationInfo:
    """The key fluctuation metrics present in the runs."""
    present = [m for m in metrics if m in data.run_metrics and data.run_metrics[m].notna().any()]
    values = data.run_metrics.melt(id_vars=["variant", "seed"], value_vars=present, var_name="metric")
    ratios = data.comparisons[data.comparisons["metric"].isin(present)]
    return FluctuationInfo(present, values, ratios[["metric", "variant", "ratio", "ci_low", "ci_high", "p_value"]],
                           data.baseline)


def get_fluctuation_plot(info: FluctuationInfo):
    """Per key metric: each run's value by variant, and the median ratio to the baseline with its 95% CI."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n = len(info.metrics)
    baseline = info.baseline
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
