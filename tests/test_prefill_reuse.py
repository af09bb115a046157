"""Prefill reuse: a replayed one-chunk prefill leaves the cache, and so every decoded token, exactly
as a cold prefill would; configs whose forward pass depends on the cache are never replayed."""

from __future__ import annotations

import pytest
import torch

from kvpareto.config import Config
from kvpareto.engine import generate
from kvpareto.evaluation.trial import run_trial
from kvpareto.prefill_reuse import STORE, PrefillStore, _Record, reusable
from tests.conftest import TINY

RECORDER = Config(k_bits=8, v_bits=8)  # any reusable config records the prompt's forward pass
REPLAYED = [
    Config(k_bits=4, v_bits=2, k_granularity="per-channel", residual_length=32),
    Config(k_bits=2, v_bits=2, rotation="hadamard", k_smooth=True, group_size=32),
    Config(k_bits=4, v_bits=4, k_granularity="per-block", v_granularity="per-tensor"),
    Config(weights="none", chunk_size=4096),  # a chunk longer than the prompt is one chunk
]


def _prompt(n: int = 160) -> torch.Tensor:
    return torch.randint(3, 250, (1, n), generator=torch.Generator().manual_seed(n))


def _cache_state(cache) -> list[torch.Tensor]:
    """What each stream holds, in order: packed tiles, tail, mean. Not the unfilled rows of its
    blocks, which are never read (their bytes are compared through `nbytes`)."""
    held = []
    for layer in cache.layers:
        for s in (layer.k, layer.v):
            held += [] if s.packed is None else s.packed.tensors()
            held += [s.tail] + ([] if s.mean is None else [s.mean])
    return held


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("config", REPLAYED, ids=[c.label() for c in REPLAYED])
def test_replayed_prefill_gives_the_cold_cache_and_tokens_bit_for_bit(tiny_models, name, config):
    loaded, ids = tiny_models[name], _prompt()
    STORE.clear()
    cold = generate(loaded.model, loaded.tokenizer, ids, config, max_new_tokens=12)
    STORE.clear()
    generate(loaded.model, loaded.tokenizer, ids, RECORDER, max_new_tokens=1)
    warm = generate(loaded.model, loaded.tokenizer, ids, config, max_new_tokens=12)
    assert not cold.prefill_reused and warm.prefill_reused
    assert warm.new_tokens == cold.new_tokens
    assert warm.kv_bytes_after_prefill == cold.kv_bytes_after_prefill
    assert warm.cache.peak_nbytes == cold.cache.peak_nbytes
    ours, theirs = _cache_state(warm.cache), _cache_state(cold.cache)
    assert len(ours) == len(theirs)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert warm.cache.nbytes() == cold.cache.nbytes()


@pytest.mark.parametrize(
    "config,tokens,expected",
    [
        (Config(k_bits=4, v_bits=4), 512, True),
        (Config(k_bits=4, v_bits=4, chunk_size=512), 512, True),
        (Config(k_bits=4, v_bits=4, chunk_size=256), 512, False),  # later chunks read the store
        (Config(k_bits=4, v_bits=4, prune_rate=0.5), 512, False),  # scorers see the queries
        (Config(kv_scheme="adaptive", target_mean_bits=4.0), 512, False),  # features see attention
    ],
)
def test_only_one_chunk_static_unpruned_prefills_are_reusable(config, tokens, expected):
    assert reusable(config, tokens) is expected


def test_a_chunked_prefill_is_never_replayed(tiny_models):
    loaded, ids = tiny_models["tiny-llama"], _prompt()
    STORE.clear()
    generate(loaded.model, loaded.tokenizer, ids, RECORDER, max_new_tokens=1)
    chunked = generate(loaded.model, loaded.tokenizer, ids, Config(k_bits=4, chunk_size=64), 2)
    assert not chunked.prefill_reused


def test_a_trial_with_reuse_equals_the_cold_trial_but_for_timing(tiny_models, monkeypatch):
    loaded = tiny_models["tiny-qwen2"]
    config = Config(k_bits=2, v_bits=4, k_granularity="per-channel", residual_length=16)

    def trial():
        result = run_trial(loaded, config, ["niah", "agreement"], [256], samples=3, seed=1)
        record = result.to_dict()
        return result.timing.prefills_reused, {
            k: v for k, v in record.items() if k not in ("timing", "when")
        }

    STORE.clear()
    with monkeypatch.context() as m:
        m.setattr(STORE, "limit", 0)  # records nothing: every prefill runs cold
        reused_cold, cold = trial()
    run_trial(loaded, Config(), ["niah", "agreement"], [256], samples=3, seed=1)
    reused_warm, warm = trial()
    assert (reused_cold, reused_warm) == (0, 6)
    assert warm == cold


def test_the_store_keeps_within_its_byte_limit_dropping_the_least_recently_used():
    record = _Record([(torch.zeros(100), torch.zeros(100))], torch.zeros(50), 0.1)  # 1000 bytes
    store, model = PrefillStore(limit_bytes=2500), torch.nn.Linear(1, 1)
    store.put(model, (1,), record)
    store.put(model, (2,), record)
    assert store.get(model, (1,)) is record  # (1,) is now the most recently used
    store.put(model, (3,), record)
    assert store.get(model, (2,)) is None
    assert store.get(model, (1,)) is record and store.get(model, (3,)) is record
    assert store.get(torch.nn.Linear(1, 1), (1,)) is None  # another model never matches
