"""Statistics over seeds: is an effect larger than the seeds' own spread?

Ablation tables compare a technique switched off against the full recipe, both trained with the
same seeds. With n seeds per arm we report a t-interval for each arm's mean and, where the seeds
pair up, a paired t-interval for the difference (the same seed shares data order and initial
noise, so pairing removes much of the seed-to-seed variance). A difference is called "outside the
noise" only when its interval excludes 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as _st


def mean_interval(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean, sample sd and the two-sided t-interval of the mean; lo = hi = mean when n < 2."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": math.nan, "sd": math.nan, "lo": math.nan, "hi": math.nan}
    mean = float(x.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "sd": math.nan, "lo": math.nan, "hi": math.nan}
    sd = float(x.std(ddof=1))
    half = float(_st.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def paired_difference(treatment: Mapping[int, float], baseline: Mapping[int, float],
                      level: float = 0.95) -> dict:
    """treatment - baseline with a t-interval: paired over the seeds both have, else Welch.

    Returns {diff, lo, hi, n, paired, significant}; significant = the interval excludes 0
    (False whenever there are too few seeds to form an interval).
    """
    finite = lambda d: {k: float(v) for k, v in d.items() if v is not None and math.isfinite(float(v))}
    a, b = finite(treatment), finite(baseline)
    common = sorted(set(a) & set(b))
    if len(common) >= 2:
        d = mean_interval([a[s] - b[s] for s in common], level)
        out = {"diff": d["mean"], "lo": d["lo"], "hi": d["hi"], "n": d["n"], "paired": True}
    else:
        ma, mb = mean_interval(list(a.values()), level), mean_interval(list(b.values()), level)
        diff = ma["mean"] - mb["mean"]
        out = {"diff": diff, "lo": math.nan, "hi": math.nan, "n": min(ma["n"], mb["n"]), "paired": False}
        if ma["n"] >= 2 and mb["n"] >= 2:
            va, vb = ma["sd"] ** 2 / ma["n"], mb["sd"] ** 2 / mb["n"]
            se = math.sqrt(va + vb)
            # Welch-Satterthwaite degrees of freedom
            dof = (va + vb) ** 2 / (va**2 / (ma["n"] - 1) + vb**2 / (mb["n"] - 1)) if se > 0 else 1.0
            half = float(_st.t.ppf(0.5 + level / 2, dof)) * se
            out.update(lo=diff - half, hi=diff + half)
    out["significant"] = bool(math.isfinite(out["lo"]) and (out["lo"] > 0 or out["hi"] < 0))
    return out


def format_interval(d: dict, digits: int = 3) -> str:
    """'+1.23 [0.45, 2.01]' or '+1.23 (n<2)' for a paired_difference result."""
    if not math.isfinite(d["lo"]):
        return f"{d['diff']:+.{digits}g} (too few seeds)"
    return f"{d['diff']:+.{digits}g} [{d['lo']:+.{digits}g}, {d['hi']:+.{digits}g}]"
