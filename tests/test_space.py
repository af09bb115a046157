"""Search spaces: conditional knobs, canonical configs, per-layer groups, grids."""

from __future__ import annotations

import optuna
import pytest

from kvpareto.config import Config
from kvpareto.errors import UserError
from kvpareto.search.space import canonical, load_space


def _trial(seed=0):
    return optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()


def test_quantization_knobs_are_only_chosen_for_quantized_streams(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "params:\n  k_bits: 16\n  v_bits: 16\n  k_granularity: [per-token, per-channel]\n"
        "  group_size: [32, 64]\n  chunk_size: [0, 256]\n"
    )
    space = load_space(path)
    trial = _trial()
    config = space.suggest(trial)
    assert set(trial.params) == {"chunk_size"}
    assert config.k_granularity == Config().k_granularity and config.group_size == 32


def test_canonical_configs_ignore_knobs_that_do_not_apply():
    a = Config(k_bits=16, v_bits=16, k_granularity="per-channel", group_size=128)
    b = Config(k_bits=16, v_bits=16)
    assert a.key() != b.key() and canonical(a).key() == canonical(b).key()
    c = Config(k_bits=4, v_bits=16, k_granularity="per-channel")
    assert canonical(c).k_granularity == "per-channel"


def test_per_layer_space_gives_each_group_of_layers_its_own_pair():
    space = load_space("search_spaces/per-layer.yaml")
    config = space.suggest(_trial(3), n_layers=30)
    groups = [config.bits_for_layer(i) for i in range(30)]
    assert len(set(groups)) <= 5
    for g in range(5):  # six layers per group, all alike
        assert len({(b.k_bits, b.v_bits) for b in groups[6 * g : 6 * g + 6]}) == 1
    with pytest.raises(UserError):
        space.grid()


def test_grid_enumerates_distinct_configs_once(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(
        "params:\n  k_bits: [4, 16]\n  v_bits: [16]\n  k_granularity: [per-token, per-channel]\n"
    )
    grid = load_space(path).grid()
    # k16 makes the granularity moot: 2 configs at k4 plus one at k16.
    assert len(grid) == 3 and len({c.key() for c in grid}) == 3


@pytest.mark.parametrize("name", ["default", "paper", "kivi", "per-layer", "smoke"])
def test_shipped_spaces_load(name):
    space = load_space(f"search_spaces/{name}.yaml")
    assert space.choices and space.source_hash
