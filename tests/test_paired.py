"""Trials paired with the baseline sample by sample: sample identities, and the paired difference,
McNemar p and fidelity columns a study writes into trials.csv and frontier.json."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from kvpareto.config import Config
from kvpareto.evaluation.result import TrialResult
from kvpareto.search.outputs import frontier_summary, trial_rows
from kvpareto.search.paired import outcomes, sample_ids, versus
from kvpareto.stats import bonett_price

CACHE = Path(__file__).parent / "data" / "golden_smoke" / "trial-cache"


def test_a_sample_is_known_by_its_task_length_and_place_among_them():
    rows = [
        {"task": "niah", "context_length": 1024},
        {"task": "niah", "context_length": 2048},
        {"task": "niah", "context_length": 1024},
        {"task": "qa", "context_length": 1024},
    ]
    assert sample_ids(rows) == ["niah@1024#0", "niah@2048#0", "niah@1024#1", "qa@1024#0"]


def test_trials_pair_on_the_samples_both_scored():
    a = outcomes([{"task": "t", "context_length": 8, "correct": c} for c in (True, False)])
    assert versus(a, a).delta == 0.0 and versus(a, a).n == 2
    assert versus(a[:1], a).n == 1 and versus(a, a[:1]).n == 1
    assert versus(a, ()) is None and versus((), ()) is None


def test_a_trial_with_more_samples_pairs_on_the_common_ones_with_known_counts():
    rows = [{"task": "t", "context_length": 8, "correct": c} for c in (1, 1, 0, 1, 0, 0)]
    longer = outcomes(rows)  # t@8#0..#5
    shorter = outcomes([dict(r, correct=1) for r in rows[:4]])  # t@8#0..#3, all right
    delta = versus(longer, shorter)  # over #0..#3: longer is right alone on none, wrong on #2
    assert (delta.n, delta.only_a, delta.only_b) == (4, 0, 1)
    assert delta.delta == pytest.approx(-0.25)
    assert delta.ci == bonett_price(0, 1, 4)
    assert versus(shorter, longer).delta == pytest.approx(0.25)


def _trial(record: dict, samples: list[dict] | None = None):
    result = TrialResult.from_dict(record)
    attrs = {**result.study_attrs(), "config": record["config"], "label": record["label"]}
    if samples is not None:
        attrs["samples"] = samples
        attrs["accuracy"] = sum(s["correct"] for s in samples) / len(samples)
    memory_mb = result.memory.measured.total_bytes / 1e6
    return optuna.trial.create_trial(
        values=[memory_mb, attrs["accuracy"]],
        user_attrs=json.loads(json.dumps(attrs)),  # as a storage hands them back
        constraints={"memory_budget_mb": -1.0},
    )


@pytest.fixture
def records() -> tuple[dict, dict]:
    """The stored smoke study's baseline record, and a cheaper config's."""
    stored = [json.loads(p.read_text()) for p in sorted(CACHE.glob("*.json"))]
    baseline = next(r for r in stored if r["config_key"] == Config().key())
    cheaper = min(stored, key=lambda r: r["memory"]["total_bytes"])
    return baseline, cheaper


def test_a_study_writes_the_paired_difference_and_the_exact_mcnemar_p(records):
    baseline, cheaper = records
    assert all(s["correct"] for s in baseline["samples"])  # agreement: the baseline agrees
    # Flip three of the six samples: right for the baseline alone on 3, the config alone on 0.
    flipped = [dict(s, correct=i in (0, 3, 5)) for i, s in enumerate(cheaper["samples"])]
    study = optuna.create_study(directions=["minimize", "maximize"])
    study.add_trials([_trial(baseline), _trial(cheaper, flipped)])
    base, config = trial_rows(study)
    assert (base["delta_accuracy"], base["mcnemar_p"]) == (0.0, 1.0)
    assert (base["delta_accuracy_lo"], base["delta_accuracy_hi"]) == bonett_price(0, 0, 6)
    assert config["delta_accuracy"] == pytest.approx(-0.5)
    assert config["mcnemar_p"] == pytest.approx(2 / 2**3)  # all 3 discordant pairs one way
    assert (config["delta_accuracy_lo"], config["delta_accuracy_hi"]) == bonett_price(0, 3, 6)
    assert base["kld"] == 0.0 and config["kld"] == cheaper["fidelity"]["kld"] > 0
    summary = frontier_summary([base, config])
    entry = next(e for e in summary["frontier"] if e["config_key"] == cheaper["config_key"])
    assert entry["delta_accuracy_ci"] == list(bonett_price(0, 3, 6))
    assert entry["mcnemar_p"] == pytest.approx(0.25)
    assert entry["kld_ci"] == cheaper["fidelity"]["kld_ci"]
    # p = 0.25: the baseline cannot be told apart from the cheaper config, yet nothing shows
    # the cheaper one within the knee's margin, so the knee is the baseline.
    assert all(e["indistinguishable"] for e in summary["frontier"][1:])
    assert [e["knee"] for e in summary["frontier"]] == [False, True]


def test_a_trial_on_other_samples_gets_no_paired_difference(records):
    baseline, cheaper = records
    other = [dict(s, context_length=256) for s in cheaper["samples"]]
    study = optuna.create_study(directions=["minimize", "maximize"])
    study.add_trials([_trial(baseline), _trial(cheaper, other)])
    _, config = trial_rows(study)
    assert config["delta_accuracy"] is None and config["mcnemar_p"] is None
