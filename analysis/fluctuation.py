"""Curve-instability metrics: how much a training curve wanders around its own trend.

Every metric is computed per run on one curve (``val_loss``, ``val_acc`` or ``train_loss``) over
the epochs kept by ``run_metrics(from_epoch=K)``; points are treated as equally spaced, x = 0..n-1.
The trend (a learning-curve guide plus a robust LOWESS) and its leave-one-out residual are defined in
``analysis.trend``.

Metrics of a curve y_1..y_T (r = in-sample residual, l = leave-one-out residual):
- ``resid_sd`` = SD(r) with ddof=1.
- ``excess_tv`` = sum_t |y_t - y_{t-1}| - |y_T - y_1|: the path length beyond the net change;
  0 for any monotone curve. It equals 2 x the total movement against the net direction (2 x the
  total rise of a curve that ends below its start), so a separate count of rises would repeat it.
- ``spike_count`` = #{t : |l_t - median(l)| / s > 3}, s = max(1.4826 MAD(l), resolution floor,
  second-difference noise SD ``analysis.trend.noise_sd``),
  l the standardized leave-one-out residual; both directions (val_acc dips and val_loss jumps
  both count).
- ``hf_share`` = sum_{f > 0.25} P(f) / sum_{f > 0} P(f), P = Welch PSD of r (Hann window,
  segments of min(16, T) epochs, half overlap, mean removed per segment); 0.25 cycles/epoch is a
  period of 4 epochs. White noise gives about 0.55.
- ``lag1_autocorr`` = sum_t (r_t - rbar)(r_{t+1} - rbar) / sum_t (r_t - rbar)^2. Biased negative:
  on white noise the plain estimator reads about -1/n, and the trend takes out part of the slow
  variation, which pushes it further (measured, 300 curves each: -0.36 on 6 epochs, -0.27 on 10,
  -0.25 on 15, -0.23 on 30-60; tests pin it). Read it against those values, not against 0; it is
  an exploratory metric.
- run level: ``val_train_resid_ratio`` = val_loss.resid_sd / train_loss.resid_sd (NaN when the
  denominator is 0 or either is NaN); ``gen_gap_final`` = val_loss - train_loss at the last epoch
  where both are logged.

Note on scale: the trend absorbs part of white noise, so ``resid_sd`` reads about 0.88 x the
noise SD on 15 epochs and 0.90-0.91 x on 30-60 epochs (0.78-0.94 across curve shapes, ``analysis.trend``); the
factor is the same for every run of the same length and shape, so ratios between arms are
unaffected.

Breaks (lr milestones): a scheduled lr drop makes the curve jump at a known epoch. That jump is
the schedule, not instability, so it should not count; but a trend cannot tell it from a
fluctuation unless told where it is. ``curve_metrics(breaks=...)`` (positions) and
``run_metrics(breaks=...)`` (epochs: the milestones, the first epochs run at the lower lr;
``parse_breaks`` reads the logged ``milestones`` param) give the guide a step there and keep the
LOWESS windows on one side. A learning curve that steps down at the milestones then leaves a zero
residual; a drop that settles over the next epochs leaves a small part of it (about 2-5% of the
drop as resid_sd, noise-free). Without breaks the drop counts: it shows up in ``resid_sd`` and
usually as spikes around the milestone. A break with fewer than ``analysis.trend.MIN_SEGMENT`` = 3 kept points
on either side is ignored (the step and the local lines would fit those points exactly).

Window (``window_start``): the report measures fluctuation after the warm-up transient, by one rule.
Per run, the trend of the whole val_loss curve is fitted and the run's settle epoch is the first
epoch e after the trend's peak with ``trend(e) - min(trend) <= SETTLE_FRACTION * (peak - min(trend))``
(within a quarter of its initial fall of its lowest level; ``analysis.trend.settle_index``). The
minimum, not the last value, is the reference: a val loss that falls and then rises as the network fits
noisy labels (the demo's digits) has left its warm-up at the bottom of the fall. All runs share one
window, starting at the *largest* settle epoch: a variant that learns more slowly must not have its
transient counted while a faster one does not (that would read as a fluctuation effect), and the
cost, a few epochs fewer for the fast runs, is the same for every arm. The start is capped so that
``MIN_WINDOW`` = 6 epochs remain; ``--from-epoch`` overrides the rule.

Edge cases (the rules the report relies on):
- fewer than 2 points: every metric is NaN (no move to measure);
- fewer than ``MIN_TREND_POINTS`` = 5 points: the trend-based metrics (``resid_sd``,
  ``spike_count``, ``hf_share``, ``lag1_autocorr``) are NaN; ``excess_tv`` is still given. Between 5 and 9 points the span shrinks to the number of points;
- any non-finite value (a diverged curve): every metric is NaN;
- zero residual variance: ``lag1_autocorr`` and ``hf_share`` are 0 (no fluctuation, so none of
  it is correlated or high-frequency); ``spike_count`` is 0;
- MAD == 0 in ``spike_count``: the scale falls back to 1.2533 x mean absolute deviation from the
  median (Iglewicz & Hoaglin's modified z-score rule); if that is 0 too, there are no spikes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.signal import welch

from ablate.errors import ConfigError
from analysis import trend
from analysis.trend import MAD_TO_SD

CURVES = ("val_loss", "val_acc", "train_loss")
CURVE_METRICS = ("resid_sd", "excess_tv", "spike_count", "hf_share", "lag1_autocorr")
SETTLE_FRACTION = 0.25
MIN_WINDOW = 6
MIN_TREND_POINTS = 5
SPIKE_Z = 3.0
HF_CUTOFF = 0.25  # cycles/epoch: fluctuations with a period shorter than 4 epochs
WELCH_NPERSEG = 16
MEANAD_TO_SD = 1.2533  # mean absolute deviation times this estimates the SD (sqrt(pi/2))

_BASE_DOCS = {
    "resid_sd": "SD (ddof=1) of r_t = y_t - trend_t, trend = learning-curve guide + robust local-linear "
                "LOWESS over 9 epochs (analysis.trend)",
    "excess_tv": "sum_t |y_t - y_{t-1}| - |y_T - y_1|: path length beyond the net change (0 if monotone; "
                 "2 x the movement against the net direction)",
    "spike_count": "count of |l_t - median l| / s > 3, s = max(1.4826 MAD(l), noise SD from second differences), "
                   "l = leave-one-out residual of the same trend over its white-noise SD (two-sided)",
    "hf_share": "Welch PSD of r: power above 0.25 cycles/epoch over power above 0 (0 if r == 0)",
    "lag1_autocorr": "sum (r_t - rbar)(r_{t+1} - rbar) / sum (r_t - rbar)^2 (0 if r is constant); white noise "
                     "reads about -0.25 on 10-15 epochs, not 0",
}

#: One-line definition per metric, under the base name (``resid_sd``) and the full name
#: (``val_loss.resid_sd``), so the report can look up either.
METRIC_DOCS: dict[str, str] = {
    **_BASE_DOCS,
    **{f"{curve}.{name}": f"{curve}: {doc}" for curve in CURVES for name, doc in _BASE_DOCS.items()},
    "val_train_resid_ratio": "val_loss.resid_sd / train_loss.resid_sd (NaN if train_loss.resid_sd is 0)",
    "gen_gap_final": "val_loss - train_loss at the last epoch where both are logged",
}


def curve_metrics(values: np.ndarray, breaks: Sequence[int] = ()) -> dict[str, float]:
    """Fluctuation metrics of one curve; ``breaks`` are positions where the trend may step (lr drops)."""
    y = np.asarray(values, dtype=np.float64).ravel()
    out = dict.fromkeys(CURVE_METRICS, float("nan"))
    if y.size < 2 or not np.all(np.isfinite(y)):
        return out
    steps = np.diff(y)
    tol = trend.rounding_tol(y)
    # Path lengths within float32 rounding of the curve are 0: a monotone curve must not leave 1e-16
    # (a ratio against a zero baseline would explode).
    excess = np.abs(steps).sum() - abs(y[-1] - y[0])
    out["excess_tv"] = float(excess) if excess > tol * y.size else 0.0
    if y.size < MIN_TREND_POINTS:
        return out
    resid, loo_resid = trend.residuals(y, breaks=breaks)
    out["resid_sd"] = float(np.std(resid, ddof=1))
    floor = max(trend.resolution(y), trend.noise_sd(y))
    out["spike_count"] = float(spike_count(loo_resid, floor=floor))
    out["hf_share"] = hf_share(resid)
    out["lag1_autocorr"] = lag1_autocorr(resid)
    return out


def spike_count(resid: np.ndarray, z: float = SPIKE_Z, floor: float = 0.0) -> int:
    """Number of residuals with robust |z| > z (MAD-scaled; MeanAD fallback when MAD is 0).

    The scale is at least ``floor`` (``curve_metrics`` passes the curve's resolution) and the
    residual passed is the leave-one-out one (``analysis.trend.residuals``).
    """
    dev = np.abs(resid - np.median(resid))
    scale = MAD_TO_SD * np.median(dev)
    if scale == 0.0:
        scale = MEANAD_TO_SD * dev.mean()
    scale = max(scale, floor)
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


def parse_breaks(milestones: object) -> tuple[int, ...]:
    """Break epochs from a logged ``milestones`` param (``"10"``, ``"100,150"``, ``None``/``"None"``/NaN: none)."""
    if milestones is None or (isinstance(milestones, float) and np.isnan(milestones)):
        return ()
    if isinstance(milestones, (int, np.integer)):
        return (int(milestones),)
    if not isinstance(milestones, str):
        return tuple(int(m) for m in milestones)  # a sequence, e.g. TrainConfig.milestones
    text = milestones.strip().strip("()[]")
    if text in ("", "None"):
        return ()
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"milestones={milestones!r} is not valid; accepted: epochs separated by commas "
                          "('10', '100,150') or None") from None


def run_metrics(history: pd.DataFrame, from_epoch: int = 0, breaks: Sequence[int] = ()) -> dict[str, float]:
    """``<curve>.<metric>`` for each curve present, plus val_train_resid_ratio and gen_gap_final.

    Rows with ``epoch < from_epoch`` are dropped; a duplicated epoch keeps its last row; NaN
    values count as not logged at that epoch and are skipped (a diverged run should be flagged
    from its status, not from these metrics). ``breaks`` are the epochs at which the lr dropped
    (the run's milestones): the trend may step there (module docstring, Breaks).
    """
    kept = history[history["epoch"] >= from_epoch].sort_values("epoch", kind="stable")
    kept = kept.drop_duplicates("epoch", keep="last")
    out: dict[str, float] = {}
    for curve in CURVES:
        if curve in kept.columns:
            logged = kept[["epoch", curve]].dropna()
            positions = _break_positions(logged["epoch"].to_numpy(), breaks)
            values = logged[curve].to_numpy(dtype=np.float64)
            out.update({f"{curve}.{k}": v for k, v in curve_metrics(values, positions).items()})
    if "val_loss" in kept.columns and "train_loss" in kept.columns:
        out["val_train_resid_ratio"] = _safe_ratio(out["val_loss.resid_sd"], out["train_loss.resid_sd"])
        both = kept[["val_loss", "train_loss"]].dropna()
        last = both.iloc[-1] if len(both) else None
        out["gen_gap_final"] = float(last["val_loss"] - last["train_loss"]) if last is not None else float("nan")
    return out


def settle_epoch(history: pd.DataFrame, curve: str = "val_loss", breaks: Sequence[int] = ()) -> int | None:
    """First epoch at which the curve's trend is within ``SETTLE_FRACTION`` of its initial fall of its minimum (None: too short)."""
    logged = history[["epoch", curve]].dropna().sort_values("epoch", kind="stable").drop_duplicates("epoch", keep="last")
    if len(logged) < MIN_TREND_POINTS or not np.all(np.isfinite(logged[curve])):
        return None
    epochs = logged["epoch"].to_numpy()
    index = trend.settle_index(logged[curve].to_numpy(dtype=np.float64), SETTLE_FRACTION,
                               _break_positions(epochs, breaks))
    return int(epochs[index])


def window_start(settle_epochs: Sequence[int | None], last_epoch: int) -> int:
    """The shared window's first epoch: the largest settle epoch, capped to leave ``MIN_WINDOW`` epochs."""
    known = [e for e in settle_epochs if e is not None]
    return int(min(max(known, default=0), max(last_epoch + 1 - MIN_WINDOW, 0)))


def _break_positions(epochs: np.ndarray, breaks: Sequence[int]) -> tuple[int, ...]:
    """Index of the first kept point at or after each break epoch (the first point with the new lr)."""
    return tuple(sorted({int(np.searchsorted(epochs, b)) for b in breaks}))


def _safe_ratio(num: float, den: float) -> float:
    if not np.isfinite(num) or not np.isfinite(den) or den == 0.0:
        return float("nan")
    return float(num / den)

