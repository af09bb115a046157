"""A stored smoke study pins what a refactor must not change: config keys and labels, trial-cache
keys, the order in which the search space asks the sampler, and every output file.

`tests/data/golden_smoke/` was written by `make smoke`'s search (tiny-llama, smoke.yaml, seed 0)
and is rewritten by its `regenerate.sh` only for a change meant to alter it: its Optuna study
(study.db), its trial cache, the outputs (trials.csv, frontier.json, study.json), the report's
sha256, and the keys and labels of every config in the shipped spaces' grids (with, for a grid
that later gained a knob, those of its configs from before it). After regenerating, check that
trials.csv lists the same config keys, accuracies and memory unless the change meant otherwise.
Last regenerated when the paired difference from the baseline and the fidelity scores were
added (same trials, keys and figures; new columns only), then when fixed configs began to carry
sampler params (NSGA-II's later proposals changed, as intended), then when racing came on by
default (`search.racing`: new columns, the knee's top-up trials and their cache records; the
study's own trials, keys and figures unchanged).
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import optuna
import pytest

from kvpareto.config import Config
from kvpareto.knobs import KNOB
from kvpareto.search.outputs import write_outputs
from kvpareto.search.space import load_space
from kvpareto.search.study import SearchSettings, eval_key, run_search

GOLDEN = Path(__file__).parent / "data" / "golden_smoke"
SPACES = Path(__file__).parent.parent / "search_spaces"


@pytest.fixture
def stored():
    return json.loads((GOLDEN / "study.json").read_text())


def _settings(stored: dict, out: Path) -> SearchSettings:
    return SearchSettings(
        model=stored["model"],
        space_path=str(SPACES / "smoke.yaml"),
        tasks=stored["tasks"],
        context_length=stored["context_length"],
        trials=12,
        sampler=stored["sampler"],
        seed=stored["seed"],
        study=stored["study"],
        out=str(out),
        samples=stored["samples"],
        # the dtype the study ran in, so the keys do not depend on this machine's choice
        dtype=stored["compute_dtype"],
        storage_dtype=stored["storage_dtype"],
    )


def _digest(configs) -> tuple[int, str]:
    rows = sorted((c.key(), c.label()) for c in configs)
    return len(rows), hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def test_config_keys_and_labels_of_every_shipped_grid_are_unchanged():
    """A grid that gains a knob gets a new digest; the stored digest of its configs from before
    (`before_later_knobs`: every knob listed there at its default) must still match, so adding
    a knob to a space changes no key or label of a config it already held. To regenerate after
    such a change, store the new grid's count and digest (`_digest` of its `grid()`) under the
    space's name, and list the knob under before_later_knobs."""
    golden = json.loads((GOLDEN / "config-keys.json").read_text())
    before = golden["before_later_knobs"]
    for name in ("smoke", "adaptive", "kivi", "default", "paper"):
        grid = load_space(SPACES / f"{name}.yaml").grid()
        assert _digest(grid) == (golden[name]["configs"], golden[name]["sha256"]), name
        if name in before:
            old = [
                c for c in grid if all(getattr(c, k) == KNOB[k].default for k in before["knobs"])
            ]
            assert _digest(old) == (before[name]["configs"], before[name]["sha256"]), name
    for example in golden["examples"]:
        config = Config.from_dict(example["config"])
        assert (config.key(), config.label()) == (example["key"], example["label"])


def test_trial_cache_keys_are_unchanged(stored, tmp_path):
    settings = _settings(stored, tmp_path)
    records = sorted((GOLDEN / "trial-cache").glob("*.json"))
    # one record per distinct config and samples run (racing's raced-out rungs, knee top-ups)
    with (GOLDEN / "trials.csv").open() as f:
        runs = {(row["config_key"], int(row["samples_run"])) for row in csv.DictReader(f)}
    assert len(records) == len(runs)
    for path in records:
        record = json.loads(path.read_text())
        config = Config.from_dict(record["config"])
        assert config.key() == record["config_key"]
        samples_run = len(record["samples"]) // len(record["context_lengths"])
        assert (config.key(), samples_run) in runs
        assert eval_key(config, record["model_hash"], settings, samples_run) == path.stem


def test_outputs_rebuilt_from_the_stored_study_are_byte_identical(stored, tmp_path):
    from kvpareto.report import write_report

    tmp_path = tmp_path / stored["study"]  # the report names the study by its folder
    tmp_path.mkdir()
    shutil.copy(GOLDEN / "study.db", tmp_path / "study.db")
    study = optuna.load_study(
        study_name=f"{stored['study']}:{stored['model']}",
        storage=f"sqlite:///{tmp_path / 'study.db'}",
    )
    write_outputs(study, tmp_path, stored)
    for name in ("trials.csv", "frontier.json", "study.json"):
        assert (tmp_path / name).read_bytes() == (GOLDEN / name).read_bytes(), name
    page = write_report([tmp_path], tmp_path / "report.html")
    digest = hashlib.sha256(page.read_bytes()).hexdigest()
    assert digest == (GOLDEN / "report.sha256").read_text().strip()


def test_the_smoke_search_asks_the_sampler_for_the_same_configs(stored, tmp_path):
    # The stored trial cache answers every trial, so only the sampler's proposals are compared:
    # a change in which knobs are asked, or in what order, shows as a different config sequence.
    out = tmp_path / "results"
    shutil.copytree(GOLDEN / "trial-cache", out / stored["model"] / "trial-cache")
    settings = _settings(stored, out)
    run_search(settings, stored["command"])
    import pandas as pd

    rerun = pd.read_csv(settings.study_dir() / "trials.csv")
    golden = pd.read_csv(GOLDEN / "trials.csv")
    assert list(rerun["config_key"]) == list(golden["config_key"])
    assert list(rerun["label"]) == list(golden["label"])
    assert rerun["cached"].all()
