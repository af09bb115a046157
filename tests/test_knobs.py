"""The knob table drives Config, canonical configs, the space schema, the `eval` options and the
report: every knob is in each of them, and the rules between knobs fail when a Config is built."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvpareto.config import Config, canonical
from kvpareto.errors import UserError
from kvpareto.knobs import KNOBS

CLI = [sys.executable, "-m", "kvpareto.cli"]


def test_config_fields_are_the_knobs_in_table_order_then_layer_bits():
    assert list(Config().to_dict()) == [k.name for k in KNOBS] + ["layer_bits"]
    assert all(getattr(Config(), k.name) == k.default for k in KNOBS)


def test_adaptive_with_a_prune_rate_fails_when_the_config_is_built():
    with pytest.raises(UserError, match="prune_rate applies to kv_scheme static only"):
        Config(kv_scheme="adaptive", prune_rate=0.5)
    with pytest.raises(UserError, match="k_bits, rotation apply to kv_scheme static only"):
        Config.from_dict({"kv_scheme": "rule", "k_bits": 4, "rotation": "hadamard"})
    with pytest.raises(UserError, match="layer_bits"):
        Config.from_dict({"kv_scheme": "rule", "layer_bits": {0: {"k_bits": 4, "v_bits": 4}}})


def test_eval_refuses_adaptive_with_a_prune_rate_before_any_model_loads():
    # A model that does not exist: the error must be the config's, raised before loading.
    args = ["--model", "no-such-model", "--kv-scheme", "adaptive", "--prune-rate", "0.5"]
    done = subprocess.run([*CLI, "eval", *args], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: prune_rate applies to kv_scheme static only; kv_scheme adaptive chooses "
        "per-token bits from --target-mean-bits"
    ]


def test_canonical_drops_knobs_a_scheme_does_not_use():
    adaptive = canonical(
        {"kv_scheme": "adaptive", "k_bits": 4, "residual_length": 8, "group_size": 64}
    )
    assert (adaptive.k_bits, adaptive.residual_length, adaptive.group_size) == (16, 0, 64)
    rule = canonical(Config(kv_scheme="rule", target_mean_bits=3.0, controller="mine"))
    assert (rule.target_mean_bits, rule.controller) == (3.0, "default")
    static = canonical(Config(k_bits=4, target_mean_bits=3.0))
    assert static.target_mean_bits == 4.0
    # prune_rate does not apply to adaptive, and with it goes its scorer
    pruned = canonical({"kv_scheme": "adaptive", "prune_rate": 0.5, "prune_scorer": "knorm"})
    assert (pruned.prune_rate, pruned.prune_scorer) == (0.0, "snapkv")


def test_a_space_never_proposes_adaptive_with_a_prune_rate(tmp_path):
    import optuna

    from kvpareto.search.space import load_space

    path = tmp_path / "s.yaml"
    path.write_text("params:\n  kv_scheme: [static, adaptive]\n  prune_rate: [0, 0.5]\n")
    space = load_space(path)
    assert all(c.prune_rate == 0 for c in space.grid() if c.kv_scheme == "adaptive")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        config = space.suggest(trial)
        assert config.kv_scheme == "static" or "prune_rate" not in trial.params


def test_every_knob_is_an_eval_option_a_space_key_and_a_report_knob(tmp_path):
    import typer.main

    from kvpareto.cli import app
    from kvpareto.report import KNOBS as REPORT_KNOBS
    from kvpareto.search.space import load_space

    command = next(c for c in typer.main.get_command(app).commands.values() if c.name == "eval")
    options = {p.name: p for p in command.params}
    for knob in KNOBS:
        assert knob.option.split("/")[0] in options[knob.name].opts, knob.name
        assert options[knob.name].help == knob.help
        space = tmp_path / f"{knob.name}.yaml"
        space.write_text(f"params:\n  {knob.name}: {str(knob.default).lower()}\n")
        assert load_space(space).choices == {knob.name: (knob.default,)}
    assert [k.name for k in KNOBS] == REPORT_KNOBS
