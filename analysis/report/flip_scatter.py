"""Figure: each SRU layer's detrended flip share against the detrended |change of val loss|, epoch by epoch."""

from __future__ import annotations

from typing import NamedTuple

import pandas as pd

from ablate.ui.palette import variant_colors
from analysis.report.data import ReportData


class FlipScatterInfo(NamedTuple):
    """One point per run, SRU layer and epoch (``analysis.gates.POINT_COLUMNS``), and each variant's colour."""

    points: pd.DataFrame
    colors: dict[str, str]


def get_flip_scatter_info(data: ReportData) -> FlipScatterInfo:
    """Points of detrended flip share vs detrended |delta val loss| (rows without residuals left out)."""
    points = data.flip_points.dropna(subset=["flip_resid", "dval_resid"])
    return FlipScatterInfo(points.reset_index(drop=True), variant_colors(data.runs.variants))


def get_flip_scatter_plot(info: FlipScatterInfo):
    """Detrended flip share vs detrended |delta val loss|, one colour per variant."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for variant, grp in info.points.groupby("variant", sort=False):
        fig.add_trace(go.Scatter(x=grp["flip_resid"], y=grp["dval_resid"], mode="markers", name=variant,
                                 hovertext=[f"{r} {l} epoch {e}" for r, l, e in zip(grp["run_id"].str[:8],
                                                                                      grp["layer"], grp["epoch"])],
                                 marker={"size": 6, "opacity": 0.6, "color": info.colors.get(variant)}))
    fig.update_layout(title="Flip share vs |change of val loss|, both minus their trend (per run, SRU layer, epoch)",
                      height=450, xaxis_title="flip_share[e] - trend",
                      yaxis_title="|val_loss[e] - val_loss[e-1]| - trend")
    return fig
