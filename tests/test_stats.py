"""Group statistics: known answers, agreement with scipy, and the suite's power and false-flag rate."""

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from ablate.config import ConfigError
from analysis.fluctuation import curve_metrics
from analysis.stats import (
    N_PERM_MC,
    RESULT_COLUMNS,
    DIFFERENCE,
    RATIO,
    bh_qvalues,
    cliffs_delta,
    compare_groups,
    min_seeds_for,
    p_floor,
    permutation_pvalue,
    shift_test,
)


def test_cliffs_delta_known_values():
    assert cliffs_delta([4, 5, 6], [1, 2, 3]) == 1.0
    assert cliffs_delta([1, 2, 3], [4, 5, 6]) == -1.0
    assert cliffs_delta([1, 2, 3], [1, 2, 3]) == 0.0
    assert cliffs_delta([1, 2], [2, 3]) == -0.75  # pairs: <, <, =, <
    assert cliffs_delta([1, np.nan], [0]) == 1.0
    assert math.isnan(cliffs_delta([], [1.0]))


def test_exact_permutation_p_for_complete_separation():
    assert permutation_pvalue([4, 5, 6], [1, 2, 3], two_sided=False) == pytest.approx(1 / 20)
    assert permutation_pvalue([1, 2, 3], [4, 5, 6], two_sided=False) == pytest.approx(1.0)
    assert permutation_pvalue([4, 5, 6], [1, 2, 3]) == pytest.approx(2 / 20)
    assert permutation_pvalue(np.arange(5) + 10.0, np.arange(5.0)) == pytest.approx(2 / 252)
    assert permutation_pvalue([1, 2, 3], [1, 2, 3]) == 1.0
    assert math.isnan(permutation_pvalue([1.0], [2.0, 3.0]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_permutation_p_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0.5, 1.0, 6), rng.normal(0.0, 1.0, 6)
    ref = scipy.stats.permutation_test(
        (a, b), lambda x, y, axis: x.mean(axis=axis) - y.mean(axis=axis),
        permutation_type="independent", n_resamples=np.inf, alternative="two-sided",
    )
    assert permutation_pvalue(a, b) == pytest.approx(ref.pvalue)


def test_monte_carlo_permutation_p_agrees_with_exact_and_respects_its_floor():
    rng = np.random.default_rng(7)
    a, b = rng.normal(0.8, 1.0, 8), rng.normal(0.0, 1.0, 8)
    exact = permutation_pvalue(a, b)
    monte_carlo = permutation_pvalue(a, b, max_exact=100, seed=3)
    assert monte_carlo == pytest.approx(exact, abs=0.01)
    separated = permutation_pvalue(np.arange(10) + 100.0, np.arange(10.0))  # C(20, 10) > 20000
    assert p_floor(10, 10) == pytest.approx(1 / (N_PERM_MC + 1))
    assert p_floor(10, 10) <= separated < 1e-3


def test_p_floor_and_min_seeds():
    assert p_floor(3, 3, two_sided=False) == pytest.approx(0.05)
    assert p_floor(3, 3) == pytest.approx(0.1)
    assert p_floor(2, 3) == pytest.approx(1 / 10)  # unequal arms: no mirrored split
    assert math.isnan(p_floor(1, 5))
    assert min_seeds_for(0.05, two_sided=True) == 4
    assert min_seeds_for(0.05, two_sided=False) == 3
    assert min_seeds_for(0.01) == 5
    with pytest.raises(ConfigError, match="alpha"):
        min_seeds_for(1.5)


def test_p_floor_is_attained():
    assert permutation_pvalue([10.0, 11.0, 12.0, 13.0], [0.0, 1.0, 2.0, 3.0]) == pytest.approx(p_floor(4, 4))
    assert permutation_pvalue([10.0, 11.0], [0.0, 1.0, 2.0]) == pytest.approx(p_floor(2, 3))


def test_bh_qvalues_known_and_matches_scipy():
    p = np.array([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(bh_qvalues(p), [0.02, 0.04, 0.04, 0.02])
    rng = np.random.default_rng(8)
    p = rng.uniform(size=30) ** 3
    np.testing.assert_allclose(bh_qvalues(p), scipy.stats.false_discovery_control(p))
    with_nan = bh_qvalues([0.01, np.nan, 0.04])
    assert math.isnan(with_nan[1])
    np.testing.assert_allclose(with_nan[[0, 2]], bh_qvalues([0.01, 0.04]))


def _geo_ratio_draws(rng, ratio, runs, draws, sd=0.4):
    """Lognormal arms (the shape of resid_sd across seeds): the variant's geometric mean is ``ratio`` x the baseline's."""
    return [(np.exp(rng.normal(np.log(ratio), sd, runs)), np.exp(rng.normal(0.0, sd, runs))) for _ in range(draws)]


def test_shift_test_estimate_is_the_ratio_of_geometric_means_and_difference_for_signed_metrics():
    c = shift_test([2.0, 8.0], [1.0, 4.0])
    assert c.statistic == RATIO and c.estimate == pytest.approx(2.0)  # sqrt(16) / sqrt(4)
    d = shift_test([0.0, 2.0, 4.0, 6.0], [-1.0, 1.0, 0.0, 2.0])
    assert d.statistic == DIFFERENCE and d.estimate == pytest.approx(2.5)
    assert math.isnan(shift_test([1.0, 2.0], [0.0, 1.0], log=True).estimate)


@pytest.mark.parametrize("runs", [4, 5, 8, 11])  # 11 + 11: Monte Carlo permutations
def test_ci_by_test_inversion_agrees_with_the_test(runs):
    """The CI excludes 1 exactly when p <= 0.05, and its ends are where the shifted test's p crosses 0.05."""
    rng = np.random.default_rng(runs)
    draws = _geo_ratio_draws(rng, 1.6, runs, 60 if runs < 11 else 8)
    for a, b in draws:
        c = shift_test(a, b, n_perm=2000)
        assert c.ci_low <= c.estimate <= c.ci_high
        assert (c.p_value <= 0.05) == (not c.ci_low <= 1.0 <= c.ci_high)
        la, lb = np.log(a), np.log(b)
        for end, outside in ((c.ci_low, -1.0), (c.ci_high, 1.0)):
            inside = np.log(end) - outside * 1e-6
            beyond = np.log(end) + outside * 1e-6
            assert shift_test(np.exp(la - inside), np.exp(lb), n_perm=2000).p_value > 0.05
            assert shift_test(np.exp(la - beyond), np.exp(lb), n_perm=2000).p_value <= 0.05


def test_too_few_runs_have_no_ci():
    """3 vs 3: the two-sided floor is 0.1, no shift is ever rejected, so an interval would be unbounded."""
    c = shift_test([5.0, 6.0, 7.0], [1.0, 1.1, 1.2])
    assert c.p_value == pytest.approx(0.1) and math.isnan(c.ci_low) and math.isnan(c.ci_high)
    assert np.isfinite(shift_test([5.0, 6.0, 7.0, 8.0], [1.0, 1.1, 1.2, 1.3]).ci_low)


def test_cliffs_delta_matches_pair_counts():
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 4, 7).astype(float), rng.integers(0, 4, 6).astype(float)
    assert cliffs_delta(a, b) == pytest.approx(np.sign(a[:, None] - b[None, :]).mean())


def _frame():
    rng = np.random.default_rng(9)
    return pd.DataFrame({
        "variant": ["base"] * 4 + ["big"] * 4 + ["solo"],
        "seed": list(range(4)) * 2 + [0],
        "run_id": [f"r{i}" for i in range(9)],
        "m1": np.r_[rng.normal(1.0, 0.1, 4), rng.normal(2.0, 0.1, 4), 1.5],
        "m2": np.r_[rng.normal(5.0, 1.0, 8), 5.0],
    })


def test_compare_groups_table():
    table = compare_groups(_frame(), baseline="base", primary="m1")
    assert tuple(table.columns) == RESULT_COLUMNS
    assert list(zip(table["metric"], table["variant"])) == [
        ("m1", "big"), ("m1", "solo"), ("m2", "big"), ("m2", "solo")]  # "seed" is not a metric
    big = table.iloc[0]
    assert big["n_variant"] == 4 and big["n_baseline"] == 4 and big["family"] == "primary"
    assert big["p_value"] == pytest.approx(2 / 70) and big["cliffs_delta"] == 1.0
    assert big["ci_low"] <= big["ratio"] <= big["ci_high"] and big["ci_low"] > 1.0
    solo = table.iloc[1]
    assert solo["ratio"] > 0
    assert all(math.isnan(solo[c]) for c in ("ci_low", "ci_high", "p_value", "q_value"))


def test_bh_family_is_the_primary_metric_only():
    """Many exploratory rows must not dilute the primary q, and exploratory rows are corrected among themselves."""
    frame = _frame()
    for i in range(20):
        frame[f"x{i}"] = np.random.default_rng(i).normal(1.0, 0.1, len(frame))
    table = compare_groups(frame, baseline="base", primary="m1")
    primary = table[table["family"] == "primary"]
    assert list(primary["metric"].unique()) == ["m1"]
    np.testing.assert_allclose(primary["q_value"], bh_qvalues(primary["p_value"]))
    assert primary["q_value"].iloc[0] == pytest.approx(2 / 70)  # one tested row in the family: q = p
    rest = table[table["family"] == "exploratory"]
    np.testing.assert_allclose(rest["q_value"], bh_qvalues(rest["p_value"]))
    with pytest.raises(ConfigError, match="primary='m9'"):
        compare_groups(frame, baseline="base", primary="m9")


def test_compare_groups_bad_input():
    frame = _frame()
    with pytest.raises(ConfigError, match="baseline='nope'"):
        compare_groups(frame, baseline="nope")
    with pytest.raises(ConfigError, match="variant_col"):
        compare_groups(frame, baseline="base", variant_col="arm")
    with pytest.raises(ConfigError, match="metrics_cols"):
        compare_groups(frame, baseline="base", metrics_cols=["m3"])


def _val_loss_noise_sd(rng, noise_sd, runs, epochs=60):
    """resid_sd of synthetic val-loss curves: smooth decay plus Gaussian noise."""
    t = np.arange(epochs)
    trend = 0.4 + 2.0 * np.exp(-t / 15.0)
    curves = trend + rng.normal(0.0, noise_sd, (runs, epochs))
    return [curve_metrics(curve)["resid_sd"] for curve in curves]


@pytest.mark.slow  # about a minute: 3000 curve fits
def test_suite_flags_noisier_variant_and_not_an_identical_one():
    """5 vs 5 runs, 200 draws: noise sd 1.5*s is flagged >= 80%, the same generator <= 5%."""
    rng = np.random.default_rng(2024)
    s, runs, draws = 0.05, 5, 200
    flagged = {"noisy": 0, "same": 0}
    for _ in range(draws):
        frame = pd.DataFrame({
            "variant": ["base"] * runs + ["noisy"] * runs + ["same"] * runs,
            "val_loss.resid_sd": _val_loss_noise_sd(rng, s, runs)
            + _val_loss_noise_sd(rng, 1.5 * s, runs) + _val_loss_noise_sd(rng, s, runs),
        })
        table = compare_groups(frame, baseline="base").set_index("variant")
        for variant in flagged:
            row = table.loc[variant]
            flagged[variant] += bool(row["p_value"] < 0.05 and row["ratio"] > 1.0)
    assert flagged["noisy"] / draws >= 0.80
    assert flagged["same"] / draws <= 0.05


def test_shift_test_operating_characteristics_on_lognormal_arms():
    """5 vs 5 lognormal runs, 400 draws: <= 5% false positives under the null (+ binomial slack), CI coverage ~95%."""
    rng = np.random.default_rng(5)
    null = [shift_test(a, b) for a, b in _geo_ratio_draws(rng, 1.0, 5, 400)]
    assert np.mean([c.p_value <= 0.05 for c in null]) <= 0.07
    effect = [shift_test(a, b) for a, b in _geo_ratio_draws(rng, 1.5, 5, 400)]
    coverage = np.mean([c.ci_low <= 1.5 <= c.ci_high for c in effect])
    assert 0.92 <= coverage <= 0.98
    assert np.mean([c.p_value <= 0.05 for c in effect]) > np.mean([c.p_value <= 0.05 for c in null]) + 0.1
