"""The trend of a training curve: the line ``analysis.fluctuation`` measures fluctuation around.

Points are treated as equally spaced, x = 0..n-1. Trend = guide + robust LOWESS of what the guide leaves.

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

Breaks: positions where the trend may step (a scheduled lr drop; ``analysis.fluctuation`` says why
it should not count as fluctuation). The guide gets a step there and the LOWESS windows stay on one
side. A break with fewer than ``MIN_SEGMENT`` = 3 kept points on either side is ignored (the step
and the local lines would fit those points exactly).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.stats import f as f_dist

TREND_SPAN = 9
ROBUST_ITERS = 2
MIN_SEGMENT = 3
MAD_TO_SD = 1.4826  # MAD of a normal sample times this estimates its SD
BISQUARE_C = 6.0  # bisquare cut-off in median absolute residuals (Cleveland 1979)
RESOLUTION = 1e-3  # residual scales are floored at this share of the curve's (spike-free) range
END_RATIO = 4.0  # the in-sample guide keeps an end point whose step is up to this many times its neighbour's
MIN_END_CHECK = 6  # points needed to refit the guide without an end point (5 for the trend, plus the end)
SETTLE_ROUNDS = 3  # alternations between the shape and the settling transients
SETTLE_TAU_MIN = 0.25  # epochs: the fastest settling after a break the guide models
GUIDE_TAU_MIN = 1.0  # epochs: the steepest decay the guide takes as trend (1/e per epoch)
GUIDE_TAU_MAX = 10.0  # x curve length: slower decays are a line plus a parabola the LOWESS follows
GUIDE_K = (0.25, 4.0)  # stretched (k < 1) to compressed (k > 1) exponential
GUIDE_P = (0.1, 2.0)  # power-law exponents
GUIDE_GRID = (30, 9)  # grid points for log tau (and log p), and for log k
END_ALPHA = 0.2  # F-test level of the guide refitted without an end point (few points: lenient)
GUIDE_ALPHA = 0.01  # a guide parameter is used only when an F-test at this level says it fits better
GUIDE_XTOL = 1e-9  # Brent tolerance on the log parameters: exact to float32 on the families' curves


def residual(values: np.ndarray, span: int = TREND_SPAN, breaks: Sequence[int] = ()) -> np.ndarray:
    """Curve minus its trend, with float32-rounding-level residuals set to 0."""
    return residuals(np.asarray(values, dtype=np.float64), span, breaks)[0]


def residuals(y: np.ndarray, span: int = TREND_SPAN, breaks: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """In-sample residual and standardized leave-one-out residual.

    The leave-one-out residual l_t = y_t - (A y)_t has SD sigma sqrt(1 + sum_j A_tj^2) under white
    noise of SD sigma; it is divided by that factor (A taken with no point rejected by the LOWESS),
    so an end point, whose trend without it is an extrapolation, is not flagged more often than an
    interior one.
    """
    fit, loo, plain_loo = _fit(y, span, breaks)
    tol = rounding_tol(y)
    loo_resid = _zero_rounding(y - loo @ y, tol)
    return _zero_rounding(y - fit, tol), loo_resid / np.sqrt(1.0 + (plain_loo**2).sum(axis=1))


def rounding_tol(y: np.ndarray) -> float:
    """float32 resolution of the curve: differences up to this are rounding, not fluctuation."""
    return float(np.finfo(np.float32).eps * np.max(np.abs(y), initial=0.0))


def resolution(y: np.ndarray, dev: np.ndarray | None = None) -> float:
    """Smallest residual scale: ``RESOLUTION`` x the range of the curve without isolated spikes."""
    return float(RESOLUTION * np.ptp(y - (_median3_dev(y) if dev is None else dev)))


def noise_sd(y: np.ndarray) -> float:
    """White-noise SD from second differences, 1.4826 MAD(d2 y) / sqrt 6: no fit involved.

    The spike scale is floored at it: where the trend follows a few points closely (the first epochs of a
    steep start, the epochs after a settling lr step) their leave-one-out residuals come out small, and a
    scale from those residuals alone would shrink and flag ordinary noise elsewhere. An isolated spike
    moves 3 of the n - 2 second differences, so the median ignores it.
    """
    d2 = np.diff(y, 2)
    if d2.size == 0:
        return 0.0
    return float(MAD_TO_SD * np.median(np.abs(d2 - np.median(d2))) / np.sqrt(6.0))


def fitted(values: np.ndarray, span: int = TREND_SPAN, breaks: Sequence[int] = ()) -> np.ndarray:
    """The trend itself (guide + robust LOWESS) of a curve."""
    return _fit(np.asarray(values, dtype=np.float64), span, breaks)[0]


def settle_index(values: np.ndarray, fraction: float, breaks: Sequence[int] = ()) -> int:
    """Where a loss curve's initial fall has settled: the first position after the trend's peak that precedes its
    minimum where ``trend - min <= fraction * (peak - min)``; 0 for a trend that never falls.

    The reference is the trend's minimum, not its last value: a validation loss that falls and then rises (a network
    fitting noisy labels) has left its warm-up at the bottom of the fall, however far the later rise goes.
    """
    fit = fitted(values, breaks=breaks)
    low = int(np.argmin(fit))
    peak = int(np.argmax(fit[:low + 1]))
    excess = fit[peak:low + 1] - fit[low]
    return peak + int(np.argmax(excess <= fraction * excess[0]))


def _fit(y: np.ndarray, span: int, breaks: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(trend, leave-one-out operator, the same without LOWESS robustness weights).

    The trend is the guide plus the robust LOWESS of ``y - guide``. The end points are judged against
    the guide refitted without them (``_end_designs``): nothing on one side pins them down.
    """
    n = y.size
    x = np.arange(n, dtype=np.float64)
    tol = rounding_tol(y)
    dev = _median3_dev(y)
    floor = resolution(y, dev)
    scale = max(_noise_sd(y) / MAD_TO_SD, floor)
    guide_weights = _bisquare_weights(dev, scale, tol)
    usable = _usable_breaks(n, breaks)
    end_designs = _end_designs(x, y, guide_weights, usable, scale, tol) if n >= MIN_END_CHECK else {}
    design, _ = _guide_design(x, y, guide_weights, usable)
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
    loo = _loo_operator(design, coef_maps, loo_kernel, robust)
    plain = _loo_operator(design, coef_maps, loo_kernel, np.ones(n))
    for end, end_design in end_designs.items():
        end_map = _loo_coef_maps(end_design, guide_weights)[end]
        for op, rob in ((loo, robust), (plain, np.ones(n))):
            row = _local_linear_matrix(loo_kernel, rob)[end]
            op[end] = (end_design[end] - row @ end_design) @ end_map + row
    return guide + smooth @ rest, loo, plain


