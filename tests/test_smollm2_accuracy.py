"""Accuracy under quantized caches on real weights (SmolLM2, ~1k-token pass-key prompts)."""

from __future__ import annotations

import pytest
import torch

from kvpareto.config import Config
from kvpareto.engine import generate
from kvpareto.evaluation.trial import run_trial
from kvpareto.stats import mcnemar_exact, wilson
from kvpareto.tasks import get_task

KIVI = Config(
    k_bits=2, v_bits=2, k_granularity="per-channel", v_granularity="per-token", residual_length=32
)
PER_TOKEN_2BIT = Config(
    k_bits=2, v_bits=2, k_granularity="per-token", v_granularity="per-token", residual_length=32
)


SEEDS = (0, 1, 2)  # pooled: one seed's 10 prompts cannot rank the 2-bit schemes (see below)


@pytest.fixture(scope="module")
def prompts(smollm2):
    task = get_task("niah")
    return [s for seed in SEEDS for s in task.samples(smollm2.tokenizer, 1024, 10, seed=seed)]


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
    first = prompts[:10]  # seed 0
    assert sum(baseline[:10]) >= 9
    k8v8 = _answers(smollm2, first, Config(k_bits=8, v_bits=8))
    assert all(q for q, b in zip(k8v8, baseline[:10], strict=True) if b)


@pytest.fixture(scope="module")
def two_bit(smollm2, prompts):
    return _answers(smollm2, prompts, KIVI), _answers(smollm2, prompts, PER_TOKEN_2BIT)


def _paired(a: list[bool], b: list[bool]) -> float:
    """Exact McNemar p for two configs on the same prompts."""
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    return mcnemar_exact(only_a, only_b)


def test_two_bit_caches_measured_against_the_baseline_and_each_other(two_bit, baseline, capsys):
    """A recorded measurement, pooled over seeds 0-2 (30 prompts of ~1k tokens), SmolLM2 bf16 on
    an avx512_bf16 CPU. With the fused decode kernel (the default): 16-bit 30/30, KIVI
    (per-channel keys) 24/30, per-token keys 20/30; KIVI vs per-token McNemar p = 0.29,
    per-token vs 16-bit p = 0.002. On the reference decode path (dequantize + SDPA, whose bf16
    rounding differs): 30/30, 24/30, 22/30, p = 0.73 and 0.008, and seed by seed KIVI/per-token
    9/7, 9/10, 6/5. So KIVI's finding that per-channel keys beat per-token keys at 2 bits does
    not hold with confidence on this model, and one seed's 10 prompts can reverse it: it is
    printed, not asserted. What holds with confidence is asserted: per-token 2-bit keys lose
    answers the 16-bit cache keeps."""
    kivi, per_token = two_bit
    n = len(baseline)
    with capsys.disabled():
        for name, hits in (
            ("16-bit", baseline),
            ("KIVI 2-bit", kivi),
            ("per-token 2-bit", per_token),
        ):
            lo, hi = wilson(sum(hits), n)
            print(
                f"\n[measured] niah@1k, seeds {SEEDS}: {name} {sum(hits)}/{n} [{lo:.2f}, {hi:.2f}]"
            )
        print(f"[measured] KIVI vs per-token, McNemar p = {_paired(kivi, per_token):.3f}")
        print(f"[measured] per-token vs 16-bit, McNemar p = {_paired(per_token, baseline):.3f}")
    assert sum(per_token) < sum(baseline)
    assert _paired(per_token, baseline) < 0.05


def test_smollm2_finds_pass_keys_in_prose_and_uuid_pass_keys(smollm2):
    """The prose haystack and the UUID needle are retrievable by a real model, so a low score on
    them under a quantized cache means lost accuracy, not an impossible prompt. Measured on 10
    depths at 1k: 10/10 for numbers in prose, 8/10 for UUIDs in prose (words in prose: 0/10, as
    the model answers with phrases from the prose; not pinned)."""
    names = ["niah:prose", "niah:uuid:prose"]
    result = run_trial(smollm2, Config(), names, [1024], samples=5, seed=0)
    assert result.tasks["niah:prose"].accuracy >= 0.8
    assert result.tasks["niah:uuid:prose"].accuracy >= 0.6
