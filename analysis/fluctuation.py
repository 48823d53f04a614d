"""Curve-instability metrics: how much a training curve wanders around its own trend.

Every metric is computed per run on one curve (``val_loss``, ``val_acc`` or ``train_loss``) over
the epochs kept by ``run_metrics(from_epoch=K)``; points are treated as equally spaced.

Trend: robust LOWESS (Cleveland 1979), local-linear, over the ``TREND_SPAN`` = 9 nearest epochs
with tricube weights, refitted ``ROBUST_ITERS`` = 2 times with bisquare robustness weights
(cut-off 6 x median |residual|). The robustness step keeps an isolated spike out of the trend,
so the spike stays (nearly) whole in the residual and barely leaks into its neighbours; a spike
much smaller than the others is only partly down-weighted and is partly absorbed.
Residual ``r_t = y_t - trend_t``. Residuals below float32 resolution of the curve
(``|r| <= eps32 * max|y|``) are set to 0: metrics are logged as float32, so smaller
differences are rounding, not fluctuation.

Spikes are scored on the leave-one-out residual ``y_t - trend_{-t}(t)``: the same robust fit
(same robustness weights) with point t given no weight in its own local line. In-sample robust
residuals have tails far heavier than their MAD suggests (on white noise, 60 epochs, about 1 point
per curve passes |z| > 3 instead of the Gaussian 0.16); leaving the point out brings this to about
0.35 per curve, which the tests pin.

Metrics of a curve y_1..y_T (r = in-sample residual, l = leave-one-out residual):
- ``resid_sd`` = SD(r) with ddof=1.
- ``excess_tv`` = sum_t |y_t - y_{t-1}| - |y_T - y_1|: the path length beyond the net change;
  0 for any monotone curve.
- ``up_moves`` = sum_t max(y_t - y_{t-1}, 0): total rise (for val_acc the rises are improvements).
- ``spike_count`` = #{t : |l_t - median(l)| / (1.4826 MAD(l)) > 3}, both directions (val_acc
  dips and val_loss jumps both count).
- ``hf_share`` = sum_{f > 0.25} P(f) / sum_{f > 0} P(f), P = Welch PSD of r (Hann window,
  segments of min(16, T) epochs, half overlap, mean removed per segment); 0.25 cycles/epoch is a
  period of 4 epochs. White noise gives about 0.55.
- ``lag1_autocorr`` = sum_t (r_t - rbar)(r_{t+1} - rbar) / sum_t (r_t - rbar)^2.
- run level: ``val_train_resid_ratio`` = val_loss.resid_sd / train_loss.resid_sd (NaN when the
  denominator is 0 or either is NaN); ``gen_gap_final`` = val_loss - train_loss at the last epoch
  where both are logged.

Note on scale: a local-linear smoother absorbs part of white noise, so ``resid_sd`` reads about
0.9 x the noise SD for white noise (span 9); the factor is the same for every run, so ratios
between arms are unaffected.

Edge cases (the rules the report relies on):
- fewer than 2 points: every metric is NaN (no move to measure);
- fewer than ``MIN_TREND_POINTS`` = 5 points: the trend-based metrics (``resid_sd``,
  ``spike_count``, ``hf_share``, ``lag1_autocorr``) are NaN; ``excess_tv`` and ``up_moves``
  are still given. Between 5 and 9 points the span shrinks to the number of points;
- any non-finite value (a diverged curve): every metric is NaN;
- zero residual variance: ``lag1_autocorr`` and ``hf_share`` are 0 (no fluctuation, so none of
  it is correlated or high-frequency); ``spike_count`` is 0;
- MAD == 0 in ``spike_count``: the scale falls back to 1.2533 x mean absolute deviation from the
  median (Iglewicz & Hoaglin's modified z-score rule); if that is 0 too, there are no spikes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.signal import welch

CURVES = ("val_loss", "val_acc", "train_loss")
CURVE_METRICS = ("resid_sd", "excess_tv", "up_moves", "spike_count", "hf_share", "lag1_autocorr")

TREND_SPAN = 9
ROBUST_ITERS = 2
MIN_TREND_POINTS = 5
SPIKE_Z = 3.0
HF_CUTOFF = 0.25  # cycles/epoch: fluctuations with a period shorter than 4 epochs
WELCH_NPERSEG = 16
MAD_TO_SD = 1.4826  # MAD of a normal sample times this estimates its SD
MEANAD_TO_SD = 1.2533  # mean absolute deviation times this estimates the SD (sqrt(pi/2))

_BASE_DOCS = {
    "resid_sd": "SD (ddof=1) of r_t = y_t - trend_t, trend = robust local-linear LOWESS over 9 epochs",
    "excess_tv": "sum_t |y_t - y_{t-1}| - |y_T - y_1|: path length beyond the net change (0 if monotone)",
    "up_moves": "sum_t max(y_t - y_{t-1}, 0): total rise (for val_acc this counts improvements)",
    "spike_count": "count of |l_t - median l| / (1.4826 MAD(l)) > 3, l = leave-one-out residual (two-sided)",
    "hf_share": "Welch PSD of r: power above 0.25 cycles/epoch over power above 0 (0 if r == 0)",
    "lag1_autocorr": "sum (r_t - rbar)(r_{t+1} - rbar) / sum (r_t - rbar)^2 (0 if r is constant)",
}

#: One-line definition per metric, under the base name (``resid_sd``) and the full name
#: (``val_loss.resid_sd``), so the report can look up either.
METRIC_DOCS: dict[str, str] = {
    **_BASE_DOCS,
    **{f"{curve}.{name}": f"{curve}: {doc}" for curve in CURVES for name, doc in _BASE_DOCS.items()},
    "val_train_resid_ratio": "val_loss.resid_sd / train_loss.resid_sd (NaN if train_loss.resid_sd is 0)",
    "gen_gap_final": "val_loss - train_loss at the last epoch where both are logged",
}


def curve_metrics(values: np.ndarray) -> dict[str, float]:
    """Fluctuation metrics of one curve (see the module docstring for formulas and edge cases)."""
    y = np.asarray(values, dtype=np.float64).ravel()
    out = dict.fromkeys(CURVE_METRICS, float("nan"))
    if y.size < 2 or not np.all(np.isfinite(y)):
        return out
    steps = np.diff(y)
    tol = _rounding_tol(y)
    # Path lengths within float32 rounding of the curve are 0: a monotone curve must not leave 1e-16
    # (a ratio against a zero baseline would explode).
    excess = np.abs(steps).sum() - abs(y[-1] - y[0])
    out["excess_tv"] = float(excess) if excess > tol * y.size else 0.0
    up = np.clip(steps, 0.0, None).sum()
    out["up_moves"] = float(up) if up > tol * y.size else 0.0
    if y.size < MIN_TREND_POINTS:
        return out
    resid, loo_resid = _residuals(y, TREND_SPAN)
    out["resid_sd"] = float(np.std(resid, ddof=1))
    out["spike_count"] = float(spike_count(loo_resid))
    out["hf_share"] = hf_share(resid)
    out["lag1_autocorr"] = lag1_autocorr(resid)
    return out


def residual(values: np.ndarray, span: int = TREND_SPAN) -> np.ndarray:
    """Curve minus its robust LOWESS trend, with float32-rounding-level residuals set to 0."""
    return _residuals(np.asarray(values, dtype=np.float64), span)[0]


def lowess_trend(values: np.ndarray, span: int = TREND_SPAN) -> np.ndarray:
    """Robust local-linear LOWESS over ``min(span, n)`` nearest points, equally spaced x."""
    y = np.asarray(values, dtype=np.float64)
    return _robust_fit(y, span)[0]


def spike_count(resid: np.ndarray, z: float = SPIKE_Z) -> int:
    """Number of residuals with robust |z| > z (MAD-scaled; MeanAD fallback when MAD is 0).

    ``curve_metrics`` passes the leave-one-out residual (see the module docstring).
    """
    dev = np.abs(resid - np.median(resid))
    scale = MAD_TO_SD * np.median(dev)
    if scale == 0.0:
        scale = MEANAD_TO_SD * dev.mean()
    if scale == 0.0:
        return 0
    return int(np.count_nonzero(dev / scale > z))


def hf_share(resid: np.ndarray, cutoff: float = HF_CUTOFF) -> float:
    """Share of the residual's Welch power (frequencies > 0) above ``cutoff`` cycles/epoch."""
    freqs, power = welch(resid, fs=1.0, nperseg=min(WELCH_NPERSEG, resid.size))
    total = power[freqs > 0].sum()
    if total <= 0.0:
        return 0.0
    return float(power[freqs > cutoff].sum() / total)


