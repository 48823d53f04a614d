"""Figure: one gate statistic as a layer x epoch heatmap per variant."""

from __future__ import annotations

from typing import NamedTuple

from analysis import gates
from analysis.report.data import ReportData


#: What each heatmap's statistic is, in a few words (docs/scconv.md, "Gate statistics").
STAT_NOTES = {
    "informative_share": "share of positions with R > t",
    "margin_share": "share of gate logits within 0.1 SD of the threshold (scale-free)",
    "perturb_flip_share": "share of mask bits flipped by a fixed 1e-3 RMS input perturbation (scale-free)",
    "flip_share": "share of mask bits changed since the previous probe (epoch 0: since the probe before training)",
    "gamma_drift": "mean |gamma - gamma at init| (0 under the binary gate, which passes gamma no gradient)",
    "beta_entropy": "entropy of the CRU's attention weights, nats",
}


class HeatmapInfo(NamedTuple):
    """One gate statistic as a layer x epoch matrix per variant (mean over seeds; NaN where not logged)."""

    kind: str
    stat: str
    variants: list[str]
    layers: list[str]
    epochs: list[int]
    z: dict[str, list[list[float]]]
    note: str = ""  #: what the statistic is (:data:`STAT_NOTES`)


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
    return HeatmapInfo(kind, stat, variants, layers, epochs, z, STAT_NOTES.get(stat, ""))


def get_gate_heatmap_plot(info: HeatmapInfo):
    """One layer x epoch heatmap per variant, one shared colour scale."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(info.variants), subplot_titles=info.variants, shared_yaxes=True)
    for i, variant in enumerate(info.variants):
        fig.add_trace(go.Heatmap(z=info.z[variant], x=info.epochs, y=info.layers, coloraxis="coloraxis"), 1, i + 1)
    note = f"<br><sup>{info.note}</sup>" if info.note else ""
    fig.update_layout(title=f"{info.kind} {info.stat} per layer and epoch (mean over seeds){note}",
                      coloraxis={"colorscale": "Viridis"}, height=max(300, 40 * len(info.layers) + 150))
    fig.update_xaxes(title_text="epoch")
    return fig
