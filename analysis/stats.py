"""Group comparisons of per-run metrics: one pre-declared statistic, its test and its interval.

The run (one seed) is the unit: each arm is the set of runs of one variant, and nothing is
pooled across epochs or examples. For each metric and each variant against the baseline:

- ``statistic``/``estimate``: for a metric whose runs are all > 0 in both arms (resid_sd,
  excess_tv when no run is monotone, ...) the **ratio of geometric means**
  exp(mean log a - mean log b), also given as ``ratio``; for a metric that takes 0 or negative
  values (spike_count, lag1_autocorr, gen_gap_final) the **difference of means**, ``ratio`` NaN.
  Both are a difference of means on a scale (log or raw), so one test and one interval serve both.
- ``p_value``: two-sided permutation test of that difference of means (on the log scale for a
  ratio): p = #{splits with |T| >= |T_obs|} / #splits over all C(n1+n2, n1) splits when that is
  <= ``MAX_EXACT_SPLITS`` (20000); otherwise ``N_PERM_MC`` random permutations with
  p = (1 + #{|T*| >= |T_obs|}) / (N_PERM_MC + 1), never 0 (Phipson & Smyth 2010).
- ``ci_low``/``ci_high``: 95% interval by inverting that same test: the set of shifts delta for
  which the test of "a - delta and b are exchangeable" is not rejected at 5% (on the log scale,
  then exponentiated). So the interval excludes 1 (or 0) exactly when p <= 0.05: the CI and the
  test are about the same statistic and cannot disagree. With fewer than ``min_seeds_for(0.05)``
  runs in an arm no split is extreme enough, the inverted interval is unbounded, and it is NaN.
- ``cliffs_delta``: P(variant > baseline) - P(variant < baseline) over all run pairs
  (from scipy's Mann-Whitney U: 2U / (n1 n2) - 1).
- ``family``/``q_value``: Benjamini-Hochberg (``scipy.stats.false_discovery_control``) within a
  family: ``primary`` is the pre-declared question, every variant against the baseline on the
  primary metric; ``exploratory`` is every other (metric, variant) row, corrected on its own.

An arm with fewer than 2 runs gets its estimate but NaN ci/p/q: no p-value it cannot support.
The smallest attainable p is ``p_floor(n1, n2)``: with 3 runs per arm the one-sided floor is
1/20 = 0.05 and the two-sided floor 0.1, so 3 seeds can never reach p < 0.05;
``min_seeds_for()`` gives the seeds per arm a test needs. Significance means q <= alpha.

Why the permutation code is ours and not ``scipy.stats.permutation_test``: the interval needs the
p-value at every shift delta. Each split's statistic is linear in delta, so one pass over the
splits gives the whole interval (``_inverted_interval``); scipy would need a new permutation run per
delta. Measured (benchmarks/stats_oc.py, 2-core CPU; the table in benchmarks/README.md): 5 + 5 runs,
``shift_test`` p and CI 0.16 ms against 2.7 ms for scipy's p-value alone; 11 + 11 runs (10000
permutations) 6.1 ms against 42 ms.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import combinations
from math import comb
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control, mannwhitneyu

from ablate.errors import ConfigError

MAX_EXACT_SPLITS = 20000
N_PERM_MC = 10000
CI_LEVEL = 0.95
RATIO = "ratio of geometric means"
DIFFERENCE = "difference of means"
PRIMARY_FAMILY, EXPLORATORY_FAMILY = "primary", "exploratory"
#: numeric columns that identify a run rather than measure it; skipped when metrics_cols is None
NON_METRIC_COLUMNS = frozenset({"seed", "epoch", "step", "trial", "trial_number"})
RESULT_COLUMNS = (
    "metric", "variant", "baseline", "family", "statistic", "estimate", "ratio", "ci_low", "ci_high",
    "cliffs_delta", "p_value", "q_value", "n_variant", "n_baseline",
)


class Comparison(NamedTuple):
    """One arm against another: the statistic, its estimate, its inverted-test CI and the test's p."""

    statistic: str
    estimate: float
    ci_low: float
    ci_high: float
    p_value: float


