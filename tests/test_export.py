"""`kvpareto export`: kvpareto's own config round-trips; llama.cpp and transformers get the
closest settings and a list of what differs; bad input is one line and exit code 2."""

from __future__ import annotations

import ast
import inspect
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from kvpareto.cli.options import config_file
from kvpareto.config import Config
from kvpareto.errors import UserError
from kvpareto.export import export_point, pick_point
from kvpareto.search.outputs import STUDY_FILES
from tests.conftest import CLI

GOLDEN = Path(__file__).parent / "data" / "golden_smoke"


def _frontier() -> dict:
    return json.loads((GOLDEN / "frontier.json").read_text())


def _study_with(tmp_path: Path, **config) -> tuple[Path, str]:
    """The golden study with its first frontier point made into `config`; (folder, label)."""
    folder = tmp_path / "study"
    folder.mkdir(parents=True)
    for name in STUDY_FILES:
        shutil.copy(GOLDEN / name, folder / name)
    frontier = _frontier()
    made = Config.from_dict(config)
    frontier["frontier"][0].update(config=made.to_dict(), label=made.label())
    (folder / "frontier.json").write_text(json.dumps(frontier))
    return folder, made.label()


def test_json_export_of_every_frontier_point_reads_back_to_its_config_key(tmp_path):
    for entry in _frontier()["frontier"]:
        path = tmp_path / "point.json"
        path.write_text(export_point(GOLDEN, entry["label"], "json"))
        assert Config.from_dict(config_file(path)).key() == entry["config_key"]


