"""Trials compared sample by sample: every trial of a study runs the same seeded prompts.

The prompts come from the study's tasks, lengths, sample count and seed alone (the trial cache
keys them: `study.eval_key`), and a trial answers them in the same order, so a sample is known by
its task, its context length and its place among that task's samples at that length
(`sample_ids`). Two trials are paired on the samples both scored (`versus`), and their difference
gets a paired test (`stats.paired`): most samples are right (or wrong) for both configs, and only
the ones that differ carry information about the difference.
"""

from __future__ import annotations

from collections import Counter

from kvpareto.stats import PairedDelta, paired

Outcomes = tuple[tuple[str, float], ...]  # (sample id, score), in the trial's order


def sample_ids(samples: list[dict]) -> list[str]:
    """Each per-sample row's identity: "task@length#k" for the k-th sample of that task at that
    length (rows of tasks that run themselves carry their index the same way)."""
    seen: Counter[str] = Counter()
    ids = []
    for row in samples:
        where = f"{row['task']}@{row.get('context_length')}"
        ids.append(f"{where}#{seen[where]}")
        seen[where] += 1
    return ids


def outcomes(samples: list[dict]) -> Outcomes:
    """A trial's scores by sample identity, from its per-sample rows."""
    return tuple(zip(sample_ids(samples), (float(s["correct"]) for s in samples), strict=True))


def versus(a: Outcomes, b: Outcomes) -> PairedDelta | None:
    """a's mean score minus b's over the samples both scored, paired (its `n` says how many);
    None when they share none (a trial that failed). Within a study a sample id names the same
    prompt in every trial, so a trial stopped early by racing (`search.racing`), or one given
    more samples, pairs with the others on the samples they have in common."""
    scores_b = dict(b)
    common = [(score, scores_b[i]) for i, score in a if i in scores_b]
    if not common:
        return None
    return paired([x for x, _ in common], [y for _, y in common])
