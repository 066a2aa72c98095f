"""Seed statistics against scipy's t-tests (the independent reference) and printed t-table values."""

import math

import numpy as np
import pytest

from scm.seedstats import format_interval, mean_interval, paired_difference, t_quantile

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize(("dof", "table"), [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)])
def test_t_quantile_matches_the_printed_table(dof, table):
    # two-sided 95% critical values from any t table (3 decimals)
    assert t_quantile(0.975, dof) == pytest.approx(table, abs=6e-4)
    assert t_quantile(0.975, dof + 0.37) == pytest.approx(scipy_stats.t.ppf(0.975, dof + 0.37), rel=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_paired_difference_is_scipys_ttest_rel(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 8))
    base = rng.normal(10, 2, n)
    treat = base + rng.normal(rng.choice([0.0, 1.5]), 0.8, n)  # some with an effect, some without
    d = paired_difference(dict(enumerate(treat)), dict(enumerate(base)))
    ref = scipy_stats.ttest_rel(treat, base)
    ci = ref.confidence_interval(0.95)
    assert d["paired"] and d["n"] == n
    assert d["diff"] == pytest.approx(float(np.mean(treat - base)), rel=1e-12)
    assert d["p"] == pytest.approx(ref.pvalue, rel=1e-8)
    assert (d["lo"], d["hi"]) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert d["significant"] == (ref.pvalue < 0.05)


@pytest.mark.parametrize("seed", range(4))
def test_unpaired_difference_is_scipys_welch_test(seed):
    rng = np.random.default_rng(100 + seed)
    a, b = rng.normal(5, 1, 4), rng.normal(5 + seed, 3, 5)
    # seeds that do not pair up (disjoint ids): Welch's t-test
    d = paired_difference({i: v for i, v in enumerate(a)}, {10 + i: v for i, v in enumerate(b)})
    ref = scipy_stats.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert not d["paired"]
    assert d["p"] == pytest.approx(ref.pvalue, rel=1e-8)
    assert (d["lo"], d["hi"]) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_mean_interval_is_scipys_t_interval():
    x = [31.0, 24.5, 40.2]
    m = mean_interval(x, level=0.9)
    lo, hi = scipy_stats.t.interval(0.9, len(x) - 1, loc=np.mean(x), scale=scipy_stats.sem(x))
    assert (m["lo"], m["hi"]) == pytest.approx((lo, hi), rel=1e-9)
    assert m["sd"] == pytest.approx(np.std(x, ddof=1))


def test_effect_inside_and_outside_the_noise():
    base = {0: 30.0, 1: 22.0, 2: 38.0}
    # +10 on every seed, whatever the seed's own level: far outside the paired noise
    shifted = paired_difference({s: v + 10 + 0.1 * s for s, v in base.items()}, base)
    assert shifted["significant"] and shifted["lo"] > 0
    # a difference smaller than the seeds' disagreement
    noisy = paired_difference({0: 33.0, 1: 19.0, 2: 39.0}, base)
    assert not noisy["significant"] and noisy["lo"] < 0 < noisy["hi"]


def test_too_few_seeds_and_non_finite_values():
    d = paired_difference({0: 1.0}, {0: 2.0})
    assert d["diff"] == -1.0 and math.isnan(d["lo"]) and not d["significant"]
    assert "too few seeds" in format_interval(d)
    # a diverged seed (NaN) drops out of the pairing
    d = paired_difference({0: 1.0, 1: float("nan"), 2: 3.0}, {0: 0.5, 1: 0.7, 2: 2.0})
    assert d["n"] == 2 and d["paired"]
    assert mean_interval([])["n"] == 0 and math.isnan(mean_interval([1.0])["sd"])
