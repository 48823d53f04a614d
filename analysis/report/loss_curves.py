"""Figure: validation and training loss per variant, aggregated over seeds (mean, 95% band, seeds faint)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy.stats import t as t_dist

from ablate.ui.palette import variant_color
from analysis.report.data import ReportData

CURVES = ("val_loss", "train_loss")


class CurveInfo(NamedTuple):
    """Per variant: its colour, each seed's curves (``runs``) and the seed aggregate per curve (``bands``)."""

    variants: list[str]
    colors: dict[str, str]
    runs: dict[str, list[dict]]  #: variant -> [{run_id, seed, epoch, val_loss, train_loss}]
    bands: dict[str, dict[str, pd.DataFrame]]  #: variant -> curve -> epoch, mean, low, high, n


def seed_band(values: pd.DataFrame) -> pd.DataFrame:
    """Per epoch over the seeds (columns): mean and its 95% t-interval (low = high = mean with one seed)."""
    n = values.notna().sum(axis=1)
    mean = values.mean(axis=1)
    sem = values.std(axis=1, ddof=1) / np.sqrt(n)
    half = (t_dist.ppf(0.975, np.maximum(n - 1, 1)) * sem).where(n > 1, 0.0)
    return pd.DataFrame({"epoch": values.index.to_numpy(), "mean": mean.to_numpy(), "low": (mean - half).to_numpy(),
                         "high": (mean + half).to_numpy(), "n": n.to_numpy()})


def get_loss_curves_info(data: ReportData) -> CurveInfo:
    """Each variant's seeds and their per-epoch mean with a 95% band, in the variant's MLflow colour."""
    wide = data.runs.wide_history(list(CURVES))
    variants = list(data.runs.variants)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for run_id, hist in wide.groupby("run_id", sort=False):
        hist = hist.sort_values("epoch")
        runs[hist["variant"].iloc[0]].append({
            "run_id": run_id, "seed": hist["seed"].iloc[0], "epoch": hist["epoch"].tolist(),
            **{c: hist[c].tolist() if c in hist else [] for c in CURVES}})
    bands: dict[str, dict[str, pd.DataFrame]] = {}
    for variant in variants:
        runs[variant].sort(key=lambda r: str(r["seed"]))
        rows = wide[wide["variant"] == variant]
        bands[variant] = {c: seed_band(rows.pivot_table(index="epoch", columns="run_id", values=c, aggfunc="last"))
                          for c in CURVES if c in rows}
    return CurveInfo(variants, {v: variant_color(v, variants) for v in variants}, runs, bands)


def _rgba(color: str, alpha: float) -> str:
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def get_loss_curves_plot(info: CurveInfo):
    """Two panels (val, train loss); per variant the seed mean, its 95% band, and each seed as a faint line."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(CURVES), subplot_titles=["validation loss", "training loss"])
    for col, curve in enumerate(CURVES, start=1):
        for variant in info.variants:
            color = info.colors[variant]
            for run in info.runs[variant]:
                fig.add_trace(go.Scatter(x=run["epoch"], y=run[curve], mode="lines", legendgroup=variant,
                                         showlegend=False, line={"width": 1, "color": _rgba(color, 0.25)},
                                         name=f"{variant} seed {run['seed']}", hoverinfo="name+y"), 1, col)
            band = info.bands[variant].get(curve)
            if band is None or band.empty:
                continue
            fig.add_trace(go.Scatter(x=[*band["epoch"], *band["epoch"][::-1]], y=[*band["high"], *band["low"][::-1]],
                                     fill="toself", fillcolor=_rgba(color, 0.2), line={"width": 0}, hoverinfo="skip",
                                     legendgroup=variant, showlegend=False, name=f"{variant} 95% band"), 1, col)
            fig.add_trace(go.Scatter(x=band["epoch"], y=band["mean"], mode="lines", legendgroup=variant,
                                     showlegend=col == 1, line={"width": 2.5, "color": color},
                                     name=f"{variant} (mean of {int(band['n'].max())})"), 1, col)
    fig.update_layout(title="Loss per variant: mean over seeds with its 95% band (t-interval), seeds faint",
                      height=420)
    fig.update_xaxes(title_text="epoch")
    return fig
