"""Malformed input, table-driven: each case is one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import CLI

GOOD_SPACE = "params:\n  k_bits: [4, 8]\n"

# (name, space YAML or None for the good one, extra args, a word the message must contain)
CASES = [
    ("yaml syntax", "params:\n  k_bits: [4, 8\n", [], "line"),
    ("yaml not a mapping", "- 1\n- 2\n", [], "mapping"),
    ("no params", "name: x\n", [], "params"),
    ("empty params", "params: {}\n", [], "params"),
    ("unknown section", "params:\n  k_bits: 4\nfoo: 1\n", [], "foo"),
    ("unknown knob", "params:\n  k_bitz: [4]\n", [], "k_bitz"),
    ("bad bits", "params:\n  k_bits: [3, 4]\n", [], "line 2"),
    ("bad granularity", "params:\n  k_granularity: per-row\n", [], "k_granularity"),
    ("bad group", "params:\n  k_bits: 4\n  group_size: [48]\n", [], "group_size"),
    ("bad weights", "params:\n  weights: [none, fp4]\n", [], "weights"),
    ("bad prune rate", "params:\n  prune_rate: [0, 0.95]\n", [], "prune_rate"),
    ("awq backend", "params:\n  weights: awq4\n  awq_backend: autoawq\n", [], "line 3"),
    ("nested value", "params:\n  k_bits: [[4]]\n", [], "scalar"),
    ("repeated value", "params:\n  k_bits: [4, 4]\n", [], "twice"),
    ("empty list", "params:\n  k_bits: []\n", [], "k_bits"),
    ("bad baseline", GOOD_SPACE + "baselines:\n  - {k_bits: 5}\n", [], "baselines"),
    ("baseline not mapping", GOOD_SPACE + "baselines:\n  - 4\n", [], "baselines"),
    ("missing space file", None, ["--space", "/no/such/space.yaml"], "not found"),
    ("unknown model", None, ["--model", "no-such-model"], "known models"),
    ("missing gguf", None, ["--model", "/no/such/model.gguf"], "not found"),
    ("unknown sampler", None, ["--sampler", "annealing"], "sampler"),
    ("bad objectives", None, ["--objectives", "accuracy,memory"], "objectives"),
    ("unknown objective", None, ["--objectives", "memory,accuracy,joy"], "objectives"),
    ("no quality objective", None, ["--objectives", "memory,latency"], "accuracy or kld"),
    ("one objective", None, ["--objectives", "kld"], "two or three"),
    ("zero trials", None, ["--trials", "0"], "trials"),
    ("zero workers", None, ["--workers", "0"], "workers"),
    ("negative budget", None, ["--budget-mb", "-5"], "budget"),
    ("non-numeric budget", None, ["--budget-mb", "lots"], "budget"),
    ("tiny context", None, ["--context-length", "10"], "context"),
    ("context beyond model", None, ["--context-length", "100000"], "fit"),
    ("task longer than context", None, ["--task-lengths", "4096"], "exceed"),
    ("bad task lengths", None, ["--task-lengths", "1k"], "task-lengths"),
    ("unknown task", None, ["--tasks", "nope"], "known tasks"),
    ("study with slash", None, ["--study", "a/b"], "study"),
    ("bad storage scheme", None, ["--storage", "mongodb://x"], "storage"),
    ("sqlite with workers", None, ["--storage", "sqlite:///x.db", "--workers", "2"], "SQLite"),
    ("bad dtype", None, ["--dtype", "int3"], "dtype"),
    ("bad storage dtype", None, ["--storage-dtype", "auto"], "storage-dtype"),
    ("unknown flag", None, ["--frobnicate"], "frobnicate"),
]


@pytest.mark.parametrize("name,space,extra,word", CASES, ids=[c[0] for c in CASES])
def test_bad_search_input(tmp_path, name, space, extra, word):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(space if space is not None else GOOD_SPACE)
    args = [
        "search",
        "--model",
        "tiny-llama",
        "--space",
        str(space_file),
        "--trials",
        "2",
        "--context-length",
        "512",
        "--out",
        str(tmp_path / "out"),
        *extra,
    ]
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert word.lower() in lines[0].lower(), lines[0]
    assert not list(Path(tmp_path / "out").rglob("*.parquet"))  # nothing half-written


@pytest.mark.parametrize(
    "args,word",
    [
        (["frontier", "/no/such/study"], "frontier.json"),
        (["report", "/no/such/study"], "frontier.json"),
    ],
)
def test_bad_paths_for_frontier_and_report(args, word):
    done = subprocess.run([*CLI, *args], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert word in done.stderr


def _corrupt_inputs(tmp: Path) -> dict[str, Path]:
    """Malformed model and controller files, written fresh for each run."""
    text = tmp / "text.gguf"
    text.write_text("this is a text file, not a model\n")
    noise = tmp / "noise.gguf"
    noise.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    magic = tmp / "magic.gguf"  # the GGUF magic and version, then noise
    magic.write_bytes(b"GGUF\x03\x00\x00\x00" + noise.read_bytes())
    folder = tmp / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "no_such_arch"}')
    controller = tmp / "controller.pt"
    controller.write_bytes(noise.read_bytes()[:2048])
    return {"text": text, "noise": noise, "magic": magic, "folder": folder, "ctrl": controller}


# (name, eval args with {key} naming a file from _corrupt_inputs, a word the message must contain)
EVAL_CASES = [
    ("gguf that is a text file", ["--model", "{text}"], "GGUF"),
    ("gguf of random bytes", ["--model", "{noise}"], "GGUF"),
    ("gguf magic then random bytes", ["--model", "{magic}"], "GGUF"),
    ("hf folder with unknown model_type", ["--model", "{folder}"], "no_such_arch"),
    (
        "controller file that is not one",
        ["--kv-scheme", "adaptive", "--target-mean-bits", "4", "--controller", "{ctrl}"],
        "controller",
    ),
    ("adaptive with static knobs", ["--kv-scheme", "adaptive", "--prune-rate", "0.5"], "applies"),
]


@pytest.mark.parametrize("name,args,word", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_bad_eval_input(tmp_path, name, args, word):
    files = _corrupt_inputs(tmp_path)
    args = [a.format(**files) for a in args]
    base = ["eval", "--model", "tiny-llama", "--tasks", "niah", "--context-lengths", "256"]
    done = subprocess.run(
        [*CLI, *base, "--samples", "1", *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert word.lower() in lines[0].lower(), lines[0]


def test_bench_peers_without_a_peer_or_a_gguf():
    """`--parts peers` on a tiny model fails in one line: without llama-cpp-python (as in CI) it
    says how to install it; with it, that a built-in model has no GGUF for llama.cpp."""
    args = ["bench", "--model", "tiny-llama", "--parts", "peers", "--context-lengths", "64"]
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "make bench-peers" in lines[0] or "GGUF" in lines[0], lines[0]


def test_a_peer_that_crashes_or_fails_is_one_clear_error(monkeypatch, tmp_path):
    """llama.cpp times in a child process: its death on a signal (an instruction the CPU lacks)
    or its failure becomes a `UserError` naming it, and the bench's process lives on."""
    import sys

    from kvpareto import peers
    from kvpareto.errors import UserError

    def child(code: str) -> None:
        monkeypatch.setattr(peers, "CHILD", [sys.executable, "-c", code])

    job = (tmp_path / "m.gguf", [1, 2, 3], "q4_0", 1, 1, 1)
    child("import os, signal; os.kill(os.getpid(), signal.SIGILL)")
    with pytest.raises(UserError, match="llama.cpp died on SIGILL while decoding with q4_0 KV"):
        peers.decode_rate(*job)
    child(
        "import os, signal, sys; print('out of memory', file=sys.stderr, flush=True); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    with pytest.raises(UserError, match="died on SIGKILL while decoding with q4_0 KV: its last"):
        peers.decode_rate(*job)
    child("import sys; sys.exit('model file not found')")
    with pytest.raises(UserError, match="q4_0 KV: model file not found"):
        peers.decode_rate(*job)
    child("import json, sys; job = json.load(sys.stdin); print(json.dumps({'tokens_per_s': 7.5}))")
    assert peers.decode_rate(*job) == 7.5
