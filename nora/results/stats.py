"""Small statistics for result tables: mean ± std over seeds and paired differences with a 95% CI.

* :func:`summarize`: mean and sample standard deviation (ddof=1) over seeds; one seed has no std.
* :func:`paired_difference`: ``a[seed] - b[seed]`` over the seeds both have, mean and a t-based 95%
  confidence interval ``mean ± t(0.975, n-1) · sd / sqrt(n)``; one pair has no interval.
* :func:`difference_to_constant`: ``a[seed] - c`` for a deterministic reference (a base model's single
  evaluation), with the same interval over seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Summary:
    n: int
    mean: float | None
    std: float | None  # sample standard deviation (ddof=1); None for a single seed

    def fmt(self, digits: int = 2) -> str:
        """``mean ± std`` (``mean`` alone for one seed, ``missing`` for none); n is reported separately."""
        if self.n == 0 or self.mean is None:
            return "missing"
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def summarize(values) -> Summary:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return Summary(0, None, None)
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return Summary(1, mean, None)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return Summary(len(vals), mean, math.sqrt(var))


def t_quantile(df: int, q: float = 0.975) -> float:
    from scipy.stats import t

    return float(t.ppf(q, df))


@dataclass
class PairedDiff:
    n: int
    mean: float | None
    lo: float | None
    hi: float | None

    def fmt(self, digits: int = 2) -> str:
        """``+0.12 [-0.05, +0.29] (n=3)``; one pair: ``+0.12 (n=1, no CI)``; none: ``missing``."""
        if self.n == 0 or self.mean is None:
            return "missing"
        if self.lo is None:
            return f"{self.mean:+.{digits}f} (n=1, no CI)"
        return f"{self.mean:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}] (n={self.n})"


def _interval(diffs: list[float]) -> PairedDiff:
    if not diffs:
        return PairedDiff(0, None, None, None)
    s = summarize(diffs)
    if s.n < 2:
        return PairedDiff(1, s.mean, None, None)
    half = t_quantile(s.n - 1) * s.std / math.sqrt(s.n)
    return PairedDiff(s.n, s.mean, s.mean - half, s.mean + half)


def paired_difference(a: dict, b: dict) -> PairedDiff:
    """Mean of a[seed] - b[seed] over the seeds both have, with a t-based 95% confidence interval."""
    seeds = sorted(set(a) & set(b), key=str)
    return _interval([float(a[s]) - float(b[s]) for s in seeds if a[s] is not None and b[s] is not None])


def difference_to_constant(a: dict, c: float | None) -> PairedDiff:
    """Mean of a[seed] - c with a t-based 95% CI over seeds (``c``: a deterministic reference)."""
    if c is None:
        return PairedDiff(0, None, None, None)
    return _interval([float(v) - float(c) for v in a.values() if v is not None])
