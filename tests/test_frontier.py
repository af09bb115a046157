"""Frontier math on hand-made points: dominance, hypervolume, knee, indistinguishable marks."""

from __future__ import annotations

import pytest

from kvpareto.search.frontier import (
    KNEE_MARGIN,
    Point,
    dominates,
    hypervolume,
    indistinguishable,
    knee,
    pareto_front,
)


def test_pareto_front_drops_dominated_and_tied_points():
    pts = [
        Point("base", 100, 0.9),
        Point("a", 50, 0.9),  # dominates base: cheaper, as accurate
        Point("b", 30, 0.7),
        Point("c", 40, 0.6),  # dominated by b
        Point("d", 10, 0.1),
        Point("e", 30, 0.5),  # same memory as b, worse
    ]
    assert [p.key for p in pareto_front(pts)] == ["d", "b", "a"]
    assert dominates(pts[1], pts[0]) and not dominates(pts[0], pts[1])


def test_hypervolume_known_answer():
    # Baseline memory 100, reference (1.1, 0): rectangles (1.1-0.5)*0.9 and (1.1-0.2)*(0.5-0).
    front = [Point("x", 20, 0.5), Point("y", 50, 0.9)]
    expected = (1.1 - 0.2) * 0.5 + (1.1 - 0.5) * (0.9 - 0.5)
    assert hypervolume(front, 100) == pytest.approx(expected)
    assert hypervolume([Point("far", 200, 1.0)], 100) == 0.0


def _point(key: str, memory: float, right: str) -> Point:
    """A point scored on len(right) samples, right where `right` has a 1."""
    scores = [float(c) for c in right]
    outcomes = tuple((f"s{i}", x) for i, x in enumerate(scores))
    return Point(key, memory, sum(scores) / len(scores), outcomes=outcomes)


def test_the_knee_is_the_cheapest_point_shown_within_the_margin_of_the_best():
    # Over 200 samples, knee misses one that full gets: Δ = -0.005, paired interval from about
    # -0.022, inside KNEE_MARGIN; cheap misses 100 and is far outside it.
    front = [
        _point("cheap", 10, "1" * 100 + "0" * 100),
        _point("knee", 30, "1" * 199 + "0"),
        _point("full", 100, "1" * 200),
    ]
    assert knee(front).key == "knee"
    assert indistinguishable(front) == {"full"}


def test_a_knee_one_sample_short_of_the_best_on_20_samples_is_not_vouched_for():
    # The same single miss on 20 samples: the interval reaches about -0.20, past the margin.
    front = [_point("cheap", 30, "1" * 19 + "0"), _point("full", 100, "1" * 20)]
    assert knee(front).key == "full"
    assert KNEE_MARGIN == 0.05


def test_when_every_step_up_buys_accuracy_the_knee_is_the_costliest_point():
    front = [
        _point("low", 10, "0" * 20),
        _point("mid", 20, "1" * 10 + "0" * 10),  # 10 pairs one way: p = 2 / 2^10
        _point("top", 30, "1" * 20),
    ]
    assert knee(front).key == "top"
    assert indistinguishable(front) == set()


def test_when_the_samples_cannot_tell_the_front_apart_the_knee_is_its_most_accurate_point():
    # 6/10 against 10/10: 4 discordant pairs give McNemar p = 0.125, so the two are not told
    # apart, yet nothing shows the cheap one is within the margin: the knee stays at full.
    front = [_point("cheap", 10, "1111110000"), _point("full", 100, "1" * 10)]
    assert knee(front).key == "full"
    assert indistinguishable(front) == {"full"}


@pytest.mark.parametrize(
    "front",
    [[], [Point("only", 10, 0.5)]],
    ids=["empty", "one point"],
)
def test_a_front_without_a_trade_off_has_no_knee(front):
    assert knee(front) is None


def test_points_that_cannot_be_paired_are_never_told_apart():
    # Scored on other samples (or with none recorded): no paired test, so no evidence.
    a = _point("a", 10, "0" * 20)
    b = Point("b", 20, 1.0, outcomes=tuple((f"t{i}", 1.0) for i in range(20)))
    assert indistinguishable([a, b]) == {"b"} and knee([a, b]).key == "b"
    assert indistinguishable([Point("x", 1, 0.1), Point("y", 2, 0.9)]) == {"y"}


def test_indistinguishable_pairs_samples_where_independent_intervals_would_overlap():
    # 28/40 and 36/40: Wilson intervals (0.55, 0.82) and (0.77, 0.96) overlap, but cheap is
    # wrong on 8 samples that full gets and right on every one full gets: McNemar p = 2 / 2^8.
    cheap = _point("cheap", 10, "1" * 28 + "0" * 12)
    full = _point("full", 20, "1" * 36 + "0" * 4)
    assert indistinguishable([cheap, full]) == set()
    assert knee([cheap, full]).key == "full"


def test_a_point_is_marked_when_the_paired_test_cannot_tell_it_from_any_cheaper_one():
    front = [
        _point("a", 10, "1" * 10 + "0" * 10),
        _point("b", 20, "1" * 19 + "0"),  # 9 discordant pairs against a: p = 2 / 2^9
        _point("c", 30, "1" * 20),  # apart from a, but one pair from b: p = 1
    ]
    assert indistinguishable(front) == {"c"}
    assert knee(front).key == "c"  # b's one miss in 20 is not shown to be within the margin
