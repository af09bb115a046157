"""Accuracy intervals: Wilson for right/wrong outcomes, a seeded bootstrap for partial scores;
known answers for the paired test and interval used on configs scored on the same prompts."""

from __future__ import annotations

import math

import pytest

from kvpareto.config import Config
from kvpareto.evaluation.trial import run_trial
from kvpareto.stats import bonett_price, bootstrap, mcnemar_exact, mean_interval, paired, wilson
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


def test_bonett_price_known_answers():
    # 3 pairs right for a alone, none for b alone, of 10: adjusted (4/12, 1/12), so the centre
    # is 1/4 and the variance (5/12 - 1/16) / 12 = 17/576.
    half = 1.96 * math.sqrt(17) / 24
    assert bonett_price(3, 0, 10) == pytest.approx((0.25 - half, 0.25 + half))
    # No discordant pair: centred on 0, half-width 1.96 x sqrt(2/12 / 12).
    assert bonett_price(0, 0, 10) == pytest.approx((-1.96 / 72**0.5, 1.96 / 72**0.5))
    # All 40 pairs one way: centre -40/42, and the lower end clipped at -1.
    high = -40 / 42 + 1.96 * math.sqrt((1 - (40 / 42) ** 2) / 42)
    assert bonett_price(0, 40, 40) == (-1.0, pytest.approx(high))


def test_identical_outcomes_pair_to_a_zero_difference_that_tells_nothing_apart():
    scores = [1, 1, 0, 1, 0, 1, 1, 1, 0, 1]
    same = paired(scores, list(scores))
    assert (same.delta, same.p, same.only_a, same.only_b) == (0.0, 1.0, 0, 0)
    assert same.ci == bonett_price(0, 0, 10) and not same.distinct


def test_flipped_samples_give_the_exact_mcnemar_p():
    baseline = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    config = [1, 1, 1, 1, 0, 0, 0, 1, 1, 0]  # wrong on samples 4-6, right on 8
    delta = paired(config, baseline)
    assert delta.delta == pytest.approx(-0.2)
    assert (delta.only_a, delta.only_b) == (1, 3)
    assert delta.p == pytest.approx(2 * (1 + 4) / 2**4)  # P(X <= 1), X ~ Bin(4, 1/2), doubled
    assert delta.ci == bonett_price(1, 3, 10) and not delta.distinct
    ten_flips = paired([0] * 10 + [1] * 5, [1] * 15)
    assert ten_flips.p == pytest.approx(2 / 2**10) and ten_flips.distinct


def test_partial_scores_pair_by_a_bootstrap_of_their_differences():
    a, b = [0.5, 1.0, 0.25, 0.75, 0.5], [0.5, 0.5, 0.0, 0.75, 0.25]
    delta = paired(a, b)
    assert delta.delta == pytest.approx(0.2) and delta.p is None
    assert delta.ci == bootstrap([0.0, 0.5, 0.25, 0.0, 0.25])
    assert delta.distinct == (delta.ci[0] > 0)
    with pytest.raises(ValueError, match="equal"):
        paired([1.0], [1.0, 0.0])
