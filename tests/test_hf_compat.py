"""Our model calls follow the installed transformers' name for the cache argument: every KV scheme
runs, and no call warns about a deprecated argument (transformers 5.24 renamed
`past_key_values` to `cache`; .ci/compat runs this against the oldest and newest allowed)."""

from __future__ import annotations

import warnings

import pytest
import torch

from kvpareto.config import Config
from kvpareto.engine import generate, score_tokens
from kvpareto.hf_compat import CACHE_ARG, cache_of, with_cache, without_cache

SCHEMES = {
    "static": Config(k_bits=4, v_bits=2, chunk_size=32),
    "adaptive": Config(kv_scheme="adaptive", target_mean_bits=4.0, chunk_size=32),
    "rule": Config(kv_scheme="rule", target_mean_bits=4.0),
    "pruning": Config(k_bits=4, v_bits=4, prune_rate=0.5, prune_scorer="snapkv", chunk_size=32),
}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_generates_without_a_deprecation_warning(tiny_models, scheme):
    loaded = tiny_models["tiny-llama"]
    ids = torch.randint(3, 200, (1, 96), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        out = generate(loaded.model, loaded.tokenizer, ids, SCHEMES[scheme], max_new_tokens=4)
        score_tokens(loaded.model, ids, SCHEMES[scheme], start=64)
    assert len(out.new_tokens) >= 1
    assert out.cache.get_seq_length() >= 96


def test_hooks_find_the_cache_under_either_name():
    cache = object()
    assert cache_of({"cache": cache}) is cache
    assert cache_of({"past_key_values": cache}) is cache
    assert cache_of({"hidden_states": 1}) is None
    assert without_cache({"cache": cache, "use_cache": True, "x": 1}) == {"x": 1}
    assert with_cache(cache) == {CACHE_ARG: cache}
