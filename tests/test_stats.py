"""Known answers for the paired test used on configs scored on the same prompts."""

from __future__ import annotations

import pytest

from kvpareto.stats import mcnemar_exact


@pytest.mark.parametrize(
    "only_a,only_b,p",
    [
        (0, 0, 1.0),  # no discordant pairs: no evidence either way
        (3, 3, 1.0),
        (0, 9, 2 / 2**9),  # all 9 discordant pairs one way
        (1, 5, 2 * (1 + 6) / 2**6),  # P(X <= 1) for X ~ Bin(6, 1/2), doubled
        (5, 1, 2 * (1 + 6) / 2**6),  # symmetric in its arguments
    ],
)
def test_exact_mcnemar_known_answers(only_a, only_b, p):
    assert mcnemar_exact(only_a, only_b) == pytest.approx(p)
