"""Network-level gate metrics: per epoch, the mean over layers of each gate statistic, ``gate.<kind>.<stat>``.

Per-layer statistics stay in the ``gate_stats.csv`` artifact; these few series are what a comparison of
variants needs. Statistics that cannot change under the active gate mode are left out: the binary gate
passes no gradient to the SRU's GroupNorm (``ablate.nn.sru.SRU.gate`` builds its 0/1 maps from a comparison;
the efficient SRU's backward returns none for gamma and beta), so gamma and its summaries stay at their
initial values.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

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
