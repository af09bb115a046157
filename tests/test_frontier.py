"""Frontier math on hand-made points: dominance, hypervolume, knee, indistinguishable marks."""

from __future__ import annotations

import pytest

from kvpareto.search.frontier import (
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


def test_knee_is_the_point_farthest_above_the_chord():
    front = [Point("cheap", 10, 0.1), Point("knee", 30, 0.85), Point("full", 100, 0.9)]
    assert knee(front).key == "knee"


def test_knee_is_found_on_min_max_scaled_axes_whatever_the_units():
    # Scaled over the front, memory is (0, 0.2, 0.4, 1) and accuracy (0, 0.5, 0.875, 1):
    # accuracy minus memory is largest at 14 (0.475 against 0.3 at 12).
    front = [Point("a", 10, 0.1), Point("b", 12, 0.5), Point("c", 14, 0.8), Point("d", 20, 0.9)]
    assert knee(front).key == "c"
    in_kib = [Point(p.key, p.memory * 1024, p.accuracy) for p in front]
    assert knee(in_kib).key == "c"


@pytest.mark.parametrize(
    "front",
    [
        [],
        [Point("only", 10, 0.5)],
        [Point("cheap", 10, 0.2), Point("full", 100, 0.9)],
        [Point("a", 10, 0.1), Point("b", 40, 0.4), Point("c", 70, 0.7), Point("d", 100, 1.0)],
        [Point("a", 0.1, 0.3), Point("b", 0.2, 0.6), Point("c", 0.3, 0.9)],  # on the chord
    ],
    ids=["empty", "one point", "two points", "collinear", "collinear up to rounding"],
)
def test_a_front_without_a_bend_has_no_knee(front):
    assert knee(front) is None


def test_indistinguishable_marks_overlapping_intervals():
    front = [
        Point("cheap", 10, 0.6, (0.5, 0.7)),
        Point("mid", 20, 0.65, (0.55, 0.75)),  # overlaps cheap
        Point("top", 30, 0.95, (0.9, 1.0)),
    ]
    assert indistinguishable(front) == {"mid"}
