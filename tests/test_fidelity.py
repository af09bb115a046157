"""Fidelity to the baseline's answers: the KLD and answer log-probability math on hand-made
distributions, the engine's teacher-forcing along a reference answer, and a trial's figures."""

from __future__ import annotations

import math

import pytest
import torch

from kvpareto.config import Config
from kvpareto.engine import generate, score_tokens
from kvpareto.evaluation.trial import run_trial
from kvpareto.fidelity import Reference, compare


def _logs(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log()


def test_identical_distributions_give_a_kld_of_exactly_zero():
    rows = torch.randn(5, 320, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    reference = Reference.from_logprobs([3, 1, 4, 1, 5], rows)
    fidelity = compare(reference, rows)
    assert fidelity.kld == 0.0
    assert fidelity.answer_logprob == pytest.approx(float(rows[range(5), [3, 1, 4, 1, 5]].sum()))


def test_kld_known_answers_over_the_top_k_and_the_rest():
    # A reference holds float32 log-probabilities: known answers to float32 precision.
    p, q = _logs([0.5, 0.3, 0.2]), _logs([0.4, 0.4, 0.2])
    full = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4)
    # k = 3 is the whole vocabulary; k = 2 leaves a rest that both put 0.2 on: the same KL.
    for k in (3, 2):
        assert compare(Reference.from_logprobs([0], p, k), q).kld == pytest.approx(full, rel=1e-5)
    # k = 1 merges tokens 1 and 2 (0.5 against 0.6): a lower bound of the full KLD.
    merged = Reference.from_logprobs([0], p, k=1)
    coarse = 0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6)
    assert compare(merged, q).kld == pytest.approx(coarse, rel=1e-5) and coarse < full
    assert merged.rest_mass == pytest.approx(0.5, rel=1e-6)
    assert compare(merged, q).answer_logprob == pytest.approx(math.log(0.4), rel=1e-6)


def test_kld_is_the_mean_over_the_answer_positions():
    p = _logs([0.5, 0.3, 0.2], [0.9, 0.05, 0.05])
    q = _logs([0.4, 0.4, 0.2], [0.9, 0.05, 0.05])
    first = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4)
    fidelity = compare(Reference.from_logprobs([0, 0], p), q)
    assert fidelity.kld == pytest.approx(first / 2, rel=1e-5)
    assert fidelity.answer_logprob == pytest.approx(math.log(0.4) + math.log(0.9), rel=1e-6)


# Configs whose scoring blocks are single tokens, so a forced token reads the cache exactly as
# a decoded one: static with no residual window, the rule scheme, and pruning.
ONE_TOKEN_BLOCKS = [
    Config(k_bits=2, v_bits=2, residual_length=0),
    Config(kv_scheme="rule", target_mean_bits=4.0),
    Config(k_bits=4, v_bits=2, residual_length=0, prune_rate=0.5),
]


@pytest.mark.parametrize("config", ONE_TOKEN_BLOCKS, ids=lambda c: c.label())
@pytest.mark.parametrize("departs_at", [0, 2])
def test_a_departing_reference_is_scored_on_a_fork_as_teacher_forcing_scores_it(
    tiny_models, config, departs_at
):
    loaded = tiny_models["tiny-llama"]
    prompt = torch.randint(3, 259, (1, 96), generator=torch.Generator().manual_seed(1))
    own = generate(loaded.model, loaded.tokenizer, prompt, config, max_new_tokens=6)
    # The reference agrees with the config's own answer up to `departs_at`, then differs.
    follow = own.new_tokens[:departs_at] + [(own.new_tokens[departs_at] + 1) % 256 + 3] + [40, 41]
    gen = generate(loaded.model, loaded.tokenizer, prompt, config, 6, logprobs=True, follow=follow)
    forced, _ = score_tokens(
        loaded.model, torch.cat([prompt, torch.tensor([follow])], 1), config, 96
    )
    along = gen.answer_logprobs.gather(-1, torch.tensor(follow)[:, None])[:, 0]
    torch.testing.assert_close(along, forced.float())
    # Scoring on a fork leaves the config's own answer and its cache as they were.
    assert gen.new_tokens == own.new_tokens and gen.text == own.text
    assert gen.cache.nbytes() == own.cache.nbytes()
    assert gen.cache.get_seq_length() == own.cache.get_seq_length()


def test_the_baseline_config_follows_its_own_answers_with_a_kld_of_exactly_zero(tiny_models):
    result = run_trial(tiny_models["tiny-llama"], Config(), ["agreement", "niah"], [256], 3, seed=0)
    assert [s["kld"] for s in result.samples] == [0.0] * 6
    assert (result.fidelity.kld, result.fidelity.kld_ci, result.fidelity.n) == (0.0, (0.0, 0.0), 6)
    logprobs = [s["answer_logprob"] for s in result.samples]
    assert result.fidelity.answer_logprob == pytest.approx(sum(logprobs) / 6)
    low, high = result.fidelity.answer_logprob_ci
    assert low <= result.fidelity.answer_logprob <= high and all(x < 0 for x in logprobs)


def test_a_lossy_cache_moves_the_distributions_and_a_trial_records_it(tiny_models):
    lossy = Config(k_bits=2, v_bits=2, residual_length=0)
    result = run_trial(tiny_models["tiny-llama"], lossy, ["agreement"], [256], 3, seed=0)
    assert all(s["kld"] > 0 for s in result.samples)
    low, high = result.fidelity.kld_ci
    assert 0 < low <= result.fidelity.kld <= high
