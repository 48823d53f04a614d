"""Figure: change of each SRU layer's flip share against the change of val loss, epoch by epoch."""

from __future__ import annotations

from typing import NamedTuple

import pandas as pd

from analysis.report.data import ReportData


class FlipScatterInfo(NamedTuple):
    """One point per run, SRU layer and epoch pair: ``variant, run_id, layer, epoch, d_flip, abs_d_val_loss``."""

    points: pd.DataFrame


def get_flip_scatter_info(data: ReportData) -> FlipScatterInfo:
    """Points of first difference of flip share vs |delta val loss| (one per run, SRU layer and epoch)."""
    return FlipScatterInfo(data.flip_points)


def get_flip_scatter_plot(info: FlipScatterInfo):
    """First difference of flip share vs |delta val loss|, one colour per variant."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for variant, grp in info.points.groupby("variant", sort=False):
        fig.add_trace(go.Scatter(x=grp["d_flip"], y=grp["abs_d_val_loss"], mode="markers", name=variant,
                                 hovertext=[f"{l} epoch {e}" for l, e in zip(grp["layer"], grp["epoch"])],
                                 marker={"size": 6, "opacity": 0.6}))
    fig.update_layout(title="Flip share change vs |change of val loss| (per run, SRU layer and epoch)", height=450,
                      xaxis_title="flip_share[e] - flip_share[e-1]", yaxis_title="|val_loss[e] - val_loss[e-1]|")
    return fig
