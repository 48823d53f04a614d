"""Group comparisons of per-run metrics: effect sizes with intervals and p-values that hold up.

The run (one seed) is the unit: each arm is the set of runs of one variant, and nothing is
pooled across epochs or examples. For each metric and each variant against the baseline:

- ``ratio``: median(variant) / median(baseline). NaN when the baseline median is 0 (the ratio is
  undefined, and a near-zero baseline would make any ratio meaningless). Read it only for
  metrics that are positive by construction (resid_sd, excess_tv, ...); for signed metrics
  (lag1_autocorr, gen_gap_final) use ``cliffs_delta``.
- ``ci_low``/``ci_high``: percentile bootstrap 95% interval of the ratio, resampling runs with
  replacement within each arm (``n_boot`` resamples, fixed seed). NaN when some resample has a
  baseline median of 0 (the ratio is unbounded there, so no finite interval is honest).
- ``cliffs_delta``: P(variant > baseline) - P(variant < baseline) over all run pairs.
- ``p_value``: two-sided permutation test of the difference of means (variant - baseline).
  The mean difference is used rather than the median difference because with 3-5 runs per arm
  the median's permutation distribution has few distinct values and loses power, while the
  test is exact for either statistic. p = #{splits with |T| >= |T_obs|} / #splits, over all
  C(n1+n2, n1) splits when that is <= ``MAX_EXACT_SPLITS`` (20000); otherwise ``N_PERM_MC``
  random permutations with p = (1 + #{|T*| >= |T_obs|}) / (N_PERM_MC + 1), which is never 0
  and stays valid (Phipson & Smyth 2010).
- ``q_value``: Benjamini-Hochberg over every (metric, variant) row with a p-value.

An arm with fewer than 2 runs gets its ratio but NaN ci/p/q: no p-value it cannot support.
The smallest attainable p is ``p_floor(n1, n2)``: with 3 runs per arm the one-sided floor is
1/20 = 0.05 and the two-sided floor 0.1, so 3 seeds can never reach p < 0.05;
``min_seeds_for()`` gives the seeds per arm a test needs. Significance means p <= alpha.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import combinations
from math import comb

import numpy as np
import pandas as pd

from ablate.errors import ConfigError

MAX_EXACT_SPLITS = 20000
N_PERM_MC = 10000
CI_LEVEL = 0.95
#: numeric columns that identify a run rather than measure it; skipped when metrics_cols is None
NON_METRIC_COLUMNS = frozenset({"seed", "epoch", "step", "trial", "trial_number"})
RESULT_COLUMNS = (
    "metric", "variant", "baseline", "ratio", "ci_low", "ci_high",
    "cliffs_delta", "p_value", "q_value", "n_variant", "n_baseline",
)


def cliffs_delta(a, b) -> float:
    """P(a > b) - P(a < b) over all pairs; +1 when every a exceeds every b. NaN if either is empty."""
    a, b = _clean(a), _clean(b)
    if a.size == 0 or b.size == 0:
        return float("nan")
    sign = np.sign(a[:, None] - b[None, :])
    return float(sign.mean())


def permutation_pvalue(a, b, two_sided: bool = True, n_perm: int = N_PERM_MC,
                       max_exact: int = MAX_EXACT_SPLITS, seed: int = 0) -> float:
    """Permutation p-value of mean(a) - mean(b); exact when C(n1+n2, n1) <= max_exact.

    One-sided tests the alternative mean(a) > mean(b). NaN when an arm has fewer than 2 values.
    """
    a, b = _clean(a), _clean(b)
    if a.size < 2 or b.size < 2:
        return float("nan")
    pooled = np.concatenate([a, b])
    t_perm = _permuted_stats(pooled, a.size, n_perm, max_exact, seed)
    t_obs = a.mean() - b.mean()
    # splits whose statistic equals the observed one up to float rounding count as "as extreme"
    tol = 1e-9 * max(np.abs(pooled).max(), np.finfo(np.float64).tiny)
    if two_sided:
        hits = np.count_nonzero(np.abs(t_perm) >= abs(t_obs) - tol)
    else:
        hits = np.count_nonzero(t_perm >= t_obs - tol)
    if comb(pooled.size, a.size) <= max_exact:
        return float(hits / t_perm.size)
    return float((hits + 1) / (t_perm.size + 1))


def p_floor(n1: int, n2: int, two_sided: bool = True) -> float:
    """Smallest p-value ``permutation_pvalue`` can return for arms of n1 and n2 runs.

    Exact: 1/C(n1+n2, n1) one-sided; two-sided doubles it only when n1 == n2 (then the
    mirrored split reaches the same |T|). Monte Carlo: 1/(N_PERM_MC + 1). NaN when an arm has
    fewer than 2 runs (no test is run).
    """
    if n1 < 2 or n2 < 2:
        return float("nan")
    splits = comb(n1 + n2, n1)
    if splits > MAX_EXACT_SPLITS:
        return 1.0 / (N_PERM_MC + 1)
    return (2.0 if two_sided and n1 == n2 else 1.0) / splits


def min_seeds_for(alpha: float = 0.05, two_sided: bool = True) -> int:
    """Smallest runs per arm (equal arms) whose exact permutation p floor is <= alpha."""
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha={alpha!r} is not valid; accepted: a number strictly between 0 and 1")
    n = 2
    while p_floor(n, n, two_sided) > alpha:
        n += 1
    return n


def bh_qvalues(p) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values; NaN entries stay NaN and do not count in m."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if not ok.any():
        return q
    vals = p[ok]
    order = np.argsort(vals)
    ranked = vals[order] * vals.size / np.arange(1, vals.size + 1)
    # running minimum from the largest p down keeps q monotone in p
    adjusted = np.minimum(np.minimum.accumulate(ranked[::-1])[::-1], 1.0)
    out = np.empty_like(vals)
    out[order] = adjusted
    q[ok] = out
    return q


def bootstrap_ratio_ci(a, b, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """median(a)/median(b) with a percentile bootstrap CI (runs resampled within each arm)."""
    a, b = _clean(a), _clean(b)
    if a.size == 0 or b.size == 0:
        return float("nan"), float("nan"), float("nan")
    ratio = _ratio(np.median(a), np.median(b))
    if a.size < 2 or b.size < 2 or np.isnan(ratio):
        return ratio, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boot_a = np.median(a[rng.integers(0, a.size, (n_boot, a.size))], axis=1)
    boot_b = np.median(b[rng.integers(0, b.size, (n_boot, b.size))], axis=1)
    if np.any(boot_b == 0.0):
        return ratio, float("nan"), float("nan")
    tail = 100.0 * (1.0 - CI_LEVEL) / 2.0
    lo, hi = np.percentile(boot_a / boot_b, [tail, 100.0 - tail])
    return ratio, float(lo), float(hi)


def compare_groups(metrics: pd.DataFrame, baseline: str, variant_col: str = "variant",
                   metrics_cols: list[str] | None = None, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per (metric, variant != baseline): ratio + CI, Cliff's delta, p, BH q, arm sizes."""
    cols = _metric_columns(metrics, baseline, variant_col, metrics_cols)
    variants = [v for v in pd.unique(metrics[variant_col]) if v != baseline]
    base_rows = metrics[metrics[variant_col] == baseline]
    rows = []
    for i, metric in enumerate(cols):
        b = _clean(base_rows[metric])
        for j, variant in enumerate(variants):
            a = _clean(metrics.loc[metrics[variant_col] == variant, metric])
            ratio, lo, hi = bootstrap_ratio_ci(a, b, n_boot, seed + i * len(variants) + j)
            rows.append({
                "metric": metric, "variant": variant, "baseline": baseline,
                "ratio": ratio, "ci_low": lo, "ci_high": hi,
                "cliffs_delta": cliffs_delta(a, b), "p_value": permutation_pvalue(a, b, seed=seed),
                "n_variant": a.size, "n_baseline": b.size,
            })
    table = pd.DataFrame(rows, columns=[c for c in RESULT_COLUMNS if c != "q_value"])
    table.insert(RESULT_COLUMNS.index("q_value"), "q_value", bh_qvalues(table["p_value"].to_numpy(dtype=float)))
    return table


