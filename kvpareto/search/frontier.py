"""The Pareto frontier of memory (minimize) against accuracy (maximize), and what to say about it.

Pure functions over plain points, so they are easy to check by hand:
- `pareto_front`: the non-dominated points (a point is dominated when another uses no more memory,
  is at least as accurate, and is strictly better in one of the two);
- `hypervolume`: the area dominated by the front, in normalized units: memory as a fraction of
  the baseline's total memory, accuracy as a fraction. The reference point is (1.1, 0.0): 10%
  more memory than the baseline, zero accuracy. Points past the reference add nothing;
- `knee`: where giving up more memory stops buying much accuracy (defined at `knee`);
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


def knee(front: list[Point]) -> Point | None:
    """The front point farthest above the chord joining the front's two ends, on axes scaled
    min-max over the front (memory and accuracy each from 0 at the front's lowest to 1 at its
    highest), so that neither unit (bytes, fraction) nor the front's extent weighs on the pick.

    On those axes the chord runs from (0, 0) to (1, 1), and a point's distance above it is
    proportional to accuracy minus memory. A knee is a bend: with no point strictly above the
    chord (one point, two points, or collinear ones) the trade-off is a straight line, every
    point of it as good a buy as the next, and there is no knee (None).
    """
    if not front:
        return None
    memories, accuracies = [p.memory for p in front], [p.accuracy for p in front]

    def scaled(value: float, values: list[float]) -> float:
        low, high = min(values), max(values)
        return (value - low) / (high - low) if high > low else 0.0

    def above(p: Point) -> float:
        return scaled(p.accuracy, accuracies) - scaled(p.memory, memories)

    best = max(front, key=above)
    # Collinear points sit on the chord up to rounding.
    return best if above(best) > 1e-9 else None


def indistinguishable(front: list[Point]) -> set[str]:
    """Keys of front points whose CI overlaps the CI of some cheaper front point."""
    marked = set()
    for i, p in enumerate(front):
        if any(q.ci[1] >= p.ci[0] for q in front[:i]):
            marked.add(p.key)
    return marked
