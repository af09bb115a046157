"""The typed trial result: stored records read back unchanged, and a record of another shape fails
on reading, naming what differs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvpareto.config import Config
from kvpareto.evaluation.result import RecordError, TrialFigures, TrialResult
from kvpareto.search.store import TrialCache

STORED = sorted((Path(__file__).parent / "data" / "golden_smoke" / "trial-cache").glob("*.json"))


@pytest.fixture
def record() -> dict:
    """A stored record in today's shape: its config with every knob, k_clip included."""
    record = json.loads(STORED[0].read_text())
    record["config"] = Config.from_dict(record["config"]).to_dict()
    return record


@pytest.mark.parametrize("path", STORED, ids=lambda p: p.stem)
def test_a_stored_trial_cache_record_round_trips_byte_for_byte(path):
    text = path.read_text()
    result = TrialResult.from_dict(json.loads(text))
    # knobs added since the record was written (k_clip) join its config at their defaults
    stored = json.loads(text)
    added = {k: v for k, v in result.config.to_dict().items() if k not in stored["config"]}
    assert set(added) <= {"k_clip"} and Config.from_dict(stored["config"]) == result.config
    stored["config"] = result.config.to_dict()
    assert json.dumps(result.to_dict()) == json.dumps(stored)
    assert json.dumps({**result.to_dict(), "config": json.loads(text)["config"]}) == text


def test_a_record_with_perplexity_round_trips_and_derives_its_delta(record):
    record["perplexity"] = {
        "value": 12.5,
        "tokens": 256,
        "text": "CPython 3.11.7 pydoc_data.topics v1",
        "baseline": 12.0,
        "delta_vs_baseline": 0.5,
    }
    result = TrialResult.from_dict(record)
    assert result.perplexity.delta_vs_baseline == 0.5
    assert json.dumps(result.to_dict()) == json.dumps(record)


def test_a_renamed_key_fails_naming_both_names(record):
    record["effective_bits"] = record.pop("effective_kv_bits")
    with pytest.raises(
        RecordError, match="lacks 'effective_kv_bits' and has unknown 'effective_bits'"
    ):
        TrialResult.from_dict(record)


@pytest.mark.parametrize(
    ("part", "key", "where"),
    [
        ("timing", "prefills_reused", "timing"),
        ("weights", "kernels", "weights"),
        ("memory", "kv_bytes", "memory"),
    ],
)
def test_a_missing_key_in_a_part_fails_naming_the_part_and_the_key(record, part, key, where):
    del record[part][key]
    with pytest.raises(RecordError, match=f"{where} lacks '{key}'"):
        TrialResult.from_dict(record)


def test_a_missing_modeled_memory_part_and_a_wrong_total_fail(record):
    broken = json.loads(json.dumps(record))
    del broken["memory"]["modeled"]["activation_peak_bytes"]
    with pytest.raises(RecordError, match="memory.modeled lacks 'activation_peak_bytes'"):
        TrialResult.from_dict(broken)
    record["memory"]["total_bytes"] += 1
    with pytest.raises(RecordError, match="not the sum"):
        TrialResult.from_dict(record)


def test_a_stale_trial_cache_record_is_a_miss_not_a_figure(tmp_path, record):
    del record["samples"]
    (tmp_path / "k.json").write_text(json.dumps(record))
    assert TrialCache(tmp_path).get("k") is None


def test_a_record_from_before_fidelity_was_measured_is_a_miss_so_the_trial_runs_again(
    tmp_path, record
):
    assert record["fidelity"]["n"] == len(record["samples"])
    assert all("kld" in s and "answer_logprob" in s for s in record["samples"])
    del record["fidelity"]
    for row in record["samples"]:
        del row["kld"], row["answer_logprob"]
    with pytest.raises(RecordError, match="lacks 'fidelity'"):
        TrialResult.from_dict(record)
    (tmp_path / "k.json").write_text(json.dumps(record))
    assert TrialCache(tmp_path).get("k") is None


def test_the_trial_cache_stores_the_record_and_treats_half_a_file_as_missing(tmp_path, record):
    cache = TrialCache(tmp_path)
    cache.put("k", TrialResult.from_dict(record))
    assert json.loads((tmp_path / "k.json").read_text()) == record
    assert cache.get("k") == TrialResult.from_dict(record)
    (tmp_path / "half.json").write_text('{"model": "tiny')
    assert cache.get("half") is None and cache.get("absent") is None


def test_study_figures_read_back_what_a_study_keeps_and_nothing_for_a_failed_trial(record):
    result = TrialResult.from_dict(record)
    attrs = json.loads(json.dumps(result.study_attrs()))  # as Optuna stores them
    figures = TrialFigures.from_user_attrs(attrs)
    assert figures.memory == result.memory
    assert (figures.accuracy, figures.accuracy_ci) == (result.accuracy, result.accuracy_ci)
    assert figures.decode_ms_per_token == result.timing.decode_ms_per_token
    assert figures.effective_kv_bits == result.effective_kv_bits
    assert list(figures.samples) == result.samples and figures.perplexity is None
    assert figures.fidelity == result.fidelity is not None
    failed = TrialFigures.from_user_attrs({"config": record["config"], "error": "boom"})
    assert failed == TrialFigures()
