"""Accuracy as a mean with a 95% interval: Wilson's for right/wrong outcomes (honest at small n
and near 0 or 1), a seeded percentile bootstrap for scores that can be partly right; and, for
two configs scored on the same prompts, the paired difference (`paired`): the exact McNemar
test and the Bonett-Price interval for right/wrong outcomes, a paired bootstrap otherwise."""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def bonett_price(only_a: int, only_b: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% interval of p_a - p_b for `n` paired right/wrong outcomes, of which `only_a`
    were right for a alone and `only_b` for b alone: Bonett and Price's adjusted Wald interval
    (J. Educ. Behav. Stat. 37(4), 2012, 479-488), one of the intervals Fagerland, Lydersen and
    Laake recommend for paired proportions (Stat. Methods Med. Res. 23(4), 2014). It adds one
    pair to each discordant count, so it stays honest with no discordant pairs at all; clipped
    to [-1, 1]."""
    a, b = (only_a + 1) / (n + 2), (only_b + 1) / (n + 2)
    half = z * math.sqrt((a + b - (a - b) ** 2) / (n + 2))
    return max(-1.0, a - b - half), min(1.0, a - b + half)


@dataclass(frozen=True)
class PairedDelta:
    """Mean score of a minus mean score of b over the same samples, with a paired 95% interval.

    For right/wrong outcomes, `p` is the exact McNemar p-value, and the interval Bonett-Price's;
    for scores that can be partly right, `p` is None and the interval is the percentile
    bootstrap of the per-sample differences."""

    delta: float
    ci: tuple[float, float]
    p: float | None
    n: int
    only_a: int | None = None  # right for a alone (right/wrong outcomes only)
    only_b: int | None = None

    @property
    def distinct(self) -> bool:
        """Whether the samples tell a and b apart at the 5% level: McNemar's p below 0.05, or,
        without a p, an interval that excludes 0."""
        if self.p is not None:
            return self.p < 0.05
        return not self.ci[0] <= 0.0 <= self.ci[1]


def paired(a: list[float], b: list[float]) -> PairedDelta:
    """The paired difference of two configs' scores on the same samples, in the same order."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired scores need equal, non-empty lists; got {len(a)} and {len(b)}")
    delta = (sum(a) - sum(b)) / len(a)
    if all(s in (0, 1) for s in (*a, *b)):
        only_a = sum(1 for x, y in zip(a, b, strict=True) if x > y)
        only_b = sum(1 for x, y in zip(a, b, strict=True) if y > x)
        ci = bonett_price(only_a, only_b, len(a))
        return PairedDelta(delta, ci, mcnemar_exact(only_a, only_b), len(a), only_a, only_b)
    differences = [x - y for x, y in zip(a, b, strict=True)]
    return PairedDelta(delta, bootstrap(differences), None, len(a))