def _noise_sd(y: np.ndarray) -> float:
    """Noise SD from the first differences (1.4826 MAD(diff y) / sqrt 2): the trend's curvature barely enters."""
    steps = np.diff(y)
    return float(MAD_TO_SD * np.median(np.abs(steps - np.median(steps))) / np.sqrt(2.0)) if steps.size else 0.0


def _end_designs(x: np.ndarray, y: np.ndarray, weights: np.ndarray, breaks: Sequence[int], scale: float,
                 tol: float) -> dict[int, np.ndarray]:
    """Guide design refitted without each end point (for its leave-one-out residual); may raise its weight.

    The guide is selected again on the other points (F-tests at ``END_ALPHA``, the other end trusted)
    and extrapolated to the end. The end's in-sample weight becomes the larger of its running-median
    weight and its bisquare weight against that extrapolation, so a steep start on the extrapolation
    stays trend even when its first step is more than ``END_RATIO`` times the second.
    """
    out = {}
    for end, other in ((0, -1), (x.size - 1, 0)):
        w = weights.copy()
        w[end], w[other] = 0.0, 1.0
        design, _ = _guide_design(x, y, w, breaks, alpha=END_ALPHA)
        out[end] = design
        deviation = y[end] - design[end] @ _wls_coef(design, y, w)
        weights[end] = max(weights[end], _bisquare_weights(np.array([deviation]), scale, tol)[0])
    return out


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


def _median3_dev(y: np.ndarray) -> np.ndarray:
    """y minus its running median of 3; an end point against median(y_0, y_1, y_1 + END_RATIO (y_1 - y_2))."""
    med = y.copy()
    if y.size >= 3:
        med[1:-1] = np.median(np.stack([y[:-2], y[1:-1], y[2:]]), axis=0)
        for end, near, next_ in ((0, 1, 2), (-1, -2, -3)):
            med[end] = np.median([y[end], y[near], y[near] + END_RATIO * (y[near] - y[next_])])
    return y - med


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


