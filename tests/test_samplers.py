"""Fixed configs (baselines) enter a study without blinding the relative samplers."""

from __future__ import annotations

import optuna
import pytest

from kvpareto.config import Config, canonical
from kvpareto.search.samplers import _StudyView, enqueue_fixed, make_sampler, trial_config
from kvpareto.search.space import load_space

# 16 bits and chunk 0 are outside this space: the 16-bit baseline cannot be expressed in it
SPACE = "params:\n  k_bits: [2, 4, 8]\n  v_bits: [2, 4, 8]\n  chunk_size: [128, 256]\n"


@pytest.fixture
def space(tmp_path):
    (tmp_path / "space.yaml").write_text(SPACE)
    return load_space(tmp_path / "space.yaml")


def test_params_of_answers_in_space_configs_and_refuses_the_rest(space):
    inside = canonical(Config(k_bits=4, v_bits=8, chunk_size=256))
    params = space.params_of(inside)
    assert params == {"k_bits": 4, "v_bits": 8, "chunk_size": 256}
    assert space.params_of(canonical(Config())) is None  # 16 bits, chunk 0
    assert space.params_of(canonical(Config(k_bits=4, v_bits=8, chunk_size=64))) is None


def _run(space, sampler: str, seed: int, trials: int, baselines: list[Config]) -> list[str]:
    """Labels a sampler proposes on a made-up objective, after `baselines` ran first."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(
        directions=["minimize", "maximize"], sampler=make_sampler(sampler, seed)
    )
    enqueue_fixed(study, space, baselines)
    labels = []
    for _ in range(trials):
        trial = study.ask()
        config = trial_config(trial, space)
        study.tell(trial, [config.k_bits + config.v_bits, config.k_bits * 2 + config.v_bits])
        labels.append(config.label())
    return labels, study


def test_fixed_configs_carry_params_where_the_space_expresses_them(space):
    inside = canonical(Config(k_bits=8, v_bits=8, chunk_size=128))
    _, study = _run(space, "nsga2", 0, 2, [canonical(Config()), inside])
    off, on = study.get_trials()
    assert off.params == {} and off.user_attrs["in_space"] is False
    assert on.params == {"k_bits": 8, "v_bits": 8, "chunk_size": 128}
    assert [t.number for t in _StudyView(study).get_trials()] == [on.number]


@pytest.mark.parametrize("sampler", ["nsga2", "gp"])
def test_an_off_space_baseline_does_not_turn_a_sampler_into_random_search(space, sampler):
    # Before the fix, one parameterless baseline emptied the samplers' search space and their
    # proposals equalled the random sampler's, seed for seed.
    baseline = [canonical(Config())]
    learned, _ = _run(space, sampler, 0, 24, baseline)
    random, _ = _run(space, "random", 0, 24, baseline)
    assert learned[0] == random[0] == baseline[0].label()
    assert learned != random
