"""`kvpareto eval`: its JSON contract and its handling of bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "kvpareto.cli"]


def _run(*args):
    return subprocess.run([*CLI, *args], capture_output=True, text=True)


def test_eval_json_carries_config_label_accuracy_memory_and_timing(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("k_bits: 4\nv_bits: 2\nresidual_length: 16\n")
    done = _run(
        "eval",
        "--model",
        "tiny-llama",
        "--config",
        str(cfg),
        "--chunk-size",
        "64",
        "--context-lengths",
        "400,512",
        "--samples",
        "2",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert r["label"] == "w16-k4v2-tok-g32-r16-c64"
    assert r["config"]["k_bits"] == 4 and r["config"]["chunk_size"] == 64
    assert 0 <= r["accuracy"] <= 1 and r["n"] == 4
    lo, hi = r["accuracy_ci"]
    assert lo <= r["accuracy"] <= hi
    parts = ("weights_bytes", "kv_bytes", "activation_peak_bytes", "total_bytes")
    for key in parts:
        assert r["memory"][key] > 0 and r["memory"]["modeled"][key] > 0
    assert r["memory"]["total_bytes"] == sum(r["memory"][k] for k in parts[:3])
    assert r["memory"]["kv_bytes"] == r["memory"]["modeled"]["kv_bytes"]
    assert r["timing"]["prefill_tokens_per_s"] > 0


def test_random_tiny_model_fails_the_pass_key_task():
    done = _run(
        "eval", "--model", "tiny-llama", "--context-lengths", "512", "--samples", "4", "--json"
    )
    assert json.loads(done.stdout)["accuracy"] <= 0.25


@pytest.mark.parametrize(
    "args",
    [
        ["--k-bits", "3"],
        ["--v-bits", "x"],
        ["--k-granularity", "per-row"],
        ["--group-size", "48"],
        ["--residual-length", "-1"],
        ["--rotation", "givens"],
        ["--chunk-size", "-5"],
        ["--context-lengths", "1k"],
        ["--samples", "0"],
        ["--tasks", "nope"],
        ["--dtype", "int8"],
        ["--config", "/no/such.yaml"],
        ["--frobnicate"],
        ["--context-lengths", "100000"],
    ],
)
def test_bad_eval_input_is_one_line_and_exit_code_2(args):
    done = _run("eval", "--model", "tiny-llama", *args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_malformed_config_file_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("k_bits: 4\nv_bits: [2\n")
    done = _run("eval", "--model", "tiny-llama", "--config", str(bad))
    assert done.returncode == 2 and "line" in done.stderr
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("k_bitz: 4\n")
    done = _run("eval", "--model", "tiny-llama", "--config", str(unknown))
    assert done.returncode == 2 and "k_bitz" in done.stderr
