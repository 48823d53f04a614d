"""One fixed colour per variant, the same in MLflow's UI (the ``mlflow.runColor`` tag) and in the report.

The SCConv orders have fixed colours (the baseline ``none`` grey); any other set of variant labels takes
the palette in its natural order (``0.25`` before ``0.5`` before ``1``), so a study's variants keep their
colours from run to run and from the runs page to the report.
"""

from __future__ import annotations

import re
from typing import Iterable

from ablate.config import ORDERS

#: Run tag MLflow's UI reads as a run's colour (a CSS colour; the UI's own picker writes ``#rrggbb``).
RUN_COLOR_TAG = "mlflow.runColor"

#: Plotly's ``qualitative.D3`` without its grey, then d3's category20 light shades: 19 distinct colours.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#c7c7c7",
)
#: The baseline's colour: neutral, so the variants stand out against it.
BASELINE_COLOR = "#7f7f7f"
ORDER_COLORS = {"none": BASELINE_COLOR, **{order: PALETTE[i] for i, order in enumerate(o for o in ORDERS if o != "none")}}


def _order(label: str) -> str | None:
    """The SCConv order a label names (``sru_cru``, or ``resnet20/sru_cru`` from ``RunConfig.label()``)."""
    base = label.rsplit("/", 1)[-1]
    return base if base in ORDER_COLORS else None


def _natural_key(label: str) -> tuple:
    parts = re.split(r"(-?\d+(?:\.\d+)?(?:e-?\d+)?)", label)
    return tuple((0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(parts) if p)


def canonical_order(labels: Iterable[str]) -> list[str]:
    """The labels in colour order: SCConv orders first in ``ablate.config.ORDERS`` order, then the rest naturally
    sorted (numbers by value)."""
    unique = list(dict.fromkeys(labels))
    orders = sorted((lb for lb in unique if _order(lb)), key=lambda lb: ORDERS.index(_order(lb)))
    rest = sorted((lb for lb in unique if not _order(lb)), key=_natural_key)
    return orders + rest


def variant_colors(labels: Iterable[str]) -> dict[str, str]:
    """``label -> #rrggbb`` for a study's variants; colours repeat only beyond len(PALETTE) other labels."""
    ordered = canonical_order(labels)
    others = [lb for lb in ordered if not _order(lb)]
    colors = {lb: PALETTE[i % len(PALETTE)] for i, lb in enumerate(others)}
    return {lb: ORDER_COLORS[_order(lb)] if _order(lb) else colors[lb] for lb in ordered}


def variant_color(label: str, labels: Iterable[str] = ()) -> str:
    """The colour of ``label`` among the study's ``labels`` (an SCConv order needs none), as ``#rrggbb``."""
    return variant_colors([*labels, label])[label]
