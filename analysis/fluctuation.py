"""Curve-instability metrics: how much a training curve wanders around its own trend.

Every metric is computed per run on one curve (``val_loss``, ``val_acc`` or ``train_loss``) over
the epochs kept by ``run_metrics(from_epoch=K)``; points are treated as equally spaced, x = 0..n-1.

Trend = guide + robust LOWESS of what the guide leaves.

- Guide: a weighted least-squares learning curve ``c + b x/n + a s(x) + sum_j d_j [x >= m_j]``,
  one step per break m_j (a scheduled lr drop, see Breaks). The shape s is the better (smaller
  weighted SSE) of ``exp(-x/tau)`` and the power law ``(1+x)^-p``, or the stretched/compressed
  exponential ``exp(-(x/tau)^k)`` (k < 1 heavy-tailed, k > 1 an S-shaped onset). Nested F-tests
  at ``GUIDE_ALPHA`` = 1% decide: the shape (a and tau or p) is kept only if it beats the line,
  and k is freed from 1 only if that beats the better one-parameter shape; parameters that only
  chase noise would cost residual degrees of freedom (on 15 epochs a free k lowers the
  white-noise reading from 0.88 to 0.82 x its SD). tau in [``GUIDE_TAU_MIN`` = 1 epoch,
  ``GUIDE_TAU_MAX`` = 10 n], k in ``GUIDE_K`` = [0.25, 4], p in ``GUIDE_P`` = [0.1, 2]; the linear
  coefficients are exact, the shape parameters come from a log grid then bounded Brent steps on
  the variable-projection SSE. The guide is fitted once, with spike-resistant weights: bisquare
  of y minus its running median of 3 (an end point against ``median(y_0, y_1, y_1 + 4 (y_1 - y_2))``,
  so a steep start whose first drop is up to ``END_RATIO`` = 4 times the second is not taken for a
  spike), on the noise scale of the first differences (``1.4826 MAD(diff y) / sqrt 2``). Fitting it
  once, not inside the robustness loop, keeps a rejected first epoch from being replaced by an
  extrapolated guide.
- LOWESS (Cleveland 1979) of ``y - guide``: local-linear, ``TREND_SPAN`` = 9 nearest epochs of the
  same segment (windows do not cross a break) with tricube weights, refitted ``ROBUST_ITERS`` = 2
  times with bisquare robustness weights (cut-off 6 x median |residual|). The robustness step keeps
  an isolated spike out of the trend, so the spike stays (nearly) whole in the residual; a spike
  much smaller than the others is only partly down-weighted and is partly absorbed.

Why the guide (measured, tests pin the results): a local-linear LOWESS alone cannot follow a steep
early decay. On the noise-free ``2 exp(-e/tau) + 0.3`` it left resid_sd 0.21 / 0.10 / 0.028 for
tau = 2 / 4 / 8 over 15 epochs (and 2-27 spikes); with the same noise added to tau = 2 and tau = 8,
resid_sd differed 7-fold (noise SD 0.01, 15 epochs), so a variant that learns faster looked more
"fluctuating". Alternatives measured: a local-quadratic LOWESS (0.063 for tau = 4 and 0.28 for tau = 2
over 15 epochs: its robustness step rejects the steep start as outliers) and a
local-quadratic LOWESS on log y (0.0044 for tau = 2, and no help for accuracy curves, which rise to
a ceiling). With the guide every curve of its families (with linear drift, and with lr steps at
the given breaks) leaves a zero residual, the tau = 2 / tau = 8 ratio above is 0.99, and white
noise of 2.5% of the curve's range reads 0.78-0.90 x its SD over 15 epochs and 0.85-0.94 over 30-60
epochs on exponential, double-exponential, power-law, S-shaped, accuracy-like and decay-then-rise
curves (the old trend: 1.4-6.6). Shapes outside the families keep a small misfit, which dominates
only on curves quieter than about 0.5% of their range (there 0.81-1.74; the old trend 6-40).

Residual ``r_t = y_t - trend_t``. Residuals below float32 resolution of the curve
(``|r| <= eps32 * max|y|``) are set to 0: metrics are logged as float32, so smaller differences
are rounding, not fluctuation. The bisquare and spike scales are floored at ``RESOLUTION`` = 1e-3
times the range of the running median of y (the curve's range without isolated spikes): on a
noise-free curve the median residual is ~0, and without a floor any tiny misfit of a shape
outside the families would be rejected as an outlier or counted as a spike.

Spikes are scored on the standardized leave-one-out residual: ``l_t = y_t - trend_{-t}(t)``, the
same fit (same guide shape and weights, same robustness weights) with point t given no weight in
the guide and in its own local line, divided by its SD under white noise, ``sqrt(1 + sum_j A_tj^2)``
(A: the leave-one-out trend as a linear map of y, taken without LOWESS rejections). In-sample
robust residuals have tails far heavier than their MAD suggests (on white noise, 60 epochs, about
1 point per curve passes |z| > 3 instead of the Gaussian 0.16); leaving the point out brings this
to about 0.37 per curve (0.25 on 15 epochs), the same at every position: the first epoch, whose
trend without it is an extrapolation, is not flagged more often than the others.

Metrics of a curve y_1..y_T (r = in-sample residual, l = leave-one-out residual):
- ``resid_sd`` = SD(r) with ddof=1.
- ``excess_tv`` = sum_t |y_t - y_{t-1}| - |y_T - y_1|: the path length beyond the net change;
  0 for any monotone curve.
- ``up_moves`` = sum_t max(y_t - y_{t-1}, 0): total rise (for val_acc the rises are improvements).
- ``spike_count`` = #{t : |l_t - median(l)| / s > 3}, s = max(1.4826 MAD(l), resolution floor),
  l the standardized leave-one-out residual; both directions (val_acc dips and val_loss jumps
  both count).
- ``hf_share`` = sum_{f > 0.25} P(f) / sum_{f > 0} P(f), P = Welch PSD of r (Hann window,
  segments of min(16, T) epochs, half overlap, mean removed per segment); 0.25 cycles/epoch is a
  period of 4 epochs. White noise gives about 0.55.
- ``lag1_autocorr`` = sum_t (r_t - rbar)(r_{t+1} - rbar) / sum_t (r_t - rbar)^2.
- run level: ``val_train_resid_ratio`` = val_loss.resid_sd / train_loss.resid_sd (NaN when the
  denominator is 0 or either is NaN); ``gen_gap_final`` = val_loss - train_loss at the last epoch
  where both are logged.

Note on scale: the trend absorbs part of white noise, so ``resid_sd`` reads about 0.88 x the
noise SD on 15 epochs and 0.90-0.91 x on 30-60 epochs (0.78-0.94 across curve shapes, above); the
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
usually as spikes around the milestone. A break with fewer than ``MIN_SEGMENT`` = 3 kept points on
either side is ignored (the step and the local lines would fit those points exactly).

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

from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.signal import welch
from scipy.stats import f as f_dist

from ablate.config import ConfigError

CURVES = ("val_loss", "val_acc", "train_loss")
CURVE_METRICS = ("resid_sd", "excess_tv", "up_moves", "spike_count", "hf_share", "lag1_autocorr")

TREND_SPAN = 9
ROBUST_ITERS = 2
MIN_TREND_POINTS = 5
MIN_SEGMENT = 3
SPIKE_Z = 3.0
HF_CUTOFF = 0.25  # cycles/epoch: fluctuations with a period shorter than 4 epochs
WELCH_NPERSEG = 16
MAD_TO_SD = 1.4826  # MAD of a normal sample times this estimates its SD
MEANAD_TO_SD = 1.2533  # mean absolute deviation times this estimates the SD (sqrt(pi/2))
BISQUARE_C = 6.0  # bisquare cut-off in median absolute residuals (Cleveland 1979)
RESOLUTION = 1e-3  # residual scales are floored at this share of the curve's (spike-free) range
END_RATIO = 4.0  # an end point is a spike only beyond this many times its neighbour's step
GUIDE_TAU_MIN = 1.0  # epochs: the steepest decay the guide takes as trend (1/e per epoch)
GUIDE_TAU_MAX = 10.0  # x curve length: slower decays are a line plus a parabola the LOWESS follows
GUIDE_K = (0.25, 4.0)  # stretched (k < 1) to compressed (k > 1) exponential
GUIDE_P = (0.1, 2.0)  # power-law exponents
GUIDE_GRID = (30, 9)  # grid points for log tau (and log p), and for log k
GUIDE_ALPHA = 0.01  # a guide parameter is used only when an F-test at this level says it fits better
GUIDE_XTOL = 1e-9  # Brent tolerance on the log parameters: exact to float32 on the families' curves

_BASE_DOCS = {
    "resid_sd": "SD (ddof=1) of r_t = y_t - trend_t, trend = learning-curve guide + robust local-linear "
                "LOWESS over 9 epochs (module docstring)",
    "excess_tv": "sum_t |y_t - y_{t-1}| - |y_T - y_1|: path length beyond the net change (0 if monotone)",
    "up_moves": "sum_t max(y_t - y_{t-1}, 0): total rise (for val_acc this counts improvements)",
    "spike_count": "count of |l_t - median l| / (1.4826 MAD(l)) > 3, l = leave-one-out residual of the same "
                   "trend over its white-noise SD (two-sided)",
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


def curve_metrics(values: np.ndarray, breaks: Sequence[int] = ()) -> dict[str, float]:
    """Fluctuation metrics of one curve; ``breaks`` are positions where the trend may step (lr drops)."""
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
    resid, loo_resid = _residuals(y, TREND_SPAN, breaks)
    out["resid_sd"] = float(np.std(resid, ddof=1))
    out["spike_count"] = float(spike_count(loo_resid, floor=_resolution(y)))
    out["hf_share"] = hf_share(resid)
    out["lag1_autocorr"] = lag1_autocorr(resid)
    return out


def residual(values: np.ndarray, span: int = TREND_SPAN, breaks: Sequence[int] = ()) -> np.ndarray:
    """Curve minus its trend, with float32-rounding-level residuals set to 0."""
    return _residuals(np.asarray(values, dtype=np.float64), span, breaks)[0]


def lowess_trend(values: np.ndarray, span: int = TREND_SPAN, breaks: Sequence[int] = ()) -> np.ndarray:
    """The trend: learning-curve guide plus robust local-linear LOWESS (``min(span, n)`` points) of the rest."""
    y = np.asarray(values, dtype=np.float64)
    return _fit(y, span, breaks)[0]


def spike_count(resid: np.ndarray, z: float = SPIKE_Z, floor: float = 0.0) -> int:
    """Number of residuals with robust |z| > z (MAD-scaled; MeanAD fallback when MAD is 0).

    The scale is at least ``floor`` (``curve_metrics`` passes the curve's resolution) and the
    residual passed is the leave-one-out one (see the module docstring).
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
    (the run's milestones): the trend may step there (module docstring).
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


def _break_positions(epochs: np.ndarray, breaks: Sequence[int]) -> tuple[int, ...]:
    """Index of the first kept point at or after each break epoch (the first point with the new lr)."""
    return tuple(sorted({int(np.searchsorted(epochs, b)) for b in breaks}))


def _safe_ratio(num: float, den: float) -> float:
    if not np.isfinite(num) or not np.isfinite(den) or den == 0.0:
        return float("nan")
    return float(num / den)


# -- trend -------------------------------------------------------------------------------------


def _residuals(y: np.ndarray, span: int, breaks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """In-sample residual and standardized leave-one-out residual.

    The leave-one-out residual l_t = y_t - (A y)_t has SD sigma sqrt(1 + sum_j A_tj^2) under white
    noise of SD sigma; it is divided by that factor (A taken with no point rejected by the LOWESS),
    so an end point, whose trend without it is an extrapolation, is not flagged more often than an
    interior one.
    """
    fit, loo, plain_loo = _fit(y, span, breaks)
    tol = _rounding_tol(y)
    loo_resid = _zero_rounding(y - loo @ y, tol)
    return _zero_rounding(y - fit, tol), loo_resid / np.sqrt(1.0 + (plain_loo**2).sum(axis=1))


def _fit(y: np.ndarray, span: int, breaks: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(trend, leave-one-out operator, the same without LOWESS robustness weights).

    The trend is the guide plus the robust LOWESS of ``y - guide``.
    """
    n = y.size
    x = np.arange(n, dtype=np.float64)
    tol = _rounding_tol(y)
    dev = _median3_dev(y)
    floor = _resolution(y, dev)
    guide_weights = _guide_weights(y, dev, tol, floor)
    usable = _usable_breaks(n, breaks)
    design = _guide_design(x, y, guide_weights, usable)
    guide = design @ _wls_coef(design, y, guide_weights)
    rest = y - guide
    kernel = _tricube_kernel(n, min(span, n), usable)
    robust = np.ones(n)
    smooth = _local_linear_matrix(kernel, robust)
    for _ in range(ROBUST_ITERS):
        robust = _bisquare(rest - smooth @ rest, tol, floor)
        smooth = _local_linear_matrix(kernel, robust)
    loo_kernel = kernel.copy()
    np.fill_diagonal(loo_kernel, 0.0)
    coef_maps = _loo_coef_maps(design, guide_weights)
    # the spike scale uses the operator with no LOWESS rejections: a spike's neighbours must not inflate it
    return (guide + smooth @ rest, _loo_operator(design, coef_maps, loo_kernel, robust),
            _loo_operator(design, coef_maps, loo_kernel, np.ones(n)))


def _loo_coef_maps(design: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(n, k, n): Q_t maps y to the guide coefficients fitted with point t at weight 0."""
    n = w.size
    sw = np.sqrt(np.where(np.eye(n, dtype=bool), 0.0, w[None, :]))
    return np.linalg.pinv(design[None] * sw[..., None]) * sw[:, None, :]


def _loo_operator(design: np.ndarray, coef_maps: np.ndarray, loo_kernel: np.ndarray,
                  robust: np.ndarray) -> np.ndarray:
    """(n, n) A with (A y)_t = trend at t fitted without point t (A_tt = 0).

    Row t: the guide refitted without t (same shape column), plus the local line through the rest
    with t out of its own window: A_t = (e_t - L_t) B Q_t + L_t, L the leave-one-out smoother.
    """
    smooth = _local_linear_matrix(loo_kernel, robust)
    return np.einsum("tk,tkj->tj", design - smooth @ design, coef_maps) + smooth


def _usable_breaks(n: int, breaks: Sequence[int]) -> tuple[int, ...]:
    return tuple(b for b in sorted(set(breaks)) if MIN_SEGMENT <= b <= n - MIN_SEGMENT)


def _zero_rounding(resid: np.ndarray, tol: float) -> np.ndarray:
    resid[np.abs(resid) <= tol] = 0.0
    return resid


def _rounding_tol(y: np.ndarray) -> float:
    return float(np.finfo(np.float32).eps * np.max(np.abs(y), initial=0.0))


def _resolution(y: np.ndarray, dev: np.ndarray | None = None) -> float:
    """Smallest residual scale: ``RESOLUTION`` x the range of the curve without isolated spikes."""
    return float(RESOLUTION * np.ptp(y - (_median3_dev(y) if dev is None else dev)))


def _median3_dev(y: np.ndarray) -> np.ndarray:
    """y minus its running median of 3; an end point against median(y_0, y_1, y_1 + END_RATIO (y_1 - y_2))."""
    med = y.copy()
    if y.size >= 3:
        med[1:-1] = np.median(np.stack([y[:-2], y[1:-1], y[2:]]), axis=0)
        for end, near, next_ in ((0, 1, 2), (-1, -2, -3)):
            med[end] = np.median([y[end], y[near], y[near] + END_RATIO * (y[near] - y[next_])])
    return y - med


def _guide_weights(y: np.ndarray, dev: np.ndarray, tol: float, floor: float) -> np.ndarray:
    """Bisquare weights of the running-median deviations, on the noise scale of the first differences.

    The differences' MAD measures noise, not the trend's curvature, so a steep but smooth start is
    kept while an isolated spike (15 noise SDs in the tests) gets weight 0.
    """
    steps = np.diff(y)
    noise_sd = MAD_TO_SD * np.median(np.abs(steps - np.median(steps))) / np.sqrt(2.0)
    return _bisquare_weights(dev, max(noise_sd / MAD_TO_SD, floor), tol)


def _bisquare(resid: np.ndarray, tol: float, floor: float) -> np.ndarray:
    """Cleveland's robustness weights: bisquare of resid / (6 median|resid|), the median floored."""
    return _bisquare_weights(resid, max(np.median(np.abs(resid)), floor), tol)


def _bisquare_weights(resid: np.ndarray, median_abs: float, tol: float) -> np.ndarray:
    scale = BISQUARE_C * median_abs
    if scale <= BISQUARE_C * tol:
        # more than half the points sit on the fit: only those are trusted (the limit of bisquare)
        return (np.abs(resid) <= tol).astype(np.float64)
    u = resid / scale
    return np.where(np.abs(u) < 1.0, (1.0 - u**2) ** 2, 0.0)


# -- guide: c + b x/n + a shape(x) + steps -------------------------------------------------------


def _fixed_columns(x: np.ndarray, breaks: Sequence[int]) -> np.ndarray:
    return np.stack([np.ones_like(x), x / x.size, *[(x >= b).astype(np.float64) for b in breaks]], axis=-1)


def _exponential(x: np.ndarray, params: np.ndarray) -> np.ndarray:
    """exp(-x/tau) for rows of (log tau,)."""
    return np.exp(-x[None, :] / np.exp(params[:, :1]))


def _stretched_exp(x: np.ndarray, params: np.ndarray) -> np.ndarray:
    """exp(-(x/tau)^k) for rows of (log tau, log k)."""
    return np.exp(-((x[None, :] / np.exp(params[:, :1])) ** np.exp(params[:, 1:2])))


def _power(x: np.ndarray, params: np.ndarray) -> np.ndarray:
    """(1 + x)^-p for rows of (log p,)."""
    return (1.0 + x[None, :]) ** -np.exp(params[:, :1])


def _shape_grids(n: int) -> dict[Callable, list[np.ndarray]]:
    """Log-parameter grids of each shape family."""
    n_scale, n_k = GUIDE_GRID
    taus = np.linspace(np.log(GUIDE_TAU_MIN), np.log(GUIDE_TAU_MAX * n), n_scale)
    return {
        _exponential: [taus],
        _power: [np.linspace(np.log(GUIDE_P[0]), np.log(GUIDE_P[1]), n_scale)],
        _stretched_exp: [taus, np.linspace(np.log(GUIDE_K[0]), np.log(GUIDE_K[1]), n_k)],
    }


def _guide_design(x: np.ndarray, y: np.ndarray, w: np.ndarray, breaks: Sequence[int]) -> np.ndarray:
    """Fixed columns, plus a shape column when it earns its place (nested F-tests at ``GUIDE_ALPHA``).

    Line (+ steps) -> the better one-parameter shape (amplitude and tau or p: 2 parameters) ->
    the stretched exponential (k: 1 more). A shape that does not fit better than chance would is
    left out: on a flat or noisy curve it would only chase the first epochs' noise.
    """
    fixed = _fixed_columns(x, breaks)
    sse = _projected_sse(fixed, y, w)
    fits = {shape: _best_shape(x, shape, grids, sse) for shape, grids in _shape_grids(x.size).items()}
    simple = min(fits[_exponential], fits[_power], key=lambda fit: fit[0])
    general = fits[_stretched_exp]
    n_eff, n_fixed = float(w.sum()), fixed.shape[1]
    tiny = x.size * _rounding_tol(y) ** 2  # sums of squares at float32 rounding level count as 0
    line_sse = float(sse(np.zeros((1, x.size)))[0])
    if not _extra_parameters_pay(line_sse, simple[0], 2, n_eff - n_fixed - 2, tiny):
        return fixed
    free_k = _extra_parameters_pay(simple[0], general[0], 1, n_eff - n_fixed - 3, tiny)
    return np.column_stack([fixed, general[1] if free_k else simple[1]])


def _extra_parameters_pay(sse_small: float, sse_big: float, extra: int, dof: float, tiny: float) -> bool:
    """Nested-model F-test: do ``extra`` parameters cut the SSE by more than chance would at ``GUIDE_ALPHA``?"""
    gain = sse_small - sse_big
    if gain <= tiny or dof < 1.0:
        return False
    if sse_big <= tiny:
        return True  # the bigger model is exact and the smaller one is not
    return (gain / extra) / (sse_big / dof) > f_dist.ppf(1.0 - GUIDE_ALPHA, extra, dof)


def _projected_sse(fixed: np.ndarray, y: np.ndarray, w: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """SSE of the weighted LS fit of y on fixed + one extra column, for a stack of extra columns.

    Variable projection: with the fixed columns projected out, one extra column e reduces the
    SSE of the residual ry by (e.ry)^2 / e.e, so the shape parameters are searched in closed form.
    """
    sw = np.sqrt(w)
    basis, _ = np.linalg.qr(fixed * sw[:, None])
    ry = y * sw
    ry -= basis @ (basis.T @ ry)
    total = float(ry @ ry)
    smallest = np.finfo(np.float64).tiny

    def sse(columns: np.ndarray) -> np.ndarray:
        re = columns * sw
        re -= (re @ basis) @ basis.T
        # (e.ry)^2 / e.e <= ry.ry (Cauchy-Schwarz), and e.ry = 0 whenever e.e = 0: the floor is safe
        return total - (re @ ry) ** 2 / np.maximum(np.einsum("ij,ij->i", re, re), smallest)

    return sse


def _best_shape(x: np.ndarray, shape: Callable, grids: list[np.ndarray], sse: Callable) -> tuple[float, np.ndarray]:
    """(sse, column) of the family's best member: the full grid, then Brent steps (``_refine_shape``)."""
    mesh = np.stack([g.ravel() for g in np.meshgrid(*grids, indexing="ij")], axis=-1)
    values = sse(shape(x, mesh))
    best = int(np.argmin(values))
    return _refine_shape(x, shape, grids, sse, mesh[best].copy(), float(values[best]))


def _refine_shape(x: np.ndarray, shape: Callable, grids: list[np.ndarray], sse: Callable,
                  best: np.ndarray, best_sse: float) -> tuple[float, np.ndarray]:
    """(sse, column) after bounded Brent steps along each log parameter, within a grid step.

    The order is scale, then k and the scale again: the scale is refined last, so a member whose
    k sits on a grid point (k = 2 in the tests) is found to ``GUIDE_XTOL``.
    """
    for i in [0] if len(grids) == 1 else [0, 1, 0]:
        step = grids[i][1] - grids[i][0]
        lo, hi = max(grids[i][0], best[i] - step), min(grids[i][-1], best[i] + step)
        trial = best.copy()

        def along(value: float, i: int = i, trial: np.ndarray = trial) -> float:
            trial[i] = value
            return float(sse(shape(x, trial[None]))[0])

        res = minimize_scalar(along, bounds=(lo, hi), method="bounded", options={"xatol": GUIDE_XTOL})
        if res.fun < best_sse:
            best[i], best_sse = res.x, float(res.fun)
    return best_sse, shape(x, best[None])[0]


def _wls_coef(design: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    sw = np.sqrt(w)
    return np.linalg.pinv(design * sw[:, None]) @ (y * sw)


# -- LOWESS ------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _tricube_kernel(n: int, span: int, breaks: tuple[int, ...] = ()) -> np.ndarray:
    """(n, n) kernel: row i weights its ``span`` nearest points of its segment; bandwidth = farthest + 1.

    Segments are separated by the breaks: the local lines do not smooth across a scheduled jump
    (a segment shorter than ``span`` uses all of its points).
    """
    idx = np.arange(n)
    edges = np.array([0, *breaks, n])
    segment = np.searchsorted(edges, idx, side="right") - 1
    seg_start, seg_end = edges[segment], edges[segment + 1]
    width = np.minimum(span, seg_end - seg_start)
    start = np.clip(idx - width // 2, seg_start, seg_end - width)
    in_window = (idx[None, :] >= start[:, None]) & (idx[None, :] < (start + width)[:, None])
    dist = np.abs(idx[None, :] - idx[:, None]).astype(np.float64)
    bandwidth = np.where(in_window, dist, 0.0).max(axis=1) + 1.0
    kernel = np.where(in_window, (1.0 - (dist / bandwidth[:, None]) ** 3) ** 3, 0.0)
    kernel.flags.writeable = False  # cached: shared between calls
    return kernel


def _local_linear_matrix(kernel: np.ndarray, robust: np.ndarray) -> np.ndarray:
    """(n, n) smoother: row i holds the weights of the weighted local line evaluated at point i."""
    weights = kernel * robust[None, :]
    # a window whose points were all rejected as outliers falls back to the plain kernel
    empty = weights.sum(axis=1) <= 0.0
    weights[empty] = kernel[empty]
    x = np.arange(kernel.shape[0], dtype=np.float64)
    total = weights.sum(axis=1, keepdims=True)
    x_mean = weights @ x / total[:, 0]
    dx = x[None, :] - x_mean[:, None]
    sxx = (weights * dx**2).sum(axis=1, keepdims=True)
    slope_row = np.divide(weights * dx, sxx, out=np.zeros_like(weights), where=sxx > 0.0)
    return weights / total + slope_row * (x - x_mean)[:, None]
