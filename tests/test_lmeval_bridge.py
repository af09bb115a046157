"""The lm-eval bridge and held-out perplexity: both run the model through our cache and engine.

The real-model tests share one SmolLM2 and, within the process, lm-eval's task index (built
once, about 10 s) and RULER's word lists.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvpareto.config import Config
from kvpareto.engine import score_tokens
from kvpareto.errors import UserError
from kvpareto.models import load_model
from kvpareto.search.study import SearchSettings, eval_key
from kvpareto.tasks import get_task, perplexity
from kvpareto.tasks.perplexity import held_out_ids

pytestmark = pytest.mark.slow
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from kvpareto.evaluation.lmeval.bridge import (  # noqa: E402
    KVParetoLM,
    config_from_args,
    evaluate_task,
    tokenizer_folder,
)
from kvpareto.evaluation.lmeval.local_tasks.kvpareto_niah_mc import documents  # noqa: E402
from kvpareto.evaluation.trial import run_trial  # noqa: E402


def _loglikelihoods(lm, pairs) -> list[float]:
    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i)
        for i, pair in enumerate(pairs)
    ]
    return [logprob for logprob, _ in lm.loglikelihood(requests, disable_tqdm=True)]


@pytest.fixture(scope="module")
def long_pairs(smollm2):
    """Two (context, continuation) pairs whose continuation the context determines."""
    text = smollm2.tokenizer.decode(held_out_ids(smollm2.tokenizer, 300, seed=3))
    return [
        (text + "\nThe secret word is tangerine. Again, the secret word is", " tangerine"),
        (text + "\nRemember 48213. The number to remember is", " 48213."),
    ]


def test_loglikelihood_at_16_bits_equals_lm_evals_own_hf_model(long_pairs):
    """Compared in fp32 (weights and KV held in fp32 too: a bf16 KV store would round what
    lm-eval's own model keeps in fp32), where the two paths are the same arithmetic up to
    summation order: measured 1e-4 apart. In bf16 they are two roundings of it, and how far
    those land apart depends on the CPU's kernels: within 0.05 on an AVX-512 EPYC, but on a
    Xeon with AMX lm-eval's own model gave -1.023 and ours -0.942 (chunks of 64) or -0.902
    (one chunk) where fp32 gives -0.986 for both."""
    loaded = load_model("smollm2-135m", dtype=torch.float32)
    plain = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, softmax_dtype="float32")
    ours = KVParetoLM(loaded=loaded, config=Config(chunk_size=64))
    expected = _loglikelihoods(plain, long_pairs)
    assert _loglikelihoods(ours, long_pairs) == pytest.approx(expected, abs=2e-3)


def test_loglikelihood_goes_through_the_quantized_cache(smollm2, long_pairs):
    # HFLM's own path is one cache-less forward: a 2-bit cache could not move its scores. The
    # continuation reads the quantized context even when the context is prefilled in one chunk.
    exact = _loglikelihoods(KVParetoLM(loaded=smollm2, config=Config()), long_pairs)
    coarse = Config(k_bits=2, v_bits=2)
    two_bit = _loglikelihoods(KVParetoLM(loaded=smollm2, config=coarse), long_pairs)
    assert all(abs(a - b) > 0.1 for a, b in zip(exact, two_bit, strict=True))


def test_niah_single_1_runs_offline_under_a_4bit_cache(smollm2):
    k4v4 = Config(k_bits=4, v_bits=4)
    # 16 new tokens hold the 7-digit answer; RULER's own budget of 128 would cost 30 s more here.
    scores = evaluate_task(smollm2, k4v4, "niah_single_1", 1024, 5, 0, max_gen_toks=16)
    assert len(scores) == 5
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert sum(scores) / len(scores) >= 0.6  # SmolLM2 finds the single needle at 1k


def test_shipped_multiple_choice_task_runs_through_trial(smollm2):
    result = run_trial(
        smollm2, Config(), ["lm-eval:kvpareto_niah_mc"], [256], 2, 0, perplexity=True
    )
    task = result.tasks["lm-eval:kvpareto_niah_mc"]
    assert task.n == 2 and 0.0 <= task.accuracy <= 1.0
    assert result.accuracy == task.accuracy  # perplexity never enters accuracy
    assert result.perplexity.delta_vs_baseline == pytest.approx(0.0, abs=1e-6)
    assert result.perplexity.tokens == 128


def test_shipped_task_documents_are_seeded(smollm2):
    folder = tokenizer_folder(smollm2)
    first = documents(folder, [256], seed=0)["test"]
    assert first.to_list() == documents(folder, [256], seed=0)["test"].to_list()
    assert first["input"] != documents(folder, [256], seed=1)["test"]["input"]
    doc = first[0]
    assert doc["choices"][doc["label"]] in doc["input"]
    assert all(n in doc["input"] for n in doc["choices"])  # every choice is in the document
    assert 256 - 16 <= len(smollm2.tokenizer.encode(doc["input"])) <= 256


def test_task_needing_a_download_fails_with_one_line(smollm2):
    with pytest.raises(UserError) as failure:
        evaluate_task(smollm2, Config(), "niah_single_2", 1024, 1, 0)
    message = str(failure.value)
    assert "\n" not in message and "offline" in message


def test_unknown_lm_eval_task_is_a_user_error(smollm2):
    with pytest.raises(UserError, match="unknown lm-eval task"):
        evaluate_task(smollm2, Config(), "no_such_task_anywhere", 1024, 1, 0)


def test_lm_eval_task_hash_is_stable_and_covers_lengths_limit_and_seed():
    task = get_task("lm-eval:niah_single_1")
    assert task.runs_itself and not get_task("niah").runs_itself
    base = task.task_hash([1024], 5, 0)
    assert base == get_task("lm-eval:niah_single_1").task_hash([1024], 5, 0)
    others = {
        task.task_hash([2048], 5, 0),
        task.task_hash([1024], 6, 0),
        task.task_hash([1024], 5, 1),
    }
    assert base not in others and len(others) == 3


def test_model_args_become_a_config():
    config = config_from_args({"k_bits": "4", "v_bits": 2, "symmetric": "true", "chunk_size": 256})
    assert config == Config(k_bits=4, v_bits=2, symmetric=True, chunk_size=256)
    with pytest.raises(UserError, match="unknown config key"):
        config_from_args({"kbits": 4})


def test_perplexity_at_16_bits_equals_a_plain_forward_and_2_bits_raise_it(smollm2):
    ids = torch.tensor([held_out_ids(smollm2.tokenizer, 512, seed=0)])
    with torch.no_grad():
        logits = smollm2.model(ids).logits[0, 255:-1].float()  # predicting the second half
    plain = math.exp(-logits.log_softmax(-1).gather(-1, ids[0, 256:, None]).mean().item())

    def ppl(config):
        logprobs, _ = score_tokens(smollm2.model, ids, config, start=256)
        assert len(logprobs) == 256
        return math.exp(-logprobs.mean().item())

    assert ppl(Config()) == pytest.approx(plain, rel=0.01)
    assert ppl(Config(chunk_size=64)) == pytest.approx(plain, rel=0.01)
    assert ppl(Config(k_bits=2, v_bits=2)) > 1.05 * plain


def test_perplexity_enters_the_trial_cache_key():
    settings = SearchSettings("smollm2-135m", "space.yaml", ["niah"], 1024, trials=1)
    with_ppl = SearchSettings(
        "smollm2-135m", "space.yaml", ["niah"], 1024, trials=1, perplexity=True
    )
    assert eval_key(Config(), "m", settings) != eval_key(Config(), "m", with_ppl)


def test_the_python_version_enters_the_perplexity_text_and_the_trial_cache_key(monkeypatch):
    import platform

    settings = SearchSettings(
        "smollm2-135m", "space.yaml", ["niah"], 1024, trials=1, perplexity=True
    )
    here = eval_key(Config(), "m", settings)
    assert platform.python_version() in perplexity.source()
    monkeypatch.setattr(platform, "python_version", lambda: "3.99.0")
    assert "3.99.0" in perplexity.source()
    assert eval_key(Config(), "m", settings) != here


def test_model_args_choose_compute_and_storage_dtypes():
    from kvpareto.hardware import resolve_compute_dtype
    from kvpareto.models.storage_dtype import compute_dtype, storage_dtype

    auto = KVParetoLM(model="tiny-llama").loaded.model
    assert compute_dtype(auto) == getattr(torch, resolve_compute_dtype("auto").name)
    assert storage_dtype(auto) == torch.bfloat16
    fp32 = KVParetoLM(model="tiny-llama", dtype="float32").loaded.model
    assert (compute_dtype(fp32), storage_dtype(fp32)) == (torch.float32, torch.bfloat16)
    with pytest.raises(UserError, match="storage_dtype"):
        KVParetoLM(model="tiny-llama", storage_dtype="auto")
