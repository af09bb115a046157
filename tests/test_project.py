"""`kvpareto project`: a study's frontier at another context length, batch or budget. At the
searched length it is the study's frontier; elsewhere every part is the closed-form model a trial
reports, which `--verify` checks against a trial run at the new length."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from kvpareto.config import Config
from kvpareto.errors import UserError
from kvpareto.memory.projection import modeled_memory, shell_model
from kvpareto.models import load_config
from kvpareto.project import project
from kvpareto.search.outputs import read_study, row_config
from kvpareto.search.study import check_fits
from tests.conftest import CLI

GOLDEN = Path(__file__).parent / "data" / "golden_smoke"


@pytest.fixture(scope="module")
def study():
    return read_study(GOLDEN)


def _memory_at(study, length: int, batch: int = 1):
    shell = shell_model(load_config(study.model)[0])
    facts = study.facts
    dtypes = getattr(torch, facts["compute_dtype"]), getattr(torch, facts["storage_dtype"])
    threads, packs = facts["hardware"]["threads"], facts["hardware"].get("sdpa_packs", False)

    def memory_at(config: Config, weights_bytes: int) -> dict:
        return modeled_memory(
            shell, config, length, weights_bytes, *dtypes, threads, batch, packs
        ).to_dict()

    return memory_at


def _never(config, weights_bytes):
    raise AssertionError("the searched length needs no model")


def test_projecting_to_the_searched_length_reproduces_the_measured_frontier(study):
    projection = project(study, study.context_length, 1, None, _never)
    assert projection.memory == "measured"
    summary = projection.summary
    assert all(e.pop("memory_source") == "measured" for e in summary["frontier"])
    stored = json.loads((GOLDEN / "frontier.json").read_text())
    stored.pop("source_precision")
    assert summary == stored


def test_the_modeled_parts_at_the_searched_length_are_every_trials_modeled_figures(study):
    memory_at = _memory_at(study, study.context_length)
    for row in study.rows:
        parts = memory_at(Config.from_dict(row_config(row)), row["modeled_weights_bytes"])
        assert parts == {part: row[f"modeled_{part}"] for part in parts}, row["label"]


def test_a_longer_context_is_modeled_and_a_batch_multiplies_kv_and_activations(study):
    projection = project(study, 2048, 1, None, _memory_at(study, 2048))
    assert projection.memory == "modeled"
    assert all(e["memory_source"] == "modeled" for e in projection.summary["frontier"])
    kv_searched = {r["config_key"]: r["kv_bytes"] for r in study.rows}
    for e in projection.summary["frontier"]:
        assert e["memory"]["kv_bytes"] > kv_searched[e["config_key"]]
    one, four = _memory_at(study, 2048), _memory_at(study, 2048, batch=4)
    for row in study.rows:
        config, weights = Config.from_dict(row_config(row)), row["modeled_weights_bytes"]
        single, batched = one(config, weights), four(config, weights)
        assert batched["weights_bytes"] == single["weights_bytes"] == weights
        assert batched["kv_bytes"] == 4 * single["kv_bytes"]
        assert batched["activation_peak_bytes"] == 4 * single["activation_peak_bytes"]


def test_a_budget_keeps_the_points_under_it_and_nothing_under_it_is_an_error(study):
    front = project(study, study.context_length, 1, None, _never).summary["frontier"]
    budget = (front[0]["total_bytes"] + front[1]["total_bytes"]) / 2 / 1e6
    kept = project(study, study.context_length, 1, budget, _never).summary
    assert [e["label"] for e in kept["frontier"]] == [front[0]["label"]]
    assert kept["infeasible"] > 0
    with pytest.raises(UserError, match="nothing fits under 1 MB"):
        project(study, study.context_length, 1, 1.0, _never)


def test_a_length_past_the_model_is_a_user_error():
    check_fits("tiny-llama", 4000, 4096)
    with pytest.raises(UserError, match="does not fit tiny-llama"):
        check_fits("tiny-llama", 4090, 4096)


def test_verify_runs_the_most_accurate_points_at_the_new_length(tmp_path):
    """A tiny smoke study, its exported knee-or-first point as a `--baseline`, then a projection
    to another length verified by trials there: each verified trial's modeled total is the
    projected figure, and its measured KV bytes equal the projected ones."""
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"k_bits": 4, "v_bits": 4, "chunk_size": 128}))
    search = [*CLI, "search", "-m", "tiny-llama", "--space", "search_spaces/smoke.yaml"]
    search += ["--tasks", "agreement", "--context-length", "256", "--samples", "2"]
    search += ["--knee-samples", "0"]  # the four trials only
    search += ["--trials", "4", "--baseline", str(baseline), "--out", str(tmp_path), "--study", "s"]
    done = subprocess.run(search, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    folder = tmp_path / "tiny-llama" / "s"
    labels = [r["label"] for r in read_study(folder).rows]
    assert labels[:2] == ["w16-k16v16-c0", "w16-k4v4-tok-g32-r0-c128"]  # then the baseline file
    args = [*CLI, "project", str(folder), "--context-length", "512", "--verify", "2", "--json"]
    args += ["--verify-samples", "1"]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["accuracy_measured_at"] == 256 and result["memory"] == "modeled"
    front = {e["label"]: e for e in result["frontier"]}
    assert len(result["verified"]) == min(2, len(front))
    for checked in result["verified"]:
        projected = front[checked["label"]]
        assert checked["modeled"]["total_bytes"] == projected["total_bytes"]
        assert checked["measured"]["kv_bytes"] == projected["memory"]["kv_bytes"]
        assert 0 <= checked["accuracy"] <= 1
        assert checked["n"] == 1  # --verify-samples, not the study's 2


CASES = [
    ("no study", ["{tmp}", "--context-length", "512"], "no finished study"),
    ("past the model", [str(GOLDEN), "--context-length", "8192"], "does not fit tiny-llama"),
    ("nothing fits", [str(GOLDEN), "--context-length", "512", "--budget-mb", "1"], "nothing fits"),
]


@pytest.mark.parametrize("name,args,word", CASES, ids=[c[0] for c in CASES])
def test_bad_project_input_is_one_line_and_exit_2(tmp_path, name, args, word):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    done = subprocess.run([*CLI, "project", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert len(done.stderr.strip().splitlines()) == 1 and word in done.stderr, done.stderr