def lag1_autocorr(resid: np.ndarray) -> float:
    """Lag-1 autocorrelation of the residual; 0 when it has no variance."""
    centred = resid - resid.mean()
    denom = np.dot(centred, centred)
    if denom == 0.0:
        return 0.0
    return float(np.dot(centred[:-1], centred[1:]) / denom)


def run_metrics(history: pd.DataFrame, from_epoch: int = 0) -> dict[str, float]:
    """``<curve>.<metric>`` for each curve present, plus val_train_resid_ratio and gen_gap_final.

    Rows with ``epoch < from_epoch`` are dropped; a duplicated epoch keeps its last row; NaN
    values count as not logged at that epoch and are skipped (a diverged run should be flagged
    from its status, not from these metrics).
    """
    kept = history[history["epoch"] >= from_epoch].sort_values("epoch", kind="stable")
    kept = kept.drop_duplicates("epoch", keep="last")
    out: dict[str, float] = {}
    for curve in CURVES:
        if curve in kept.columns:
            values = kept[curve].dropna().to_numpy(dtype=np.float64)
            out.update({f"{curve}.{k}": v for k, v in curve_metrics(values).items()})
    if "val_loss" in kept.columns and "train_loss" in kept.columns:
        out["val_train_resid_ratio"] = _safe_ratio(out["val_loss.resid_sd"], out["train_loss.resid_sd"])
        both = kept[["val_loss", "train_loss"]].dropna()
        last = both.iloc[-1] if len(both) else None
        out["gen_gap_final"] = float(last["val_loss"] - last["train_loss"]) if last is not None else float("nan")
    return out


