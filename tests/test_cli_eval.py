"""`kvpareto eval`: its JSON contract and its handling of bad input."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import CLI


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


def _eval_in_process(*args: str) -> dict:
    from typer.testing import CliRunner

    from kvpareto.cli import app

    done = CliRunner().invoke(
        app,
        ["eval", "--model", "tiny-llama", "--context-lengths", "256", "--samples", "1"]
        + ["--k-bits", "4", "--v-bits", "2", "--chunk-size", "64", "--json", *args],
    )
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


def test_dtype_auto_records_what_it_resolved_to_and_why():
    from kvpareto.hardware import resolve_compute_dtype

    r = _eval_in_process("--dtype", "auto")
    assert r["compute_dtype"] == resolve_compute_dtype("auto").name
    assert r["compute_dtype_requested"] == "auto"
    assert r["compute_dtype_reason"].startswith("auto:")
    assert r["storage_dtype"] == "bfloat16"


def test_fp32_compute_reports_the_memory_of_bf16_storage():
    """The path AVX2-only machines take under auto: computing in fp32 changes no stored byte."""
    fp32, bf16 = _eval_in_process("--dtype", "float32"), _eval_in_process("--dtype", "bf16")
    assert (fp32["compute_dtype"], fp32["storage_dtype"]) == ("float32", "bfloat16")
    assert (bf16["compute_dtype"], bf16["storage_dtype"]) == ("bfloat16", "bfloat16")
    for part in ("weights_bytes", "kv_bytes"):
        assert fp32["memory"][part] == bf16["memory"][part]
        assert fp32["memory"][part] == fp32["memory"]["modeled"][part]
        assert fp32["memory"]["modeled"][part] == bf16["memory"]["modeled"][part]


def test_fp32_storage_holds_twice_the_weight_bytes():
    fp32 = _eval_in_process("--dtype", "float32", "--storage-dtype", "float32")
    bf16 = _eval_in_process("--dtype", "float32")
    # Float weights double; the rotary tables (a few hundred bytes) are fp32 in both.
    assert 1.99 < fp32["memory"]["weights_bytes"] / bf16["memory"]["weights_bytes"] < 2.0


def test_eval_packs_the_token_table_with_embed_weights():
    plain, int8 = _eval_in_process(), _eval_in_process("--embed-weights", "int8")
    assert (
        int8["label"] == "w16-e8-k4v2-tok-g32-r0-c64" and int8["config"]["embed_weights"] == "int8"
    )
    # tiny-llama's tied 320 x 128 table: 2 bytes a value in bf16, 1 plus a 2-byte scale per row.
    saved = 320 * 128 * 2 - 320 * (128 + 2)
    assert int8["memory"]["weights_bytes"] == plain["memory"]["weights_bytes"] - saved
    assert int8["memory"]["weights_bytes"] == int8["memory"]["modeled"]["weights_bytes"]
    assert "embedding" in int8["weights"]["kernels"]


@pytest.mark.parametrize(
    "args",
    [
        ["--embed-weights", "int2"],
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
        ["--storage-dtype", "auto"],
        ["--storage-dtype", "int4"],
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
