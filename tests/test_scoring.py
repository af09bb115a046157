"""Teacher-forced scoring (perplexity, lm-eval loglikelihoods) reads the cache as decoding does."""

from __future__ import annotations

import pytest
import torch

from kvpareto.config import Config
from kvpareto.engine import prefill, score_tokens, scoring_block
from kvpareto.hf_compat import with_cache
from kvpareto.kv import make_cache


def _token_by_token(model, ids: torch.Tensor, config: Config, start: int) -> torch.Tensor:
    """Log-probabilities of ids[start:] as greedy decoding would see them: one token a step."""
    cache = make_cache(model, config, next(model.parameters()).dtype, prompt_length=start)
    logits = [prefill(model, ids[:, :start], cache, config.chunk_size)[0]]
    for t in range(start, ids.shape[1] - 1):
        logits.append(model(ids[:, t : t + 1], **with_cache(cache), use_cache=True).logits[0, -1])
    logprobs = torch.stack(logits).float().log_softmax(-1)
    return logprobs.gather(-1, ids[0, start:, None])[:, 0]


@pytest.mark.parametrize(
    "config",
    [Config(k_bits=4, v_bits=4), Config(k_bits=2, v_bits=2, chunk_size=32)],
    ids=["k4v4", "k2v2-c32"],
)
def test_residual_length_0_scores_exactly_as_token_by_token_decoding(tiny_models, config):
    model = tiny_models["tiny-llama"].model
    ids = torch.randint(3, 200, (1, 160), generator=torch.Generator().manual_seed(0))
    logprobs, _ = score_tokens(model, ids, config, start=64)
    assert torch.equal(logprobs, _token_by_token(model, ids, config, start=64))


def test_blocks_are_no_longer_than_the_residual_window_unless_the_cache_is_lossless():
    assert scoring_block(Config(k_bits=4, v_bits=2), 30) == 1
    assert scoring_block(Config(k_bits=4, v_bits=2, residual_length=32), 30) == 32
    assert scoring_block(Config(kv_scheme="adaptive", target_mean_bits=4.0), 30) == 1
    assert scoring_block(Config(), 30) == 0  # 16 bits hold every token exactly: one block
    assert scoring_block(Config(kv_scheme="rule", target_mean_bits=16.0), 30) == 0
