"""Accuracy intervals: Wilson for right/wrong outcomes, a seeded bootstrap for partial scores;
known answers for the paired test used on configs scored on the same prompts."""

from __future__ import annotations

import pytest

from kvpareto.config import Config
from kvpareto.evaluation.trial import run_trial
from kvpareto.stats import bootstrap, mcnemar_exact, mean_interval, wilson
from kvpareto.tasks import Task, register_task


def test_right_wrong_outcomes_get_the_wilson_interval():
    outcomes = [True, False, True, True, 1, 0, 1.0]
    assert mean_interval(outcomes) == wilson(5, 7)


def test_partial_scores_get_a_seeded_percentile_bootstrap():
    # Every resample of twenty halves has mean 0.5; Wilson on "10 successes of 20" is 0.30-0.70.
    assert mean_interval([0.5] * 20) == (0.5, 0.5)
    scores = [0.0, 0.25, 0.5, 0.5, 0.75, 1.0, 0.9, 0.1, 0.6, 0.4]
    low, high = mean_interval(scores)
    assert (low, high) == bootstrap(scores, seed=0)  # the same every time
    assert low < sum(scores) / len(scores) < high
    assert bootstrap(scores, seed=1) != (low, high)


@register_task("halves")  # for the whole session: a name no real task takes
class _Halves(Task):
    """A task that runs itself and scores every document 0.5, as an lm-eval metric might."""

    def evaluate(self, loaded, config, context_length, n, seed):
        return [0.5] * n


def test_a_trial_of_partial_scores_reports_the_bootstrap_interval(tiny_models):
    result = run_trial(tiny_models["tiny-llama"], Config(), ["halves"], [64], 20, seed=0)
    assert result.accuracy == 0.5
    assert result.accuracy_ci == pytest.approx((0.5, 0.5))
    assert result.tasks["halves"].accuracy_ci == pytest.approx((0.5, 0.5))


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
