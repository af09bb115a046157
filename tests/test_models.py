"""The model catalog, loading from every source, and the converted-model cache."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from kvpareto.config import Config
from kvpareto.engine import generate
from kvpareto.models import CATALOG, load_model, loader
from kvpareto.models.catalog import DEFAULT_MODEL
from kvpareto.tasks import get_task
from tests.conftest import CLI, TINY


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_loads_runs_and_matches_its_catalog_entry(name):
    loaded = load_model(name)
    spec, cfg = loaded.spec, loaded.model.config
    logits = loaded.model(torch.tensor([[1, 50, 60, 70]])).logits
    assert logits.shape == (1, 4, cfg.vocab_size) and torch.isfinite(logits).all()
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert (spec.layers, spec.heads, spec.kv_heads, spec.head_dim) == (
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    )
    assert spec.params == sum(p.numel() for p in loaded.model.parameters())


def test_tiny_models_are_seeded_and_identical_across_builds():
    a, b = load_model("tiny-llama"), load_model("tiny-llama")
    assert a.model_hash == b.model_hash
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_the_cli_default_model_is_the_catalog_default():
    from kvpareto.cli import options

    assert options.DEFAULT_MODEL == DEFAULT_MODEL


def test_catalog_json_round_trips_through_the_cli():
    done = subprocess.run([*CLI, "models", "--json"], capture_output=True, text=True, check=True)
    rows = json.loads(done.stdout)
    assert [r["name"] for r in rows] == list(CATALOG)
    for row in rows:
        spec = CATALOG[row["name"]]
        assert {k: row[k] for k in spec.summary()} == spec.summary()
        for key in (
            "name",
            "arch",
            "params",
            "layers",
            "kv_heads",
            "head_dim",
            "max_context",
            "source",
            "installed",
        ):
            assert key in row
    assert {r["name"] for r in rows} >= {
        "smollm2-135m",
        "gemma3-270m",
        "qwen2.5-coder-0.5b",
        "tiny-llama",
        "tiny-qwen2",
        "tiny-mistral",
        "tiny-gemma3",
    }


def test_default_model_facts_match_its_weights(smollm2):
    spec, cfg = CATALOG[DEFAULT_MODEL], smollm2.model.config
    assert (spec.layers, spec.heads, spec.kv_heads, spec.head_dim, spec.hidden) == (
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.hidden_size,
    )
    assert spec.params == sum(p.numel() for p in smollm2.model.parameters())
    assert smollm2.model_hash == spec.gguf.sha256


def test_a_gguf_path_is_converted_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
    gguf = Path(loader.sources.materialize(CATALOG["smollm2-135m"].gguf, tmp_path / "gguf"))
    monkeypatch.setenv("KVPARETO_HOME", str(tmp_path / "home"))
    first = load_model(str(gguf))
    assert first.model_hash == CATALOG["smollm2-135m"].gguf.sha256

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(loader, "_convert_gguf", no_conversion)
    monkeypatch.setattr(loader.precision, "from_gguf", no_conversion)  # its summary is stored
    start = time.perf_counter()
    second = load_model(str(gguf))
    assert second.from_cache and time.perf_counter() - start < 10
    assert first.source_precision.decoder_linears[0].name == "Q4_1"
    assert second.source_precision == first.source_precision
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(first.model(ids).logits, second.model(ids).logits)


def test_smollm2_retrieves_a_pass_key_from_a_1k_token_prompt(smollm2):
    task = get_task("niah")
    sample = task.samples(smollm2.tokenizer, 1024, 3, seed=7)[1]  # needle at 50% depth
    assert 1000 <= len(sample.input_ids) <= 1034
    out = generate(smollm2.model, smollm2.tokenizer, torch.tensor([sample.input_ids]), Config())
    assert task.score(sample, out.text), out.text


def test_an_hf_folder_loads_like_a_catalog_name(tmp_path):
    tiny = load_model("tiny-qwen2")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    ids = torch.tensor([[1, 5, 9]])
    assert torch.equal(tiny.model(ids).logits, again.model(ids).logits)
    assert again.spec.kv_heads == 2 and again.spec.arch == "qwen2"


@pytest.mark.parametrize(
    "args",
    [
        ["models", "pull", "no-such-model"],
        ["eval", "--model", "no-such-model"],
        ["eval", "--model", "/no/such/file.gguf"],
    ],
)
def test_unknown_model_is_one_line_and_exit_code_2(args):
    done = subprocess.run([*CLI, *args], capture_output=True, text=True)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    if "no-such-model" in args:
        assert "smollm2-135m" in done.stderr and "tiny-llama" in done.stderr


def test_concat_locator_joins_parts_whose_pattern_holds_a_colon(tmp_path, monkeypatch):
    """The Qwen locator's part pattern ("part{i:02d}.bin") holds ":" itself; the parts are
    concatenated in order and the result verified."""
    import hashlib
    import importlib

    from kvpareto.models.catalog import PackagedGGUF

    parts = [b"first part;", b"second part"]
    for i, data in enumerate(parts, start=1):
        (tmp_path / f"fake_part{i}" / "data").mkdir(parents=True)
        (tmp_path / f"fake_part{i}" / "__init__.py").write_text("")
        (tmp_path / f"fake_part{i}" / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    gguf = PackagedGGUF(
        packages=(),
        sha256=hashlib.sha256(b"".join(parts)).hexdigest(),
        filename="joined.gguf",
        locator="concat:fake_part:data/part{i:02d}.bin:2",
    )
    assert loader.sources.packages_installed(gguf)
    path = loader.sources.materialize(gguf, tmp_path / "out")
    assert path.read_bytes() == b"".join(parts)
