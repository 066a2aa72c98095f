"""Statistics over seeds: is an effect larger than the seeds' own spread?

Ablation tables compare a technique switched off against the full recipe, both trained with the
same seeds. With n seeds per arm we report a t-interval for each arm's mean and, where the seeds
pair up, a paired t-interval for the difference (the same seed shares data order and initial
noise, so pairing removes much of the seed-to-seed variance). A difference is called "outside the
noise" only when its interval excludes 0 (equivalently: the two-sided t-test's p < 1 - level).

Student's t distribution is computed here (regularized incomplete beta function, continued
fraction) so that the package needs no scipy; tests/unit/test_seedstats.py checks it against
scipy.stats.ttest_rel / ttest_ind.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

# ----------------------------------------------------------------------------
# Student's t distribution.


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0, 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # the continued fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry otherwise
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, dof: float) -> float:
    """P(|T| >= |t|) for Student's t with `dof` (> 0, not necessarily integer) degrees of freedom."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return betainc(dof / 2.0, 0.5, dof / (dof + t * t))


def t_quantile(q: float, dof: float) -> float:
    """The q-quantile of Student's t (0.5 < q < 1): solves t_two_sided_p(t) = 2 (1 - q) by bisection."""
    if not 0.5 < q < 1.0:
        raise ValueError(f"t_quantile: q must be in (0.5, 1), got {q}")
    alpha = 2.0 * (1.0 - q)
    # I_x(dof/2, 1/2) rises with x = dof / (dof + t^2): bisect on x, then t = sqrt(dof (1 - x) / x)
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if betainc(dof / 2.0, 0.5, mid) < alpha:
            lo = mid
        else:
            hi = mid
    x = 0.5 * (lo + hi)
    return math.sqrt(dof * (1.0 - x) / x)


# ----------------------------------------------------------------------------
# Intervals over seeds.


def _finite(values) -> np.ndarray:
    return np.asarray([float(v) for v in values if v is not None and math.isfinite(float(v))], dtype=np.float64)


def mean_interval(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean, sample sd and the two-sided t-interval of the mean; sd, lo, hi are NaN when n < 2."""
    x = _finite(values)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": math.nan, "sd": math.nan, "lo": math.nan, "hi": math.nan}
    mean = float(x.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "sd": math.nan, "lo": math.nan, "hi": math.nan}
    sd = float(x.std(ddof=1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def paired_difference(treatment: Mapping[int, float], baseline: Mapping[int, float],
                      level: float = 0.95) -> dict:
    """treatment - baseline with a t-interval: paired over the seeds both have (>= 2), else Welch.

    Returns {diff, lo, hi, p, n, paired, significant}; p is the two-sided t-test's p-value (paired:
    scipy's ttest_rel; Welch: ttest_ind(equal_var=False)); significant = the interval excludes 0
    (False whenever there are too few seeds to form an interval).
    """
    a = {k: float(v) for k, v in treatment.items() if v is not None and math.isfinite(float(v))}
    b = {k: float(v) for k, v in baseline.items() if v is not None and math.isfinite(float(v))}
    common = sorted(set(a) & set(b))
    if len(common) >= 2:
        # paired t-test on the per-seed differences
        d = _finite([a[s] - b[s] for s in common])
        n, diff = len(d), float(d.mean())
        se = float(d.std(ddof=1)) / math.sqrt(n)
        dof = n - 1.0
        paired = True
    else:
        ma, mb = mean_interval(list(a.values()), level), mean_interval(list(b.values()), level)
        diff, n, paired = ma["mean"] - mb["mean"], min(ma["n"], mb["n"]), False
        se = dof = math.nan
        if ma["n"] >= 2 and mb["n"] >= 2:
            va, vb = ma["sd"] ** 2 / ma["n"], mb["sd"] ** 2 / mb["n"]
            se = math.sqrt(va + vb)
            # Welch-Satterthwaite degrees of freedom
            dof = (va + vb) ** 2 / (va**2 / (ma["n"] - 1) + vb**2 / (mb["n"] - 1)) if se > 0 else 1.0
    out = {"diff": diff, "lo": math.nan, "hi": math.nan, "p": math.nan, "n": n, "paired": paired}
    if math.isfinite(se):
        half = t_quantile(0.5 + level / 2, dof) * se
        out.update(lo=diff - half, hi=diff + half)
        if se > 0:
            out["p"] = t_two_sided_p(diff / se, dof)
        else:  # every seed moved by exactly the same amount
            out["p"] = 1.0 if diff == 0 else 0.0
    out["significant"] = bool(math.isfinite(out["lo"]) and (out["lo"] > 0 or out["hi"] < 0))
    return out


def format_interval(d: dict, digits: int = 3) -> str:
    """'+1.23 [+0.45, +2.01]' or '+1.23 (too few seeds)' for a paired_difference result."""
    if not math.isfinite(d["lo"]):
        return f"{d['diff']:+.{digits}g} (too few seeds)"
    return f"{d['diff']:+.{digits}g} [{d['lo']:+.{digits}g}, {d['hi']:+.{digits}g}]"
