"""Gate behaviour over epochs (from the ``sru/<layer>/<stat>`` and ``cru/<layer>/<stat>`` gate statistics of
docs/tracking.md, read from ``RunSet.history`` with ``ablate.names.GateKey``) and live gate probes on a model.

- :func:`gate_frame`: tidy ``run_id, variant, seed, epoch, kind, layer, stat, value``.
- :func:`layer_epoch_stats`: per variant, layer and epoch (mean over seeds) the informative share, the two
  scale-free statistics ``margin_share`` and ``perturb_flip_share``, the flip share, gamma drift and the CRU
  attention entropy. ``near_threshold_share`` is left out: under ``gamma_norm = sum`` it is about 1 by
  construction (w = gamma / sum(gamma) is about 1/C, so R stays near 0.5) and carries no information.
- :func:`flip_points` and :func:`flip_coupling`: does a layer's mask churn go with the jumps of val loss?
  Per epoch e >= 1, the flip share (the share of mask bits changed since the probe of epoch e-1; at epoch 0
  since the probe before training, a valid value) is paired with ``|val_loss[e] - val_loss[e-1]|``. Epoch 0
  has no pair only because the val loss before training is not logged. Both series decay as training
  settles, which alone correlates them, so each is detrended with ``analysis.trend.residual`` (the trend the
  fluctuation metrics use: exponential, power-law and S-shaped decays leave no residual, and its robust
  LOWESS keeps an isolated jump in the residual, which is the signal here). Rank-based detrending
  (partial Spearman on the epoch) was measured and not used: ranks of a decaying curve with noise are
  not linear in the epoch, both series keep the same misfit, and on uncoupled synthetic runs (5 runs,
  15 epochs, 400 draws) it gave a mean rho of +0.11 and 9 % false positives at the 5 % level, against
  +0.002 and 5.7 % (300 draws; 25 epochs: +0.007, 5.3 %) with the trend residuals (docs/report.md).
  A run needs :data:`MIN_COUPLING_EPOCHS` epoch pairs. Per run, Spearman rho of the two residual series;
  across runs (the run is the unit), a t-test of the per-run Fisher-z rhos (:func:`run_level_pvalue`);
  BH (``scipy.stats.false_discovery_control``) over every variant and layer of the table.
- :func:`gate_association`: within one variant, across its runs, Spearman rho of a run's mean gate
  statistic with one of its fluctuation metrics, with the permutation p, BH q and the run count.

No result ranks layers: with about 5 runs and 10-20 epochs the rhos of unrelated layers spread widely,
so the order of non-significant rhos is noise.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from ablate.names import GateKey
from analysis import trend

if TYPE_CHECKING:
    import torch

#: Per layer and epoch statistics shown as heatmaps (kind, stat).
LAYER_STATS = (
    ("sru", "informative_share"), ("sru", "margin_share"), ("sru", "perturb_flip_share"), ("sru", "flip_share"),
    ("sru", "gamma_drift"), ("cru", "beta_entropy"),
)
#: Scale-free gate statistics the report summarises per variant (docs/scconv.md, "Gate statistics").
SCALE_FREE_STATS = ("margin_share", "perturb_flip_share")
MIN_PAIRS = 3
#: Fewest epoch pairs a run needs for its coupling rho. Shorter series leave trend misfit shared by both
#: residuals: on uncoupled synthetic runs the mean rho was +0.24 with 7 pairs, +0.055 with 9, +0.003 with 10.
MIN_COUPLING_EPOCHS = 10
#: Fewest runs for a coupling p-value: a t-test on 2 values (1 degree of freedom) rests wholly on their normality.
MIN_COUPLING_RUNS = 3
N_PERM = 9999
RHO_CLIP = 0.999  # |rho| = 1 has an infinite Fisher z
GATE_COLUMNS = ["run_id", "variant", "seed", "epoch", "kind", "layer", "stat", "value"]
POINT_COLUMNS = ["variant", "run_id", "layer", "epoch", "flip_share", "abs_d_val_loss", "flip_resid", "dval_resid"]
COUPLING_COLUMNS = ["variant", "layer", "rho", "p_value", "q_value", "n_runs"]
ASSOCIATION_COLUMNS = ["variant", "gate_stat", "target", "rho", "p_value", "q_value", "n_runs"]


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
    """One row per run, SRU layer and epoch e >= max(from_epoch, 1): :data:`POINT_COLUMNS`.

    ``flip_share`` at e is paired with ``abs_d_val_loss = |val_loss[e] - val_loss[e-1]|`` (``history``: long
    ``run_id, epoch, metric, value`` holding ``val_loss``); ``flip_resid`` and ``dval_resid`` are both series
    minus their ``analysis.trend`` trend within the run (and layer), NaN for a series shorter than
    :data:`MIN_COUPLING_EPOCHS`.
    """
    flips = gates[(gates["kind"] == "sru") & (gates["stat"] == "flip_share")]
    if flips.empty:
        return pd.DataFrame(columns=POINT_COLUMNS)
    val = history[history["metric"] == "val_loss"].sort_values(["run_id", "epoch"])
    val = val.assign(abs_d_val_loss=_step_diff(val, "value").abs())[["run_id", "epoch", "abs_d_val_loss"]]
    val = val[(val["epoch"] >= max(from_epoch, 1)) & val["abs_d_val_loss"].notna()]
    val = val.assign(dval_resid=val.groupby("run_id")["abs_d_val_loss"].transform(_detrend))
    points = flips.rename(columns={"value": "flip_share"}).merge(val, on=["run_id", "epoch"])
    points = points.sort_values(["run_id", "layer", "epoch"])
    points["flip_resid"] = points.groupby(["run_id", "layer"])["flip_share"].transform(_detrend)
    return points[POINT_COLUMNS].reset_index(drop=True)


def _detrend(series: pd.Series) -> pd.Series:
    """Series minus its ``analysis.trend`` trend (points in epoch order); NaN when too short to fit one."""
    values = series.to_numpy(dtype=float)
    if values.size < MIN_COUPLING_EPOCHS or not np.isfinite(values).all():
        return pd.Series(np.nan, index=series.index)
    return pd.Series(trend.residual(values), index=series.index)


def _step_diff(frame: pd.DataFrame, col: str, by: Sequence[str] = ("run_id",)) -> pd.Series:
    """col[e] - col[e-1] within each group, NaN where the previous epoch is missing."""
    grouped = frame.groupby(list(by))
    diff = grouped[col].diff()
    consecutive = grouped["epoch"].diff() == 1
    return diff.where(consecutive)


def flip_coupling(points: pd.DataFrame) -> pd.DataFrame:
    """Per variant and layer: :data:`COUPLING_COLUMNS`, in variant and natural layer order (no ranking).

    ``rho``: mean over runs of the per-run Spearman rho of ``flip_resid`` vs ``dval_resid`` (the statistic the
    test is about). ``p_value``: :func:`run_level_pvalue` of the per-run rhos (NaN with fewer than
    :data:`MIN_COUPLING_RUNS` runs);
    ``q_value``: BH over every row with a p-value; ``n_runs``: runs with a finite rho.
    """
    rows = []
    for (variant, layer), grp in points.groupby(["variant", "layer"], sort=False):
        per_run = np.array([spearman(r["flip_resid"], r["dval_resid"], with_p=False)[0]
                            for _, r in grp.groupby("run_id")], dtype=float)
        per_run = per_run[np.isfinite(per_run)]
        rows.append({"variant": variant, "layer": layer,
                     "rho": float(per_run.mean()) if per_run.size else float("nan"),
                     "p_value": run_level_pvalue(per_run), "n_runs": int(per_run.size)})
    table = pd.DataFrame(rows, columns=[c for c in COUPLING_COLUMNS if c != "q_value"])
    table.insert(4, "q_value", bh_qvalues(table["p_value"]))
    order = table.assign(_key=table["layer"].map(layer_sort_key)).sort_values(["variant", "_key"]).index
    return table.loc[order, COUPLING_COLUMNS].reset_index(drop=True)


def run_level_pvalue(rhos) -> float:
    """Two-sided one-sample t-test that the runs' Fisher-z rhos are centred on 0; NaN for fewer than
    :data:`MIN_COUPLING_RUNS` runs.

    Not the exact sign-flip test (:func:`sign_flip_pvalue`): with 5 runs, the seeds a study has, its smallest
    two-sided p is 2/32 = 0.0625 (Wilcoxon's too), so no coupling could ever be found. The runs are
    independent and z = artanh(rho) is near normal, which is all the t-test needs; its false-positive rate on
    decaying, uncoupled synthetic runs is pinned by tests/test_gates.py.
    """
    r = np.asarray(rhos, dtype=float)
    r = r[np.isfinite(r)]
    if r.size < MIN_COUPLING_RUNS:
        return float("nan")
    z = np.arctanh(np.clip(r, -RHO_CLIP, RHO_CLIP))
    if np.ptp(z) == 0:  # no spread: the t statistic is undefined
        return float("nan")
    return float(sps.ttest_1samp(z, 0.0).pvalue)


def bh_qvalues(p) -> np.ndarray:
    """Benjamini-Hochberg q-values (``scipy.stats.false_discovery_control``) of the finite p-values; NaN stays NaN."""
    p = np.asarray(p, dtype=float)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = sps.false_discovery_control(p[ok], method="bh")
    return q


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

    Every epoch counts, the flip share of epoch 0 too (it is measured against the probe before training);
    gamma drift is taken at the last epoch (how far gamma moved in the whole run).
    """
    kept = gates[gates["epoch"] >= from_epoch]
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


def gate_association(run_table: pd.DataFrame, target: str, gate_cols: Sequence[str] | None = None,
                     by: str = "variant") -> pd.DataFrame:
    """Within each ``by`` group (never pooled across variants): :data:`ASSOCIATION_COLUMNS`.

    Spearman rho of each ``gate.*`` column with ``target`` across the group's runs, its permutation p, BH q over
    every row with a p-value, and the run count; rows in group and column order.
    """
    cols = list(gate_cols) if gate_cols is not None else [c for c in run_table.columns if c.startswith("gate.")]
    rows = []
    for group, runs in run_table.groupby(by, sort=False):
        for col in cols:
            sub = runs[[col, target]].dropna()
            if sub.empty:  # a variant without this gate (the baseline has no SRU)
                continue
            rho, p = spearman(sub[col], sub[target])
            rows.append({"variant": group, "gate_stat": col, "target": target, "rho": rho, "p_value": p,
                         "n_runs": len(sub)})
    table = pd.DataFrame(rows, columns=[c for c in ASSOCIATION_COLUMNS if c != "q_value"])
    table.insert(5, "q_value", bh_qvalues(table["p_value"]))
    return table[ASSOCIATION_COLUMNS]


# -- live probes -------------------------------------------------------------------------------


def probe_masks(model, x) -> dict[str, torch.Tensor]:
    """One eval forward pass of ``x``; returns layer -> bool mask ``R > t`` of every SRU (on CPU)."""
    from ablate.train.probes import capture_gates

    return {cap.layer: cap.mask.cpu() for cap in capture_gates(model, x) if cap.kind == "sru"}
