"""Network-level gate metrics: per epoch, the mean over layers of each gate statistic, ``gate.<kind>.<stat>``.

Per-layer statistics stay in the ``gate_stats.csv`` artifact; these few series are what a comparison of
variants needs. Statistics that cannot change under the active gate mode are left out: the binary gate
passes no gradient to the SRU's GroupNorm (``ablate.nn.sru.SRU.gate`` builds its 0/1 maps from a comparison;
the efficient SRU's backward returns none for gamma and beta), so gamma and its summaries stay at their
initial values.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, NamedTuple

from ablate.names import GateKey

GATE_METRIC_PREFIX = "gate."
#: The statistics aggregated by default, per gate kind: one series each for how much of the map is
#: informative, how close it is to flipping, how much it flips, how far gamma moved and the CRU's mixing.
AGGREGATE_STATS: dict[str, tuple[str, ...]] = {
    "sru": ("informative_share", "margin_share", "flip_share", "perturb_flip_share", "gamma_drift"),
    "cru": ("beta_entropy",),
}
_GAMMA_STATS = ("gamma_min", "gamma_max", "gamma_sum", "gamma_negative", "gamma_drift")
#: (kind, stat) pairs constant by construction under a gate mode.
CONSTANT_STATS: dict[str, frozenset[tuple[str, str]]] = {
    "binary": frozenset(("sru", stat) for stat in _GAMMA_STATS),
}


def gate_metric(kind: str, stat: str) -> str:
    """The metric name of a network-level gate statistic, e.g. ``gate.sru.flip_share``."""
    return f"{GATE_METRIC_PREFIX}{kind}.{stat}"


def gate_aggregates(gate_stats: Mapping[GateKey, float], gate_mode: str,
                    stats: Mapping[str, Iterable[str]] | None = AGGREGATE_STATS) -> dict[str, float]:
    """One epoch's per-layer statistics -> ``gate.<kind>.<stat>``: the mean over layers of the finite values
    (NaN when none is), for the ``stats`` chosen per kind (None: all), less those constant under ``gate_mode``."""
    constant = CONSTANT_STATS.get(gate_mode, frozenset())
    wanted = None if stats is None else {(kind, s) for kind, names in stats.items() for s in names}
    values: dict[tuple[str, str], list[float]] = {}
    for key, value in gate_stats.items():
        pair = (key.kind, key.stat)
        if pair in constant or (wanted is not None and pair not in wanted):
            continue
        values.setdefault(pair, []).append(float(value))
    out = {}
    for (kind, stat), vals in sorted(values.items()):
        finite = [v for v in vals if math.isfinite(v)]
        out[gate_metric(kind, stat)] = math.fsum(finite) / len(finite) if finite else math.nan
    return out


class GateHeatmapInfo(NamedTuple):
    """One panel per aggregated statistic: its metric name, the layers (rows), the epochs (columns) and the
    values (NaN where a layer has no value at an epoch)."""

    panels: tuple[tuple[str, tuple[str, ...], tuple[int, ...], tuple[tuple[float, ...], ...]], ...]


def gate_heatmap_info(gate_rows: Iterable[tuple[int, str, str, str, float]], gate_mode: str,
                      stats: Mapping[str, Iterable[str]] = AGGREGATE_STATS) -> GateHeatmapInfo:
    """Per-layer values over epochs of each aggregated statistic, from ``(epoch, layer, kind, stat, value)`` rows,
    less the statistics constant under ``gate_mode``."""
    constant = CONSTANT_STATS.get(gate_mode, frozenset())
    cells: dict[tuple[str, str], dict[tuple[str, int], float]] = {}
    for epoch, layer, kind, stat, value in gate_rows:
        if stat in tuple(stats.get(kind, ())) and (kind, stat) not in constant:
            cells.setdefault((kind, stat), {})[(layer, int(epoch))] = float(value)
    panels = []
    for kind in stats:
        for stat in stats[kind]:
            values = cells.get((kind, stat))
            if not values:
                continue
            layers = tuple(dict.fromkeys(layer for layer, _ in values))  # model order, as probed
            epochs = tuple(sorted({e for _, e in values}))
            z = tuple(tuple(values.get((layer, e), math.nan) for e in epochs) for layer in layers)
            panels.append((gate_metric(kind, stat), layers, epochs, z))
    return GateHeatmapInfo(tuple(panels))


def gate_heatmap_plot(info: GateHeatmapInfo):
    """A plotly figure: one heatmap (layers x epochs) per panel, stacked, each with its own colour scale."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    n = max(len(info.panels), 1)
    fig = make_subplots(rows=n, cols=1, subplot_titles=[p[0] for p in info.panels] or ["no gate statistics"],
                        vertical_spacing=min(0.08, 0.3 / n))
    for i, (name, layers, epochs, z) in enumerate(info.panels, start=1):
        fig.add_trace(go.Heatmap(z=[list(row) for row in z], x=list(epochs), y=list(layers), name=name,
                                 colorscale="Viridis", colorbar={"len": 1 / n, "y": 1 - (i - 0.5) / n}),
                      row=i, col=1)
        fig.update_xaxes(title_text="epoch", row=i, col=1)
    fig.update_layout(height=max(300, 60 + n * (40 + 14 * max((len(p[1]) for p in info.panels), default=1))),
                      title="Gate statistics per layer and epoch", showlegend=False)
    return fig
