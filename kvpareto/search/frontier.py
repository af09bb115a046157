"""The Pareto frontier of memory (minimize) against accuracy (maximize), and what to say about it.

Pure functions over plain points, so they are easy to check by hand:
- `pareto_front`: the non-dominated points (a point is dominated when another uses no more memory,
  is at least as accurate, and is strictly better in one of the two);
- `hypervolume`: the area dominated by the front, in normalized units: memory as a fraction of
  the baseline's total memory, accuracy as a fraction. The reference point is (1.1, 0.0): 10%
  more memory than the baseline, zero accuracy. Points past the reference add nothing;
- `indistinguishable`: front points that the paired test on their samples cannot tell apart
  from some cheaper front point (`told_apart`);
- `knee`: the cheapest front point the samples show to be within `KNEE_MARGIN` of the front's
  most accurate point (a paired non-inferiority test): the point to deploy.

Points are compared sample by sample (`search.paired`), not by whether their independent
intervals overlap: two configs that are right on the same samples are the same config as far
as the data goes, however wide each one's own interval is.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvpareto.search.paired import Outcomes, versus

REFERENCE = (1.1, 0.0)
# The accuracy a knee may give up against the front's most accurate point, at most (the KV Pareto
# paper reports its reductions at 1-3 points of loss).
KNEE_MARGIN = 0.05


@dataclass(frozen=True)
class Point:
    key: str
    memory: float  # bytes
    accuracy: float
    ci: tuple[float, float] = (0.0, 1.0)
    outcomes: Outcomes = ()  # per-sample scores by sample id (`search.paired.outcomes`)


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


def told_apart(a: Point, b: Point) -> bool:
    """Whether the paired test on their samples separates a and b at the 5% level
    (`stats.PairedDelta.distinct`); points that cannot be paired cannot be told apart."""
    delta = versus(a.outcomes, b.outcomes)
    return delta is not None and delta.distinct


def knee(front: list[Point]) -> Point | None:
    """The cheapest front point whose paired 95% interval against the front's most accurate
    point (its costliest) lies above -`KNEE_MARGIN`: the samples show it gives up at most the
    margin. A non-inferiority test, not "no significant difference": with few samples no
    cheaper point passes and the knee is the most accurate point itself, because the data
    cannot vouch for a cheaper one (a test that merely fails to tell two points apart would
    pick the cheapest point of a small sample, however much it loses). None for a front of
    fewer than two points, which has no trade-off to read.
    """
    if len(front) < 2:
        return None
    best = front[-1]
    for p in front[:-1]:
        delta = versus(p.outcomes, best.outcomes)
        if delta is not None and delta.ci[0] >= -KNEE_MARGIN:
            return p
    return best


def indistinguishable(front: list[Point]) -> set[str]:
    """Keys of front points that the paired test cannot tell apart from some cheaper one."""
    return {p.key for i, p in enumerate(front) if any(not told_apart(p, q) for q in front[:i])}
