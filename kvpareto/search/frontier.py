"""The Pareto frontier of memory (minimize) against accuracy (maximize), and what to say about it.

Pure functions over plain points, so they are easy to check by hand:
- `pareto_front`: the non-dominated points (a point is dominated when another uses no more memory,
  is at least as accurate, and is strictly better in one of the two);
- `hypervolume`: the area dominated by the front, in normalized units: memory as a fraction of
  the baseline's total memory, accuracy as a fraction. The reference point is (1.1, 0.0): 10%
  more memory than the baseline, zero accuracy. Points past the reference add nothing;
- `knee`: the front point farthest from the straight line joining the front's two ends (in the
  same normalized units): where giving up more memory stops buying much accuracy;
- `indistinguishable`: front points whose accuracy interval overlaps that of a cheaper front
  point, so the data cannot tell them apart from the cheaper one.
"""

from __future__ import annotations

from dataclasses import dataclass

REFERENCE = (1.1, 0.0)


@dataclass(frozen=True)
class Point:
    key: str
    memory: float  # bytes
    accuracy: float
    ci: tuple[float, float] = (0.0, 1.0)


def dominates(a: Point, b: Point) -> bool:
    return (
        a.memory <= b.memory
        and a.accuracy >= b.accuracy
        and (a.memory < b.memory or a.accuracy > b.accuracy)
    )


def pareto_front(points: list[Point]) -> list[Point]:
    """Non-dominated points, cheapest first; among exact ties the first seen is kept."""
    front: list[Point] = []
    for p in sorted(points, key=lambda p: (p.memory, -p.accuracy)):
        if front and front[-1].accuracy >= p.accuracy:
            continue  # a cheaper (or equal) point is at least as accurate
        if front and front[-1].memory == p.memory:
            front.pop()
        front.append(p)
    return front


def hypervolume(front: list[Point], baseline_memory: float, reference=REFERENCE) -> float:
    ref_m, ref_a = reference
    area, best = 0.0, ref_a
    # Sweep from the cheapest point up: each adds the band of accuracy it gains over the cheaper
    # points, which stretches from its memory to the reference.
    for p in sorted(front, key=lambda p: p.memory):
        m = p.memory / baseline_memory
        if m >= ref_m or p.accuracy <= ref_a:
            continue
        area += (ref_m - m) * max(p.accuracy - best, 0.0)
        best = max(best, p.accuracy)
    return area


def knee(front: list[Point], baseline_memory: float) -> Point | None:
    if not front:
        return None
    if len(front) <= 2:
        return front[-1]
    (x0, y0), (x1, y1) = (
        (front[0].memory / baseline_memory, front[0].accuracy),
        (front[-1].memory / baseline_memory, front[-1].accuracy),
    )
    dx, dy = x1 - x0, y1 - y0
    norm = (dx * dx + dy * dy) ** 0.5 or 1.0

    def distance(p: Point) -> float:
        x, y = p.memory / baseline_memory, p.accuracy
        # Points above the chord (more accurate than the straight trade-off) count positive.
        return (dx * (y - y0) - dy * (x - x0)) / norm

    return max(front, key=distance)


def indistinguishable(front: list[Point]) -> set[str]:
    """Keys of front points whose CI overlaps the CI of some cheaper front point."""
    marked = set()
    for i, p in enumerate(front):
        if any(q.ci[1] >= p.ci[0] for q in front[:i]):
            marked.add(p.key)
    return marked
