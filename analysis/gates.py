"""Gate behaviour over epochs (from the ``sru/<layer>/<stat>`` and ``cru/<layer>/<stat>`` metrics of
docs/tracking.md, read with ``ablate.names.GateKey``) and live gate probes on a model.

- :func:`gate_frame`: tidy ``run_id, variant, seed, epoch, kind, layer, stat, value``.
- :func:`layer_epoch_stats`: per variant, layer and epoch (mean over seeds) the informative share,
  near-threshold share, flip share, gamma drift from its initial value and the CRU attention entropy.
- :func:`flip_coupling`: per variant and layer, Spearman correlation of the first difference of the
  flip share, ``flip[e] - flip[e-1]``, with ``|val_loss[e] - val_loss[e-1]|``, pooling the epoch
  pairs of every seed; layers ranked by it, highest first. First differences remove the shared
  downward trend of both series, which would otherwise correlate them for no reason. The flip
  share of epoch 0 has no previous probe mask (docs/tracking.md: it is logged as 0), so differences start at epoch 2.
- :func:`gate_association`: across runs, Spearman correlation of each run's mean gate statistic with
  one of its fluctuation metrics (which gate statistics move with the fluctuation).

p-values are exact or Monte Carlo permutation p-values with the run as the unit: across runs for
``gate_association``, a sign-flip test of the per-run rhos for ``flip_coupling``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from ablate.names import GateKey

if TYPE_CHECKING:
    import torch

#: Per layer and epoch statistics shown as heatmaps (kind, stat).
LAYER_STATS = (
    ("sru", "informative_share"), ("sru", "near_threshold_share"), ("sru", "flip_share"),
    ("sru", "gamma_drift"), ("cru", "beta_entropy"),
)
FIRST_FLIP_EPOCH = 1  # epoch 0's flip share has no previous mask
MIN_PAIRS = 3
N_PERM = 9999
GATE_COLUMNS = ["run_id", "variant", "seed", "epoch", "kind", "layer", "stat", "value"]


def is_gate_metric(name: str) -> bool:
    """True for ``sru/<layer>/<stat>`` and ``cru/<layer>/<stat>`` metric names."""
    return GateKey.parse(name) is not None


def layer_sort_key(layer: str) -> tuple:
    """Natural order of module paths: layer1.2.conv2 before layer1.10.conv2."""
    return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", layer)))


def gate_frame(history: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Gate metrics of a long ``run_id, epoch, metric, value`` history, split into kind/layer/stat."""
    keys = {name: GateKey.parse(name) for name in history["metric"].unique()}
    parts = pd.DataFrame([(name, *key) for name, key in keys.items() if key is not None],
                         columns=["metric", *GateKey._fields])
    if parts.empty:
        return pd.DataFrame(columns=GATE_COLUMNS)
    frame = history.merge(parts, on="metric").drop(columns="metric")
    frame = frame.join(runs[["variant", "seed"]], on="run_id")
    return frame[GATE_COLUMNS].reset_index(drop=True)


def layer_epoch_stats(gates: pd.DataFrame) -> pd.DataFrame:
    """``variant, kind, layer, epoch`` + one column per :data:`LAYER_STATS` stat (mean over seeds)."""
    wanted = gates[[(k, s) in LAYER_STATS for k, s in zip(gates["kind"], gates["stat"])]]
    table = wanted.pivot_table(index=["variant", "kind", "layer", "epoch"], columns="stat", values="value",
                               aggfunc="mean")
    table.columns.name = None
    return table.reset_index()


def final_stat(gates: pd.DataFrame, kind: str, stat: str) -> pd.DataFrame:
    """``variant, layer, value``: the stat at each run's last epoch, median over the variant's runs."""
    sel = gates[(gates["kind"] == kind) & (gates["stat"] == stat)]
    last = sel.sort_values("epoch").groupby(["run_id", "layer"]).tail(1)
    out = last.groupby(["variant", "layer"])["value"].median().reset_index()
    order = out.assign(_key=out["layer"].map(layer_sort_key)).sort_values(["variant", "_key"]).index
    return out.loc[order].reset_index(drop=True)