def test_eval_runs_an_exported_config_under_its_key(tmp_path):
    label = _frontier()["frontier"][1]["label"]
    path = tmp_path / "point.json"
    path.write_text(export_point(GOLDEN, label, "json"))
    done = subprocess.run(
        [*CLI, "eval", "-m", "tiny-llama", "--config", str(path), "--tasks", "agreement"]
        + ["--context-lengths", "128", "--samples", "1", "--json"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert (result["label"], result["config_key"]) == (
        label,
        _frontier()["frontier"][1]["config_key"],
    )


def _without_knee(frontier: dict) -> dict:
    for entry in frontier["frontier"]:
        entry["knee"] = False
    return frontier


def test_knee_is_the_default_point_and_a_missing_knee_or_label_is_a_user_error():
    frontier = _frontier()
    knees = [e for e in frontier["frontier"] if e["knee"]]
    assert len(knees) == 1 and len(frontier["frontier"]) > 1  # the golden study has a knee
    assert pick_point(frontier, "knee") is knees[0]
    with pytest.raises(UserError, match="no knee"):
        pick_point(_without_knee(frontier), "knee")
    with pytest.raises(UserError, match=frontier["frontier"][-1]["label"]):  # names the choices
        pick_point(frontier, "w16-k3v3")


def test_llama_cpp_gets_the_closest_cache_types_and_each_difference(tmp_path):
    folder, label = _study_with(
        tmp_path, k_bits=4, v_bits=2, residual_length=32, chunk_size=256, weights="int4"
    )
    text = export_point(folder, label, "llama.cpp")
    command = next(line for line in text.splitlines() if "llama-server" in line)
    # asymmetric 4-bit keys keep a minimum per block (q4_1); 2-bit values fall back to q4_0
    assert "-ctk q4_1 -ctv q4_0 -fa on -b 256 -ub 256" in command
    assert command.startswith("LLAMA_ATTN_ROT_DISABLE=1 ")  # measured without rotation
    assert "-c 512" in command  # the study's context length
    for said in ("no 2-bit", "full-precision window", "32 values", "Q4_1", "approximation"):
        assert said in text, said


def test_quantized_embeddings_map_to_token_embd_and_output_types(tmp_path):
    folder, label = _study_with(tmp_path, embed_weights="int4")
    text = export_point(folder, label, "llama.cpp")
    # float decoder weights, int4 tables: only the embedding and output are quantized
    assert "--token-embedding-type q4_1 --output-tensor-type q4_1" in text
    assert "token_embd/output: q4_1" in text
    assert "stay in float (measured int4)" in export_point(folder, label, "transformers")


def test_llama_cpp_keeps_its_rotation_for_a_rotated_point_and_says_what_it_lacks(tmp_path):
    folder, label = _study_with(
        tmp_path, k_bits=8, v_bits=8, k_granularity="per-channel", rotation="hadamard"
    )
    text = export_point(folder, label, "llama.cpp")
    assert "LLAMA_ATTN_ROT_DISABLE" not in text
    assert "-ctk q8_0 -ctv q8_0" in text and "-b 512 -ub 512" in text  # unchunked: one batch
    assert "no per-channel keys" in text and "symmetric" in text
    folder, label = _study_with(tmp_path / "pruned", prune_rate=0.5, k_bits=4, v_bits=4)
    assert "no token pruning" in export_point(folder, label, "llama.cpp")


def _quantized_cache_call(snippet: str) -> dict:
    calls = [
        node
        for node in ast.walk(ast.parse(snippet))
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "QuantizedCache"
    ]
    assert len(calls) == 1
    return {k.arg: k.value for k in calls[0].keywords}


def test_transformers_snippet_uses_the_installed_quantized_cache_arguments(tmp_path):
    from transformers import GenerationConfig, QuantizedCache

    folder, label = _study_with(
        tmp_path, k_bits=4, v_bits=2, k_granularity="per-channel", residual_length=32,
        chunk_size=256,
    )  # fmt: skip
    text = export_point(folder, label, "transformers")
    compile(text, "export.py", "exec")
    args = _quantized_cache_call(text)
    assert set(args) <= set(inspect.signature(QuantizedCache.__init__).parameters)
    values = {k: ast.literal_eval(v) for k, v in args.items() if k != "config"}
    assert values == {
        "backend": "quanto",  # 2 and 4 bits: quanto, which runs on CPU
        "nbits": 4,  # one width for K and V: the wider
        "axis_key": -1,  # per-channel keys
        "axis_value": 0,
        "q_group_size": 32,
        "residual_length": 32,
    }
    assert hasattr(GenerationConfig(), "prefill_chunk_size") and "prefill_chunk_size=256" in text
    assert "one bit-width for K and V" in text and "re-quantizes" in text


def test_transformers_takes_hqq_for_8_bits_and_no_cache_for_16(tmp_path):
    folder, label = _study_with(tmp_path, k_bits=8, v_bits=8)
    values = _quantized_cache_call(export_point(folder, label, "transformers"))
    assert ast.literal_eval(values["backend"]) == "hqq"
    assert ast.literal_eval(values["axis_key"]) == 1  # HQQ groups along the head dim on axis 1
    folder, label = _study_with(tmp_path / "w", weights="int8")
    text = export_point(folder, label, "transformers")
    assert "QuantizedCache(" not in text and "QuantoConfig" in text


CASES = [
    ("no study", ["export", "{tmp}"], "no finished study"),
    ("unknown point", ["export", str(GOLDEN), "--point", "w9"], "no frontier point"),
    ("no knee", ["export", "{tmp}/study"], "no knee"),
    ("bad format", ["export", str(GOLDEN), "--format", "gguf"], "--format"),
]


@pytest.mark.parametrize("name,args,word", CASES, ids=[c[0] for c in CASES])
def test_bad_export_input_is_one_line_and_exit_2(tmp_path, name, args, word):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if name == "no knee":  # a study whose frontier has none
        folder, _ = _study_with(tmp_path)
        frontier = _without_knee(json.loads((folder / "frontier.json").read_text()))
        (folder / "frontier.json").write_text(json.dumps(frontier))
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert len(done.stderr.strip().splitlines()) == 1 and word in done.stderr, done.stderr
