"""Multi-fidelity racing: spend a study's samples where they can change its frontier.

A new trial first answers its first `--min-samples` samples per task and length (the first rung;
`evaluation.trial.TrialRun` answers a trial in slices, and a slice's samples are exactly the
first ones of the full run's). It stops there, raced out, when the paired test on the samples it
shares with a finished full trial of no more measured total memory already shows it less
accurate: the 95% interval of (this trial minus that one) lies below zero (`search.paired`).
Otherwise it answers the rest of its `--samples` and completes as a plain run would. A raced-out
trial is told to Optuna with its partial figures and stays in the trial table, marked, but is
never a frontier point.

With `--knee-samples`, after the last trial the knee, its frontier neighbours, the front's most
accurate point (the knee rule's reference) and the baseline are run again with that many samples
per task and length
(`top_up_keys`), so the knee's paired intervals narrow; the frontier is then read again.

The rung's test is repeated against every finished trial, so a trial is raced out more often
than 5% of the time when it is in truth as accurate as some cheaper one: racing trades that
risk for trials per hour, and `--min-samples 0` turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvpareto.search.paired import Outcomes, outcomes, versus
from kvpareto.stats import PairedDelta


def default_min_samples(samples: int) -> int:
    """The first rung for `samples` per task and length: about half, at least 2; `samples`
    itself (no racing) when that leaves nothing to save."""
    return min(samples, max(2, samples // 2))


@dataclass(frozen=True)
class Rival:
    """A finished full trial a new one is raced against."""

    trial: int
    label: str
    memory_mb: float  # measured total memory
    outcomes: Outcomes

    @property
    def name(self) -> str:
        return f"#{self.trial} {self.label}"


@dataclass(frozen=True)
class RacedOut:
    """Why a trial stopped at its first rung: `by` is cheaper and, paired on their common
    samples, more accurate (`delta` is the trial minus `by`, its interval below zero)."""

    by: Rival
    delta: PairedDelta

    def attrs(self) -> dict:
        """What the study keeps on the trial (`outputs.trial_rows` writes them as columns)."""
        return {
            "raced_out_by": self.by.name,
            "race_delta": self.delta.delta,
            "race_delta_ci": list(self.delta.ci),
            "race_n": self.delta.n,
        }


def rivals(study, full_samples: int) -> list[Rival]:
    """The study's finished trials with at least `full_samples` per task and length run: not
    raced out, not failed (trials from before racing count as full)."""
    from optuna.trial import TrialState

    found = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        if a.get("raced_out_by") or (a.get("samples_run") or full_samples) < full_samples:
            continue
        if a.get("memory") and a.get("samples"):
            memory_mb = a["memory"]["total_bytes"] / 1e6
            found.append(Rival(t.number, a.get("label", ""), memory_mb, outcomes(a["samples"])))
    return found


def raced_out(mine: Outcomes, memory_mb: float, against: list[Rival]) -> RacedOut | None:
    """The rival that shows this trial dominated, or None: one of no more measured memory whose
    paired 95% interval (mine minus its) lies below zero; of several, the clearest (lowest
    upper bound)."""
    best = None
    for rival in against:
        if rival.memory_mb > memory_mb:
            continue
        delta = versus(mine, rival.outcomes)
        if delta is not None and delta.ci[1] < 0 and (best is None or delta.ci[1] < best.ci[1]):
            best, by = delta, rival
    return None if best is None else RacedOut(by, best)


# Rounds of knee top-ups at most: each re-reads the frontier, whose knee the last round's extra
# samples may have moved. Three leave room for the knee to move twice; each round costs up to
# four configs' extra samples.
TOP_UP_ROUNDS = 3


def top_up_keys(summary: dict) -> list[str]:
    """Config keys to give more samples after the search: the knee, its neighbours on the front,
    the front's most accurate point and the baseline; none without a knee."""
    front = summary["frontier"]
    at = next((i for i, e in enumerate(front) if e["knee"]), None)
    if at is None:
        return []
    picked = [e["config_key"] for e in front[max(at - 1, 0) : at + 2]] + [front[-1]["config_key"]]
    if summary["baseline"]:
        from kvpareto.config import Config

        picked.append(Config().key())
    return list(dict.fromkeys(picked))