def cliffs_delta(a, b) -> float:
    """P(a > b) - P(a < b) over all pairs; +1 when every a exceeds every b. NaN if either is empty."""
    a, b = _clean(a), _clean(b)
    if a.size == 0 or b.size == 0:
        return float("nan")
    u = mannwhitneyu(a, b, method="asymptotic").statistic  # pairs a > b, ties counted 1/2
    return float(2.0 * u / (a.size * b.size) - 1.0)


def permutation_pvalue(a, b, two_sided: bool = True, n_perm: int = N_PERM_MC,
                       max_exact: int = MAX_EXACT_SPLITS, seed: int = 0) -> float:
    """Permutation p-value of mean(a) - mean(b); exact when C(n1+n2, n1) <= max_exact.

    One-sided tests the alternative mean(a) > mean(b). NaN when an arm has fewer than 2 values.
    """
    a, b = _clean(a), _clean(b)
    if a.size < 2 or b.size < 2:
        return float("nan")
    splits = _split_table(a, b, n_perm, max_exact, seed)
    return splits.pvalue(0.0, two_sided)


def shift_test(a, b, log: bool | None = None, alpha: float = 1.0 - CI_LEVEL, n_perm: int = N_PERM_MC,
               max_exact: int = MAX_EXACT_SPLITS, seed: int = 0) -> Comparison:
    """The report's comparison of a against b: estimate, CI by test inversion, two-sided permutation p.

    ``log`` None picks the ratio of geometric means when every value is > 0, else the difference of
    means; True forces the ratio (NaN if some value is <= 0). The CI is NaN when an arm has fewer than
    2 runs or when the test cannot reject at ``alpha`` at any shift (too few runs: the interval is unbounded).
    """
    a, b = _clean(a), _clean(b)
    if log is None:
        log = bool(a.size and b.size and (a > 0).all() and (b > 0).all())
    statistic = RATIO if log else DIFFERENCE
    nan = float("nan")
    if a.size == 0 or b.size == 0 or (log and ((a <= 0).any() or (b <= 0).any())):
        return Comparison(statistic, nan, nan, nan, nan)
    if log:
        a, b = np.log(a), np.log(b)
    back = np.exp if log else (lambda v: v)
    delta = float(a.mean() - b.mean())
    if a.size < 2 or b.size < 2:
        return Comparison(statistic, float(back(delta)), nan, nan, nan)
    splits = _split_table(a, b, n_perm, max_exact, seed)
    low, high = splits.interval(alpha)
    return Comparison(statistic, float(back(delta)), float(back(low)), float(back(high)), splits.pvalue(0.0))


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
    """Benjamini-Hochberg adjusted p-values (scipy's ``false_discovery_control``); NaN stays NaN, not counted in m."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        q[ok] = false_discovery_control(p[ok], method="bh")
    return q


def compare_groups(metrics: pd.DataFrame, baseline: str, variant_col: str = "variant",
                   metrics_cols: list[str] | None = None, primary: str | None = None, seed: int = 0) -> pd.DataFrame:
    """One row per (metric, variant != baseline): ``RESULT_COLUMNS``; BH within the primary and the exploratory family.

    ``primary`` is the pre-declared metric (its rows form the primary family); None: every row is exploratory.
    """
    cols = _metric_columns(metrics, baseline, variant_col, metrics_cols)
    if primary is not None and primary not in cols:
        raise ConfigError(f"primary={primary!r} is not a compared metric; accepted: {', '.join(cols)}")
    variants = [v for v in pd.unique(metrics[variant_col]) if v != baseline]
    base_rows = metrics[metrics[variant_col] == baseline]
    rows = []
    for metric in cols:
        b = _clean(base_rows[metric])
        for variant in variants:
            a = _clean(metrics.loc[metrics[variant_col] == variant, metric])
            c = shift_test(a, b, seed=seed)
            rows.append({
                "metric": metric, "variant": variant, "baseline": baseline,
                "family": PRIMARY_FAMILY if metric == primary else EXPLORATORY_FAMILY,
                "statistic": c.statistic, "estimate": c.estimate,
                "ratio": c.estimate if c.statistic == RATIO else float("nan"),
                "ci_low": c.ci_low, "ci_high": c.ci_high,
                "cliffs_delta": cliffs_delta(a, b), "p_value": c.p_value,
                "n_variant": a.size, "n_baseline": b.size,
            })
    table = pd.DataFrame(rows, columns=[c for c in RESULT_COLUMNS if c != "q_value"])
    q = np.full(len(table), np.nan)
    for family in (PRIMARY_FAMILY, EXPLORATORY_FAMILY):
        mask = (table["family"] == family).to_numpy()
        q[mask] = bh_qvalues(table.loc[mask, "p_value"].to_numpy(dtype=float))
    table.insert(RESULT_COLUMNS.index("q_value"), "q_value", q)
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


class _Splits(NamedTuple):
    """Every split's statistic as a line in the shift delta: T_S(delta) = t0_S - delta c_S.

    Shifting arm a by delta moves a split's mean difference by delta (k/n1 - (n1 - k)/n2), k the
    number of a's runs the split puts first; the observed split has c = 1 and t0 = the observed difference.
    """

    t0: np.ndarray
    c: np.ndarray
    observed: float
    exact: bool
    tol: float

    def _count_denominator(self) -> tuple[int, int]:
        n = self.t0.size
        return (0, n) if self.exact else (1, n + 1)

    def pvalue(self, delta: float, two_sided: bool = True) -> float:
        t = self.t0 - delta * self.c
        obs = self.observed - delta
        hits = (np.count_nonzero(np.abs(t) >= abs(obs) - self.tol) if two_sided
                else np.count_nonzero(t >= obs - self.tol))
        extra, denom = self._count_denominator()
        return float((hits + extra) / denom)

    def interval(self, alpha: float) -> tuple[float, float]:
        """Shifts whose two-sided test is not rejected at ``alpha``: [low, high] (NaN when unbounded).

        On each side of the observed difference, with u = |delta - observed|, a split counts as extreme
        while |a_S -/+ u c_S| >= u, a_S = t0_S - observed c_S; with |c_S| < 1 that holds exactly for
        u <= |a_S| / (1 +/- sign(a_S) c_S), so p falls monotonically with u and each end is an order statistic.
        Splits with |c_S| = 1 (the observed one and, for equal arms, its mirror) count at every shift.
        """
        extra, denom = self._count_denominator()
        need = int(np.floor(alpha * denom - extra)) + 1  # splits that must count for p > alpha
        a = self.t0 - self.observed * self.c
        always = np.abs(np.abs(self.c) - 1.0) < 1e-12
        ends = []
        for side in (1.0, -1.0):  # delta above the observed difference, then below
            with np.errstate(divide="ignore", invalid="ignore"):
                reach = np.abs(a) / (1.0 + side * np.sign(a) * self.c)
            reach = np.where(always, np.inf, reach)
            if need > reach.size:
                return float("nan"), float("nan")
            u = np.sort(reach)[::-1][need - 1]
            if not np.isfinite(u):
                return float("nan"), float("nan")
            ends.append(self.observed + side * u)
        return ends[1], ends[0]


def _split_table(a: np.ndarray, b: np.ndarray, n_perm: int, max_exact: int, seed: int) -> _Splits:
    """Every split (exact, when C(n1+n2, n1) <= max_exact) or ``n_perm`` random permutations, as lines in delta."""
    n1, n = a.size, a.size + b.size
    pooled = np.concatenate([a, b])
    exact = comb(n, n1) <= max_exact
    if exact:
        first = _splits(n, n1)
    else:
        rng = np.random.default_rng(seed)
        first = np.concatenate([rng.permuted(np.broadcast_to(np.arange(n), (size, n)), axis=1)[:, :n1]
                                for size in _chunks(n_perm, 1000)])
    sums = pooled[first].sum(axis=1)
    t0 = sums / n1 - (pooled.sum() - sums) / (n - n1)
    k = (first < n1).sum(axis=1)
    c = k / n1 - (n1 - k) / (n - n1)
    # splits whose statistic equals the observed one up to float rounding count as "as extreme"
    tol = 1e-9 * max(np.abs(pooled).max(), np.finfo(np.float64).tiny)
    return _Splits(t0, c, float(a.mean() - b.mean()), exact, tol)


@lru_cache(maxsize=32)
def _splits(n: int, n1: int) -> np.ndarray:
    return np.array(list(combinations(range(n), n1)), dtype=np.intp)


def _chunks(total: int, size: int) -> list[int]:
    return [size] * (total // size) + ([total % size] if total % size else [])