# -- flip share vs val loss --------------------------------------------------------------------


def flip_points(gates: pd.DataFrame, history: pd.DataFrame, from_epoch: int = 0) -> pd.DataFrame:
    """``variant, run_id, layer, epoch, d_flip, abs_d_val_loss``: one row per SRU layer and epoch pair.

    ``history``: long ``run_id, epoch, metric, value`` holding ``val_loss``. Both differences use
    epochs e-1 and e with e-1 >= max(from_epoch, 1).
    """
    cols = ["variant", "run_id", "layer", "epoch", "d_flip", "abs_d_val_loss"]
    start = max(from_epoch, FIRST_FLIP_EPOCH)
    flips = gates[(gates["kind"] == "sru") & (gates["stat"] == "flip_share") & (gates["epoch"] >= start)]
    if flips.empty:
        return pd.DataFrame(columns=cols)
    val = history[(history["metric"] == "val_loss") & (history["epoch"] >= start)]
    val = val.sort_values(["run_id", "epoch"])
    val = val.assign(abs_d_val_loss=_step_diff(val, "value").abs())[["run_id", "epoch", "abs_d_val_loss"]]
    flips = flips.sort_values(["run_id", "layer", "epoch"])
    flips = flips.assign(d_flip=_step_diff(flips, "value", by=["run_id", "layer"]))
    points = flips.merge(val, on=["run_id", "epoch"]).dropna(subset=["d_flip", "abs_d_val_loss"])
    return points[cols].reset_index(drop=True)


def _step_diff(frame: pd.DataFrame, col: str, by: Sequence[str] = ("run_id",)) -> pd.Series:
    """col[e] - col[e-1] within each group, NaN where the previous epoch is missing."""
    grouped = frame.groupby(list(by))
    diff = grouped[col].diff()
    consecutive = grouped["epoch"].diff() == 1
    return diff.where(consecutive)


def flip_coupling(points: pd.DataFrame) -> pd.DataFrame:
    """Per variant and layer: Spearman rho of d_flip vs |d val loss| and a run-level test, layers ranked.

    ``rho``: pooled over the epoch pairs of every run (ranks the layers; descriptive). ``rho_run_median``:
    median of the per-run rhos. ``p_value``: exact sign-flip test that the per-run rhos are centred on 0
    (the run is the unit, as in ``analysis.stats``); NaN with fewer than 2 runs.
    """
    rows = []
    for (variant, layer), grp in points.groupby(["variant", "layer"]):
        rho = spearman(grp["d_flip"], grp["abs_d_val_loss"], with_p=False)[0]
        per_run = [spearman(r["d_flip"], r["abs_d_val_loss"], with_p=False)[0] for _, r in grp.groupby("run_id")]
        rows.append({"variant": variant, "layer": layer, "rho": rho, "rho_run_median": _nanmedian(per_run),
                     "p_value": sign_flip_pvalue(per_run), "n_pairs": len(grp), "n_runs": grp["run_id"].nunique()})
    table = pd.DataFrame(rows, columns=["variant", "layer", "rho", "rho_run_median", "p_value", "n_pairs", "n_runs"])
    if table.empty:
        return table.assign(rank=pd.Series(dtype=float))
    table["rank"] = table.groupby("variant")["rho"].rank(ascending=False, method="min", na_option="bottom")
    return table.sort_values(["variant", "rank"]).reset_index(drop=True)


def sign_flip_pvalue(values, max_exact: int = 16, n_perm: int = N_PERM, seed: int = 0) -> float:
    """Two-sided sign-flip permutation p that values are symmetric around 0 (statistic: |mean|).

    Exact over all 2^n sign patterns for n <= max_exact, else Monte Carlo (never 0). NaN for n < 2.
    """
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return float("nan")
    if x.size <= max_exact:
        signs = 1 - 2 * ((np.arange(2**x.size)[:, None] >> np.arange(x.size)) & 1)
    else:
        signs = np.random.default_rng(seed).choice([-1, 1], size=(n_perm, x.size))
    stats_ = np.abs((signs * x).mean(axis=1))
    obs = abs(x.mean())
    hits = np.count_nonzero(stats_ >= obs - 1e-12 * max(np.abs(x).max(), 1e-300))
    return float(hits / len(signs)) if x.size <= max_exact else float((hits + 1) / (n_perm + 1))


