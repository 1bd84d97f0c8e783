"""Budget-matched, iso-accuracy speedups with paired bootstrap intervals (pure numpy).

A study runs every method at several budgets, each run with its own full learning-rate
schedule, and several seeds. Seeds pair runs across methods (same learner init and
pass order), so every resample draws seed indices once and applies them to all.

Iso-accuracy speedup. The target is uniform's seed-mean final accuracy at its largest
budget. Along a method's budget curve (seed-mean final accuracy at each budget, budgets
ascending), the method reaches the target at the smallest budget from which the curve
stays at or above it. The examples it needs are interpolated between that budget and
the one below it, linearly in log-examples:

    t = (target - a_lo) / (a_hi - a_lo),  log x* = log x_lo + t (log x_hi - log x_lo)

and its FLOPs likewise, linearly in log-FLOPs at the same t. Speedup = uniform's
examples (FLOPs) at its largest budget / x*. When the curve is already at the target at
the smallest budget, x* <= that budget and the speedup is a lower bound ("at least");
when the curve ends below the target it is "not reached" (beyond the largest budget).

Bootstrap. Percentile intervals (2.5%, 97.5%) over resampled seeds. A resample where a
method does not reach the target has no speedup, only a bound: it is below every reached
value, so it sorts first, and an interval end that falls on such a resample is None
("not reached"; `speedup_interval`). An interval "excludes" the null value (0 for
accuracy differences, 1 for speedups) only when both ends lie on one side of it.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np

__all__ = ["Crossing", "iso_accuracy_crossing", "interpolate_at", "bootstrap_interval",
           "bootstrap_draws", "percentile_interval", "speedup_interval", "paired_difference",
           "excludes"]

REACHED, AT_MOST, NOT_REACHED = "interpolated", "at_most_smallest_budget", "not_reached"


class Crossing(tuple):
    """(status, index, t): the budget pair (index-1, index) and fraction t in [0, 1]."""

    @property
    def status(self) -> str:
        return self[0]

    @property
    def index(self) -> Optional[int]:
        return self[1]

    @property
    def t(self) -> Optional[float]:
        return self[2]


def iso_accuracy_crossing(accuracy: Sequence[float], target: float) -> Crossing:
    """Where a budget curve reaches `target` and stays there (see module docstring).

    Args:
      accuracy: [k] seed-mean accuracy at each budget, budgets ascending.
      target: the accuracy to reach.
    """
    acc = np.asarray(accuracy, np.float64)
    if acc.ndim != 1 or not len(acc):
        raise ValueError("need a non-empty budget curve")
    above = acc >= target
    if not above[-1]:
        return Crossing((NOT_REACHED, None, None))
    i = len(acc) - 1
    while i > 0 and above[i - 1]:
        i -= 1
    if i == 0:
        return Crossing((AT_MOST, 0, 1.0))
    lo, hi = acc[i - 1], acc[i]
    return Crossing((REACHED, i, float((target - lo) / (hi - lo))))


def interpolate_at(values: Sequence[float], crossing: Crossing) -> Optional[float]:
    """A positive quantity (examples, FLOPs) at the crossing, linear in its log."""
    if crossing.status == NOT_REACHED:
        return None
    v = np.asarray(values, np.float64)
    if crossing.status == AT_MOST:
        return float(v[0])
    lo, hi = math.log(v[crossing.index - 1]), math.log(v[crossing.index])
    return float(math.exp(lo + crossing.t * (hi - lo)))


def bootstrap_interval(statistic: Callable[[np.ndarray], float], num_seeds: int, *,
                       num_resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> Optional[tuple]:
    """Percentile interval of `statistic(seed indices)` over resampled seeds.

    `statistic` receives [num_seeds] int indices drawn with replacement and returns a
    float (use 0.0 for a speedup that is not reached). None with fewer than 2 seeds.
    """
    draws = bootstrap_draws(num_seeds, num_resamples=num_resamples, seed=seed)
    if draws is None:
        return None
    return percentile_interval([statistic(idx) for idx in draws], level=level)


def bootstrap_draws(num_seeds: int, *, num_resamples: int = 2000,
                    seed: int = 0) -> Optional[np.ndarray]:
    """[num_resamples, num_seeds] seed indices drawn with replacement; None under 2 seeds."""
    if num_seeds < 2:
        return None
    return np.random.default_rng(seed).integers(0, num_seeds, size=(num_resamples, num_seeds))


def percentile_interval(values: Sequence[float], *, level: float = 0.95) -> tuple:
    """The (lower, upper) percentiles of bootstrap replicates (inverted-CDF quantiles)."""
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(np.asarray(values, np.float64), [alpha, 1.0 - alpha],
                         method="inverted_cdf")
    return float(lo), float(hi)


def speedup_interval(replicates: Sequence[Optional[float]], *,
                     level: float = 0.95) -> tuple:
    """`percentile_interval` of speedup replicates, None for a resample that does not
    reach the target (it sorts below every reached one); an end that falls on one is None."""
    ends = percentile_interval([-math.inf if r is None else r for r in replicates],
                               level=level)
    return tuple(None if math.isinf(end) else end for end in ends)


def paired_difference(method: Sequence[float], baseline: Sequence[float], *,
                      num_resamples: int = 2000, seed: int = 0) -> dict:
    """Mean over seeds of method - baseline (paired by seed) and its bootstrap interval."""
    diff = np.asarray(method, np.float64) - np.asarray(baseline, np.float64)
    if diff.ndim != 1 or not len(diff):
        raise ValueError("need one value per seed for both")
    ci = bootstrap_interval(lambda idx: float(diff[idx].mean()), len(diff),
                            num_resamples=num_resamples, seed=seed)
    return {"mean": float(diff.mean()), "ci": list(ci) if ci else None,
            "significant": excludes(ci, 0.0)}


def excludes(ci: Optional[Sequence[Optional[float]]], null: float) -> Optional[bool]:
    """True when the interval lies strictly on one side of `null`; None without one.

    An end that is None ("not reached", `speedup_interval`) lies below every number, so
    a lower one is below `null` for this test too, and an upper one (the whole interval
    not reached) gives None.
    """
    if ci is None or ci[1] is None:
        return None
    return bool((ci[0] is not None and ci[0] > null) or ci[1] < null)
