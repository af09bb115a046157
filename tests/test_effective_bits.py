"""Effective bits per cached value: the KV bytes (scales, zeros, tail) over the values stored."""

from __future__ import annotations

import pytest
import torch

from kvpareto.config import Config
from kvpareto.engine import prefill
from kvpareto.evaluation.trial import run_trial
from kvpareto.kv import make_cache
from kvpareto.tasks import Task, register_task

# Known answers at 64 tokens: bf16 holds 16 bits a value; int4 per-token in groups of 32 adds an
# fp16 scale and zero (32 bits) per 32 values, 4 + 1 = 5 bits; a 16-token bf16 tail of 64 tokens
# gives (48 x 5 + 16 x 16) / 64 = 7.75.
KNOWN = [
    (Config(), 16.0),
    (Config(k_bits=4, v_bits=4, group_size=32), 5.0),
    (Config(k_bits=4, v_bits=4, group_size=32, residual_length=16), 7.75),
]


@pytest.mark.parametrize("config, bits", KNOWN, ids=["16-bit", "int4-g32", "int4-g32-r16"])
def test_effective_bits_of_a_filled_cache_have_known_answers(tiny_models, config, bits):
    model = tiny_models["tiny-llama"].model
    cache = make_cache(model, config, torch.bfloat16, prompt_length=64)
    prefill(model, torch.arange(3, 67)[None], cache, config.chunk_size)
    assert 8 * cache.nbytes() / cache.stored_values(64) == bits


def test_adaptive_and_pruned_caches_count_what_they_store(tiny_models):
    model = tiny_models["tiny-llama"].model
    forced = make_cache(model, Config(kv_scheme="rule", target_mean_bits=16.0), torch.bfloat16)
    prefill(model, torch.arange(3, 67)[None], forced, 0)
    assert 8 * forced.nbytes() / forced.stored_values(64) == 16.0
    pruned = Config(prune_rate=0.5)
    cache = make_cache(model, pruned, torch.bfloat16, prompt_length=64)
    prefill(model, torch.arange(3, 67)[None], cache, 0)
    kept = sum(layer.k.kept + layer.v.kept for layer in cache.layers)
    assert kept < 2 * 64 * len(cache.layers)
    assert cache.stored_values(64) == kept * cache.kv_heads * cache.head_dim
    # Each stream keeps 36 tokens (4 sinks and the 32-token question outvote the 50% budget) in
    # room for whole blocks of 16 tokens, 48: the unfilled rows are bytes held too.
    assert {layer.k.kept for layer in cache.layers} == {36}
    assert 8 * cache.nbytes() / cache.stored_values(64) == 16.0 * 48 / 36


@register_task("nothing")  # for the whole session: a name no real task takes
class _Nothing(Task):
    """A task that runs itself and asks nothing of the model, so a trial measures memory only."""

    def evaluate(self, loaded, config, context_length, n, seed):
        return [1.0] * n


@pytest.mark.parametrize("config, bits", [KNOWN[0], KNOWN[1]], ids=["16-bit", "int4-g32"])
def test_trials_report_effective_kv_bits(tiny_models, config, bits):
    result = run_trial(tiny_models["tiny-llama"], config, ["nothing"], [64], 1, seed=0)
    assert result.effective_kv_bits == bits
