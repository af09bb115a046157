"""Generated tasks: determinism, prompt length in the model's tokens, scorers that can fail."""

from __future__ import annotations

import pytest
import torch

from kvpareto.config import Config
from kvpareto.models.tiny import byte_tokenizer
from kvpareto.tasks import Sample, get_task
from kvpareto.trial import run_trial

TASKS = ["niah", "vt", "qa", "niah-mk", "cwe", "fwe"]


@pytest.mark.parametrize("name", TASKS)
def test_same_seed_same_prompts_different_seed_different_answers(name):
    tok = byte_tokenizer()
    task = get_task(name)
    a, b = task.samples(tok, 1024, 4, seed=1), task.samples(tok, 1024, 4, seed=1)
    c = task.samples(tok, 1024, 4, seed=2)
    assert [s.input_ids for s in a] == [s.input_ids for s in b]
    assert [s.answer for s in a] != [s.answer for s in c]
    assert task.task_hash([1024], 4, 1) != task.task_hash([1024], 4, 2)


@pytest.mark.parametrize("name", TASKS)
@pytest.mark.parametrize("length", [1024, 4096])
def test_prompt_lengths_are_within_one_percent(smollm2, name, length):
    for tok in (smollm2.tokenizer, byte_tokenizer()):
        for sample in get_task(name).samples(tok, length, 3, seed=0):
            assert abs(len(sample.input_ids) - length) <= 0.01 * length
            assert len(sample.input_ids) <= length


def test_scorers_reject_wrong_answers():
    niah, vt, qa = (get_task(n) for n in ("niah", "vt", "qa"))
    assert niah.score(Sample([], "12345"), " 12345.") and not niah.score(
        Sample([], "12345"), "1234"
    )
    chain = Sample([], "ABCDE FGHIJ KLMNO")
    assert vt.score(chain, "ABCDE, FGHIJ and KLMNO") and not vt.score(chain, "ABCDE FGHIJ")
    town = Sample([], "Tamlow")
    assert qa.score(town, " Tamlow.") and qa.score(town, "The town of Tamlow.")
    assert (
        not qa.score(town, "Tam")
        and not qa.score(town, "Tamlowe")
        and not qa.score(town, "x\nTamlow")
    )
    cwe = get_task("cwe")
    five = Sample([], "apple bridge candle dragon eagle")
    assert cwe.score(five, "apple, bridge, candle, dragon, eagle") and not cwe.score(five, "apple")


def test_smollm2_finds_the_needle_at_every_depth(smollm2):
    result = run_trial(smollm2, Config(), ["niah"], [1024, 2048], samples=5, seed=0)
    assert result["tasks"]["niah"]["accuracy"] >= 0.9
    assert len({s["depth"] for s in result["samples"]}) == 5


def test_a_random_tiny_model_fails_the_same_needles(tiny_models):
    result = run_trial(tiny_models["tiny-llama"], Config(), ["niah"], [1024, 2048], 5, seed=0)
    assert result["tasks"]["niah"]["accuracy"] <= 0.1


def test_entity_qa_answers_sit_at_their_depths():
    tok = byte_tokenizer()
    samples = get_task("qa").samples(tok, 1024, 5, seed=0)
    for s in samples:
        text = tok.decode(s.input_ids)
        start, end = text.index("Here is a document"), text.index("In which town")
        where = (text.index(f"in the town of {s.answer}.") - start) / (end - start)
        assert abs(where - s.meta["depth"]) < 0.1
    assert torch.tensor([s.meta["depth"] for s in samples]).unique().numel() == 5


@pytest.mark.parametrize("name", ["cwe", "fwe"])
@pytest.mark.parametrize("length", [1024, 4096])
def test_word_tasks_ask_for_the_words_that_really_are_most_frequent(smollm2, name, length):
    import re
    from collections import Counter

    task = get_task(name)
    for s in task.samples(smollm2.tokenizer, length, 3, seed=1):
        text = smollm2.tokenizer.decode(s.input_ids)
        counts = Counter(re.findall(r"\d+\. (\w+)", text)).most_common(task.top + 1)
        assert {w for w, _ in counts[: task.top]} == set(s.answer.split())
        assert counts[task.top - 1][1] > counts[task.top][1]  # no tie at the cut


def test_multikey_niah_asks_one_key_among_distractors():
    tok = byte_tokenizer()
    for s in get_task("niah-mk").samples(tok, 1024, 4, seed=0):
        text = tok.decode(s.input_ids)
        assert text.count("The special magic number for") == 4
        assert f"is: {s.answer}." in text