def _metric_columns(metrics: pd.DataFrame, baseline, variant_col: str, metrics_cols) -> list[str]:
    if variant_col not in metrics.columns:
        raise ConfigError(f"variant_col={variant_col!r} is not a column; accepted: {', '.join(map(str, metrics.columns))}")
    present = list(pd.unique(metrics[variant_col]))
    if baseline not in present:
        raise ConfigError(f"baseline={baseline!r} is not a value of {variant_col!r}; accepted: {', '.join(map(str, present))}")
    if metrics_cols is None:
        numeric = metrics.select_dtypes("number").columns
        return [c for c in numeric if c != variant_col and c not in NON_METRIC_COLUMNS]
    missing = [c for c in metrics_cols if c not in metrics.columns]
    if missing:
        raise ConfigError(f"metrics_cols={missing!r} are not columns; accepted: {', '.join(map(str, metrics.columns))}")
    return list(metrics_cols)


def _clean(x) -> np.ndarray:
    """Float array without NaN: a run with no value for a metric is not a run of that arm."""
    arr = np.asarray(x, dtype=np.float64).ravel()
    return arr[~np.isnan(arr)]


def _ratio(num: float, den: float) -> float:
    return float("nan") if den == 0.0 else float(num / den)


def _permuted_stats(pooled: np.ndarray, n1: int, n_perm: int, max_exact: int, seed: int) -> np.ndarray:
    """Mean difference for every split (exact) or for n_perm random permutations."""
    n = pooled.size
    total = pooled.sum()
    if comb(n, n1) <= max_exact:
        sums = pooled[_splits(n, n1)].sum(axis=1)
    else:
        rng = np.random.default_rng(seed)
        sums = np.concatenate([
            rng.permuted(np.broadcast_to(pooled, (size, n)), axis=1)[:, :n1].sum(axis=1)
            for size in _chunks(n_perm, 1000)
        ])
    return sums / n1 - (total - sums) / (n - n1)


@lru_cache(maxsize=32)
def _splits(n: int, n1: int) -> np.ndarray:
    return np.array(list(combinations(range(n), n1)), dtype=np.intp)


def _chunks(total: int, size: int) -> list[int]:
    return [size] * (total // size) + ([total % size] if total % size else [])
