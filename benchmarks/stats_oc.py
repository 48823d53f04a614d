"""Operating characteristics of the report's primary comparison, on synthetic studies with a known answer.

Each draw is a study shaped like the demo (``ablate study --space sru_cru_order``): a baseline and a
variant with ``--seeds`` runs each over ``--epochs`` epochs. A run's val loss has the shape measured on
the digits with noisy labels (8 real runs, 25 epochs): a fall from up to about 11 to about 1.9 over the
first epochs, then a slow rise of 0.03-0.06 per epoch as the network fits the noisy labels, plus white
noise. Each run's noise SD is the arm's level times a seed-to-seed lognormal factor (SD 0.2 in log
units), so arms vary the way seeds do. The report's own code does the rest: settle epochs, the shared
window (``analysis.fluctuation.window_start``), ``val_loss.resid_sd`` per run and
``analysis.stats.shift_test`` (ratio of geometric means, permutation test, inverted CI).

Printed, per true noise ratio (1.0: the null; the others: a real effect):
- ``reject``: share of draws with p <= 0.05 (the false-positive rate under the null, the power otherwise);
- ``coverage``: share of draws whose 95% CI contains the true ratio (``no CI``: draws without one);
- ``median CI width``: ci_high / ci_low, the factor the interval spans;
- the window start chosen (median and range over draws).
Then the time of one comparison by ``shift_test`` (p-value and CI) against scipy.stats.permutation_test
(p-value only), which is why the permutation code in analysis/stats.py is its own.

    python benchmarks/stats_oc.py [--draws 300] [--seeds 5] [--epochs 25] [--ratios 1.0 1.5 2.0] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import fluctuation, stats  # noqa: E402

BASE_NOISE = 0.15  #: val-loss noise SD of the baseline arm (real runs' resid_sd: about 0.14)
SEED_SPREAD = 0.2  #: SD of log(noise SD) across seeds of one arm


def demo_like_curve(rng: np.random.Generator, epochs: int, noise_sd: float) -> np.ndarray:
    """The demo's val loss: a fast fall over the first epochs, then a slow rise (the net fits the noisy labels)."""
    e = np.arange(epochs, dtype=float)
    fall = rng.uniform(0.3, 9.0) * np.exp(-e / rng.uniform(0.8, 1.5))  # epoch 0 up to about 11, as measured
    rise = rng.uniform(0.03, 0.06) * np.clip(e - 4.0, 0.0, None)
    return 1.9 + fall + rise + rng.normal(0.0, noise_sd, epochs)


def one_draw(rng: np.random.Generator, ratio: float, seeds: int, epochs: int) -> tuple[stats.Comparison, int]:
    """One synthetic study: the comparison of the variant's resid_sd against the baseline's, and the window start."""
    curves = {arm: [demo_like_curve(rng, epochs, level * np.exp(rng.normal(0.0, SEED_SPREAD))) for _ in range(seeds)]
              for arm, level in (("baseline", BASE_NOISE), ("variant", BASE_NOISE * ratio))}
    frames = {arm: [pd.DataFrame({"epoch": np.arange(epochs), "val_loss": y}) for y in ys] for arm, ys in curves.items()}
    settles = [fluctuation.settle_epoch(f) for fs in frames.values() for f in fs]
    start = fluctuation.window_start(settles, epochs - 1)
    sd = {arm: [fluctuation.run_metrics(f, from_epoch=start)["val_loss.resid_sd"] for f in fs]
          for arm, fs in frames.items()}
    return stats.shift_test(sd["variant"], sd["baseline"]), start


def operating_characteristics(ratios, draws: int, seeds: int, epochs: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for ratio in ratios:
        results = [one_draw(rng, ratio, seeds, epochs) for _ in range(draws)]
        comps = [c for c, _ in results]
        starts = np.array([s for _, s in results])
        p = np.array([c.p_value for c in comps])
        lo, hi = np.array([c.ci_low for c in comps]), np.array([c.ci_high for c in comps])
        has_ci = np.isfinite(lo) & np.isfinite(hi)
        covered = has_ci & (lo <= ratio) & (ratio <= hi)
        rows.append({
            "true ratio": ratio, "draws": draws, "seeds/arm": seeds,
            "reject (p<=0.05)": float(np.mean(p <= 0.05)),
            "coverage": float(covered.sum() / has_ci.sum()) if has_ci.any() else float("nan"),
            "no CI": int((~has_ci).sum()),
            "median CI width": float(np.median(hi[has_ci] / lo[has_ci])) if has_ci.any() else float("nan"),
            "median estimate": float(np.median([c.estimate for c in comps])),
            "window start": f"{int(np.median(starts))} ({starts.min()}-{starts.max()})",
        })
    return pd.DataFrame(rows)


def timing(seeds: int, repeats: int = 20) -> pd.DataFrame:
    """Seconds per comparison: shift_test (p and CI) vs scipy.stats.permutation_test (p only), same data."""
    from scipy.stats import permutation_test

    rng = np.random.default_rng(1)
    rows = []
    for n in (seeds, 11):  # 11 + 11 runs: C(22, 11) > 20000 splits, so both sides use 10000 random permutations
        x, y = np.exp(rng.normal(0.4, 0.3, n)), np.exp(rng.normal(0.0, 0.3, n))
        t0 = time.perf_counter()
        for _ in range(repeats):
            ours = stats.shift_test(x, y)
        t_ours = (time.perf_counter() - t0) / repeats
        t0 = time.perf_counter()
        for _ in range(repeats):
            ref = permutation_test((np.log(x), np.log(y)), lambda u, v, axis: u.mean(axis=axis) - v.mean(axis=axis),
                                   permutation_type="independent", n_resamples=stats.N_PERM_MC, vectorized=True,
                                   alternative="two-sided", random_state=0)
        t_scipy = (time.perf_counter() - t0) / repeats
        rows.append({"runs/arm": n, "shift_test p+CI (ms)": 1e3 * t_ours, "scipy p only (ms)": 1e3 * t_scipy,
                     "p ours": ours.p_value, "p scipy": ref.pvalue})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    parser.add_argument("--seed", type=int, default=0, help="random seed (another seed: independent draws)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    table = operating_characteristics(args.ratios, args.draws, args.seeds, args.epochs, args.seed)
    print(f"primary comparison (val_loss.resid_sd), {args.seeds} seeds per arm, {args.epochs} epochs, "
          f"{args.draws} draws per row ({time.perf_counter() - t0:.0f} s):")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print()
    print("time per comparison:")
    print(timing(args.seeds).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