def _guide_design(x: np.ndarray, y: np.ndarray, w: np.ndarray, breaks: Sequence[int],
                  alpha: float = GUIDE_ALPHA) -> tuple[np.ndarray, tuple]:
    """(design, choice): fixed columns, plus shape and settling columns when they earn their place.

    Line (+ steps) -> the better one-parameter shape (amplitude and tau or p: 2 parameters) ->
    the stretched exponential (k: 1 more), then per break a settling transient (``_settle_column``);
    each by a nested F-test at ``GUIDE_ALPHA``: a shape that does not fit better than chance would is
    left out, since on a flat or noisy curve it would only chase the first epochs' noise. The shape is
    chosen again once the transients are in. The second value (the shape family or None, and which breaks
    settle) says what was chosen.
    """
    base = _fixed_columns(x, breaks)
    tiny = x.size * rounding_tol(y) ** 2  # sums of squares at float32 rounding level count as 0
    design, shape = _select_shape(x, y, w, base, tiny, alpha)
    settles: dict[int, np.ndarray] = {}
    for m in breaks:
        column, pays = _settle_column(x, y, w, m, design, tiny, alpha)
        if pays:
            settles[m] = column
            design = np.column_stack([design, column])
    # the shape and the transients were each fitted with the other fixed: alternate a few rounds
    for _ in range(SETTLE_ROUNDS if settles else 0):
        design, shape = _select_shape(x, y, w, np.column_stack([base, *settles.values()]), tiny, alpha)
        shape_columns = design[:, base.shape[1] + len(settles):]
        for m in settles:
            others = [c for k, c in settles.items() if k != m]
            settles[m] = _settle_column(x, y, w, m, np.column_stack([base, *others, shape_columns]), tiny, alpha)[0]
    if settles:
        design, shape = _select_shape(x, y, w, np.column_stack([base, *settles.values()]), tiny, alpha)
    return design, (shape, tuple(m in settles for m in breaks))


def _select_shape(x: np.ndarray, y: np.ndarray, w: np.ndarray, fixed: np.ndarray, tiny: float,
                  alpha: float) -> tuple[np.ndarray, Callable | None]:
    """Fixed columns plus the shape column the F-tests keep (None: the line wins)."""
    sse = _projected_sse(fixed, y, w)
    fits = {shape: _best_shape(x, shape, grids, sse) for shape, grids in _shape_grids(x.size).items()}
    simple_shape = min((_exponential, _power), key=lambda shape: fits[shape][0])
    simple, general = fits[simple_shape], fits[_stretched_exp]
    n_eff, n_fixed = float(w.sum()), fixed.shape[1]
    line_sse = float(sse(np.zeros((1, x.size)))[0])
    if not _extra_parameters_pay(line_sse, simple[0], 2, n_eff - n_fixed - 2, tiny, alpha):
        return fixed, None
    if _extra_parameters_pay(simple[0], general[0], 1, n_eff - n_fixed - 3, tiny, alpha):
        return np.column_stack([fixed, general[1]]), _stretched_exp
    return np.column_stack([fixed, simple[1]]), simple_shape


def _settle_column(x: np.ndarray, y: np.ndarray, w: np.ndarray, m: int, design: np.ndarray, tiny: float,
                   alpha: float) -> tuple[np.ndarray, bool]:
    """``[x >= m] exp(-(x - m)/tau)`` at break m, and whether it pays (F-test, 2 parameters).

    An lr drop rarely lands in one epoch: the curve settles onto its new level over the next few
    (``tau`` in [``SETTLE_TAU_MIN``, the segment's length]); without this column the settling would be
    left in the residual and read as spikes right after every milestone.
    """
    sse = _projected_sse(design, y, w)

    def transient(x: np.ndarray, params: np.ndarray) -> np.ndarray:
        after = np.clip(x[None, :] - m, 0.0, None)
        return np.where(x[None, :] >= m, np.exp(-after / np.exp(params[:, :1])), 0.0)

    grid = [np.linspace(np.log(SETTLE_TAU_MIN), np.log(max(x.size - m, 2)), GUIDE_GRID[1])]
    fit_sse, column = _best_shape(x, transient, grid, sse)
    base = float(sse(np.zeros((1, x.size)))[0])
    return column, _extra_parameters_pay(base, fit_sse, 2, float(w.sum()) - design.shape[1] - 2, tiny, alpha)


def _extra_parameters_pay(sse_small: float, sse_big: float, extra: int, dof: float, tiny: float,
                          alpha: float = GUIDE_ALPHA) -> bool:
    """Nested-model F-test: do ``extra`` parameters cut the SSE by more than chance would at ``alpha``?"""
    gain = sse_small - sse_big
    if gain <= tiny or dof < 1.0:
        return False
    if sse_big <= tiny:
        return True  # the bigger model is exact and the smaller one is not
    return (gain / extra) / (sse_big / dof) > f_dist.ppf(1.0 - alpha, extra, dof)


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
