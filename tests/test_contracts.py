"""The contracts of tests/contracts.py, run once against every implementation: every KV scheme and
pruning scorer holds exactly its modeled bytes, every scheme's fork continues as its cache, and
every registry keeps the registry contract."""

from __future__ import annotations

import pytest

from kvpareto.errors import UserError
from kvpareto.evaluation import get_task
from kvpareto.knobs import KNOB
from kvpareto.kv import SCHEMES
from kvpareto.kv.pruning import SCORERS
from kvpareto.registry import Registry
from kvpareto.search.samplers import SAMPLERS
from kvpareto.tasks import FAMILIES, TASKS
from kvpareto.weights.quantize import QUANTIZERS
from tests.contracts import (
    BYTES_CASES,
    FORK_CASES,
    check_a_fork_continues_as_the_cache_and_apart_from_it,
    check_measured_bytes_equal_modeled,
    check_registry,
    schemes_covered,
    scorers_covered,
)

REGISTRIES = [TASKS, FAMILIES, SCORERS, QUANTIZERS, SCHEMES, SAMPLERS]


@pytest.mark.parametrize("case", BYTES_CASES, ids=lambda c: c.id)
def test_measured_kv_bytes_equal_modeled_bytes(tiny_models, case):
    check_measured_bytes_equal_modeled(tiny_models[case.model].model, case)


def test_every_registered_scheme_and_scorer_is_held_to_the_bytes_contract():
    assert schemes_covered() == set(SCHEMES.names())
    assert scorers_covered() == set(SCORERS.names())


@pytest.mark.parametrize(
    "model,config", FORK_CASES, ids=[f"{m}-{c.label()}" for m, c in FORK_CASES]
)
def test_a_fork_of_a_prefilled_cache_continues_as_the_cache_and_apart_from_it(
    tiny_models, model, config
):
    check_a_fork_continues_as_the_cache_and_apart_from_it(tiny_models[model].model, config)


def test_every_registered_scheme_and_pruning_is_held_to_the_fork_contract():
    configs = [config for _, config in FORK_CASES]
    assert {c.kv_scheme for c in configs} == set(SCHEMES.names())
    assert any(c.prune_rate > 0 for c in configs)


@pytest.mark.parametrize("registry", REGISTRIES, ids=lambda r: r.kind)
def test_registry_refuses_a_second_name_and_lists_every_name_for_an_unknown_one(registry):
    get_task("niah")  # the task modules register on the first lookup
    check_registry(registry)


def test_a_registry_hands_back_what_was_registered_in_order():
    things: Registry[object] = Registry("thing")
    first = things.add("b", object())

    @things.register("a")
    def second():
        pass

    assert things.names() == ["b", "a"] and things.get("b") is first and things.get("a") is second
    with pytest.raises(UserError, match="unknown thing 'c'; known things: a, b"):
        things.get("c")


def test_knob_choices_name_the_registered_implementations():
    assert SCHEMES.names() == list(KNOB["kv_scheme"].choices)
    assert set(SCORERS.names()) == set(KNOB["prune_scorer"].choices)
    assert set(QUANTIZERS.names()) == set(KNOB["weights"].choices) - {"none"}