def _nanmedian(values: list[float]) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.nanmedian(arr)) if np.isfinite(arr).any() else float("nan")


def spearman(x, y, with_p: bool = True, seed: int = 0) -> tuple[float, float]:
    """Spearman rho and its two-sided permutation p (exact for n <= 7, else 9999 resamples).

    NaN for fewer than :data:`MIN_PAIRS` finite pairs or a constant series (no ranking to compare).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < MIN_PAIRS or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    rx, ry = sps.rankdata(x), sps.rankdata(y)
    rho = float(np.corrcoef(rx, ry)[0, 1])
    if not with_p:
        return rho, float("nan")

    def stat(a, axis=-1):
        # Pearson correlation of ranks, vectorised over the permuted copies of the first sample.
        a = a - a.mean(axis=axis, keepdims=True)
        b = ry - ry.mean()
        return (a * b).sum(axis=axis) / np.sqrt((a * a).sum(axis=axis) * (b * b).sum())

    res = sps.permutation_test((rx,), stat, permutation_type="pairings", vectorized=True,
                               n_resamples=N_PERM, alternative="two-sided", rng=np.random.default_rng(seed))
    return rho, float(res.pvalue)


# -- across runs -------------------------------------------------------------------------------


def run_gate_summary(gates: pd.DataFrame, from_epoch: int = 0) -> pd.DataFrame:
    """One row per gated run: ``gate.<kind>.<stat>`` = mean over layers and epochs >= from_epoch.

    The flip share is averaged from epoch max(from_epoch, 1) (epoch 0 has no previous mask);
    gamma drift is taken at the last epoch (how far gamma moved in the whole run).
    """
    kept = gates[gates["epoch"] >= from_epoch]
    kept = kept[~((kept["stat"] == "flip_share") & (kept["epoch"] < FIRST_FLIP_EPOCH))]
    drift = kept["stat"] == "gamma_drift"
    last = kept[drift & (kept["epoch"] == kept.groupby("run_id")["epoch"].transform("max"))]
    use = pd.concat([kept[~drift], last])
    use = use[[(k, s) in LAYER_STATS for k, s in zip(use["kind"], use["stat"])]]
    if use.empty:
        return pd.DataFrame(columns=["run_id"]).set_index("run_id")
    table = use.assign(name="gate." + use["kind"] + "." + use["stat"]).pivot_table(
        index="run_id", columns="name", values="value", aggfunc="mean")
    table.columns.name = None
    return table


def gate_association(run_table: pd.DataFrame, target: str, gate_cols: Sequence[str] | None = None) -> pd.DataFrame:
    """Across runs: Spearman rho (and permutation p) of each ``gate.*`` column with ``target``, by |rho|."""
    cols = list(gate_cols) if gate_cols is not None else [c for c in run_table.columns if c.startswith("gate.")]
    rows = []
    for col in cols:
        sub = run_table[[col, target]].dropna()
        rho, p = spearman(sub[col], sub[target])
        rows.append({"gate_stat": col, "target": target, "rho": rho, "p_value": p, "n_runs": len(sub)})
    table = pd.DataFrame(rows, columns=["gate_stat", "target", "rho", "p_value", "n_runs"])
    return table.sort_values("rho", key=lambda r: -r.abs(), na_position="last").reset_index(drop=True)


# -- live probes -------------------------------------------------------------------------------


def probe_masks(model, x) -> dict[str, torch.Tensor]:
    """One eval forward pass of ``x``; returns layer -> bool mask ``R > t`` of every SRU (on CPU)."""
    from ablate.train.probes import capture_gates

    return {cap.layer: cap.mask.cpu() for cap in capture_gates(model, x) if cap.kind == "sru"}
