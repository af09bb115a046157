"""Accuracy under quantized caches on real weights (SmolLM2, ~1k-token pass-key prompts)."""

from __future__ import annotations

import pytest
import torch

from kvpareto.config import Config
from kvpareto.engine import generate
from kvpareto.tasks import get_task
from kvpareto.trial import run_trial

KIVI = Config(
    k_bits=2, v_bits=2, k_granularity="per-channel", v_granularity="per-token", residual_length=32
)
PER_TOKEN_2BIT = Config(
    k_bits=2, v_bits=2, k_granularity="per-token", v_granularity="per-token", residual_length=32
)


@pytest.fixture(scope="module")
def prompts(smollm2):
    return get_task("niah").samples(smollm2.tokenizer, 1024, 10, seed=0)


def _answers(smollm2, prompts, cfg):
    task = get_task("niah")
    outs = [
        generate(smollm2.model, smollm2.tokenizer, torch.tensor([s.input_ids]), cfg, 8).text
        for s in prompts
    ]
    return [task.score(s, o) for s, o in zip(prompts, outs, strict=True)]


@pytest.fixture(scope="module")
def baseline(smollm2, prompts):
    return _answers(smollm2, prompts, Config())


def test_k8v8_per_token_keeps_every_baseline_answer(smollm2, prompts, baseline):
    assert sum(baseline) >= 9
    k8v8 = _answers(smollm2, prompts, Config(k_bits=8, v_bits=8))
    assert all(q for q, b in zip(k8v8, baseline, strict=True) if b)


@pytest.fixture(scope="module")
def two_bit(smollm2, prompts):
    return sum(_answers(smollm2, prompts, KIVI)), sum(_answers(smollm2, prompts, PER_TOKEN_2BIT))


def test_two_bit_caches_lose_accuracy_against_the_baseline(two_bit, baseline):
    kivi, per_token = two_bit
    assert kivi < sum(baseline) or per_token < sum(baseline)


def test_kivi_per_channel_keys_beat_per_token_keys_at_2_bits(two_bit):
    """KIVI's finding, on these 10 prompts (niah v2, seed 0): measured 9/10 vs 7/10. The margin
    is within noise on this model: seed 1 gave 9 vs 10, and the v1 prompts 6 vs 9 (issue #3)."""
    kivi, per_token = two_bit
    assert kivi > per_token


def test_smollm2_finds_pass_keys_in_prose_and_uuid_pass_keys(smollm2):
    """The prose haystack and the UUID needle are retrievable by a real model, so a low score on
    them under a quantized cache means lost accuracy, not an impossible prompt. Measured on 10
    depths at 1k: 10/10 for numbers in prose, 8/10 for UUIDs in prose (words in prose: 0/10, as
    the model answers with phrases from the prose; not pinned)."""
    names = ["niah:prose", "niah:uuid:prose"]
    result = run_trial(smollm2, Config(), names, [1024], samples=5, seed=0)
    assert result["tasks"]["niah:prose"]["accuracy"] >= 0.8
    assert result["tasks"]["niah:uuid:prose"]["accuracy"] >= 0.6