def _safe_ratio(num: float, den: float) -> float:
    if not np.isfinite(num) or not np.isfinite(den) or den == 0.0:
        return float("nan")
    return float(num / den)


def _robust_fit(y: np.ndarray, span: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(trend, kernel, robustness weights) of Cleveland's iterated bisquare LOWESS."""
    kernel = _tricube_weights(y.size, min(span, y.size))
    x = np.arange(y.size, dtype=np.float64)
    tol = _rounding_tol(y)
    robust = np.ones(y.size)
    fit = _local_linear(x, y, kernel, robust)
    for _ in range(ROBUST_ITERS):
        robust = _bisquare(y - fit, tol)
        fit = _local_linear(x, y, kernel, robust)
    return fit, kernel, robust


def _residuals(y: np.ndarray, span: int) -> tuple[np.ndarray, np.ndarray]:
    """In-sample residual and leave-one-out residual (each point left out of its own trend)."""
    fit, kernel, robust = _robust_fit(y, span)
    loo_kernel = kernel.copy()
    np.fill_diagonal(loo_kernel, 0.0)
    x = np.arange(y.size, dtype=np.float64)
    loo_fit = _local_linear(x, y, loo_kernel, robust)
    tol = _rounding_tol(y)
    return _zero_rounding(y - fit, tol), _zero_rounding(y - loo_fit, tol)


def _zero_rounding(resid: np.ndarray, tol: float) -> np.ndarray:
    resid[np.abs(resid) <= tol] = 0.0
    return resid


def _rounding_tol(y: np.ndarray) -> float:
    return float(np.finfo(np.float32).eps * np.max(np.abs(y), initial=0.0))


def _tricube_weights(n: int, span: int) -> np.ndarray:
    """(n, n) kernel: row i weights its ``span`` nearest points; bandwidth = farthest + 1 so all count."""
    idx = np.arange(n)
    start = np.clip(idx - span // 2, 0, n - span)
    in_window = (idx[None, :] >= start[:, None]) & (idx[None, :] < start[:, None] + span)
    dist = np.abs(idx[None, :] - idx[:, None]).astype(np.float64)
    bandwidth = np.where(in_window, dist, 0.0).max(axis=1) + 1.0
    return np.where(in_window, (1.0 - (dist / bandwidth[:, None]) ** 3) ** 3, 0.0)


def _local_linear(x: np.ndarray, y: np.ndarray, kernel: np.ndarray, robust: np.ndarray) -> np.ndarray:
    weights = kernel * robust[None, :]
    # a window whose points were all rejected as outliers falls back to the plain kernel
    empty = weights.sum(axis=1) <= 0.0
    weights[empty] = kernel[empty]
    total = weights.sum(axis=1)
    x_mean = weights @ x / total
    y_mean = weights @ y / total
    dx = x[None, :] - x_mean[:, None]
    sxx = (weights * dx**2).sum(axis=1)
    sxy = (weights * dx * (y[None, :] - y_mean[:, None])).sum(axis=1)
    slope = np.divide(sxy, sxx, out=np.zeros_like(sxy), where=sxx > 0.0)
    return y_mean + slope * (x - x_mean)


def _bisquare(resid: np.ndarray, tol: float) -> np.ndarray:
    scale = 6.0 * np.median(np.abs(resid))
    if scale <= 6.0 * tol:
        # more than half the points sit on the fit: only those are trusted (the limit of bisquare)
        return (np.abs(resid) <= tol).astype(np.float64)
    u = resid / scale
    return np.where(np.abs(u) < 1.0, (1.0 - u**2) ** 2, 0.0)
