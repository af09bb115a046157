"""Accuracy as a mean with a 95% interval: Wilson's for right/wrong outcomes (honest at small n
and near 0 or 1), a seeded percentile bootstrap for scores that can be partly right; and the
exact McNemar test for two configs scored on the same prompts."""

from __future__ import annotations

import math

import numpy as np

BOOTSTRAP_RESAMPLES = 2000


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson 95% interval for a binomial proportion; (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value for paired binary outcomes.

    `only_a` and `only_b` count the pairs where exactly one side succeeded. Under the null the
    discordant pairs split like fair coin flips, so p is twice the smaller binomial tail
    (capped at 1); 1.0 when there are no discordant pairs.
    """
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def bootstrap(
    scores: list[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """The percentile bootstrap 95% interval of the mean of `scores`; (0, 1) when empty."""
    if not scores:
        return 0.0, 1.0
    values = np.asarray(scores, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def mean_interval(scores: list[float]) -> tuple[float, float]:
    """The 95% interval of the mean score: Wilson when every score is 0 or 1, else bootstrap.
    Wilson models successes out of n trials; a score of 0.5 is not half a success of a coin
    flip, and feeding fractions to it gives an interval for a quantity that was not measured."""
    if all(s in (0, 1) for s in scores):
        return wilson(int(sum(scores)), len(scores))
    return bootstrap(scores)
