"""Figure: train and val loss of every run, one panel per variant, seeds overlaid."""

from __future__ import annotations

import math
from typing import NamedTuple

from analysis.report.data import ReportData


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
