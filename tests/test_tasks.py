"""Generated tasks: determinism, prompt length in the model's tokens, scorers that can fail."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch

from kvpareto.config import Config
from kvpareto.errors import UserError
from kvpareto.evaluation.trial import run_trial
from kvpareto.models.tiny import byte_tokenizer
from kvpareto.tasks import Sample, get_task, niah
from kvpareto.tasks.prose import prose_words
from kvpareto.tasks.qa import token_f1
from kvpareto.tasks.ruler import ListSample
from kvpareto.tasks.text import VOCAB

# Every NIAH variant with every needle kind and haystack, by full name (defaults spelled out).
NIAH = [
    f"{base}:{needle}:{hay}"
    for base in ("niah", "niah-mk", "niah-mv", "niah-mq")
    for needle in ("number", "uuid", "word")
    for hay in ("noise", "prose")
]
TASKS = ["vt", "qa", "cwe", "fwe", *NIAH]


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
    five = ListSample([], "apple bridge candle dragon eagle", listed=tuple(VOCAB))
    assert cwe.score(five, "apple, bridge, candle, dragon, eagle") and not cwe.score(five, "apple")
    assert cwe.score(five, "The words: eagle, apple, dragon, candle, bridge, and then forest")
    assert not cwe.score(five, "apple, bridge, forest, candle, dragon, eagle")


@pytest.mark.parametrize("name", ["cwe", "fwe"])
def test_word_tasks_are_not_passed_by_echoing_the_list(name):
    task = get_task(name)
    tok = byte_tokenizer()
    samples = task.samples(tok, 1024, 40, seed=0)
    cuts = {"first 20": slice(None, 20), "last 20": slice(-20, None), "whole list": slice(None)}
    for cut in cuts.values():
        echoed = [
            task.score(s, " ".join(re.findall(r"\d+\. (\w+)", tok.decode(s.input_ids))[cut]))
            for s in samples
        ]
        assert sum(echoed) / len(echoed) <= 0.1
    assert all(task.score(s, ", ".join(reversed(s.answer.split()))) for s in samples)


def test_multi_needle_scorers_want_every_value_as_a_whole_value():
    mv, mq = get_task("niah-mv"), get_task("niah-mq")
    four = Sample([], "1111111 2222222 3333333 4444444")
    assert mv.score(four, " 4444444, 2222222, 1111111 and 3333333.")
    assert mq.score(four, "1111111\n2222222\n3333333\n4444444\n5555555")  # extras not penalized
    assert not mv.score(four, " 1111111, 2222222, 3333333")
    assert not mq.score(four, " 1111111, 2222222, 3333333, 44444445")  # not a whole value
    assert mv.details(four, " 1111111, 2222222, 3333333") == {"recall": 0.75}


def test_uuid_and_word_needles_match_whole_values_only():
    uuid = "e3e70682-c209-4cac-a29f-6fbed82c07cd"
    passkey = get_task("niah:uuid")
    assert passkey.score(Sample([], uuid), f" {uuid.upper()}.")
    assert not passkey.score(Sample([], uuid), f" a{uuid}") and not passkey.score(
        Sample([], uuid), uuid[:-1]
    )
    words = get_task("niah-mq:word")
    two = Sample([], "amber-falcon misty-otter")
    assert words.score(two, " amber-falcon and misty-otter")
    assert not words.score(two, " amber falcon and misty-otter")
    assert not get_task("niah:word").score(Sample([], "amber-falcon"), " misty-otter, amber-falcon")


def test_token_f1_follows_squad():
    assert token_f1("Kavenbra", "Kavenbra") == 1
    assert token_f1("The town of Kavenbra.", "Kavenbra") == 0.5  # articles and punctuation go
    assert token_f1("kavenbra is a town far away", "Kavenbra") == pytest.approx(1 / 3)
    assert token_f1("Kaven", "Kavenbra") == 0 and token_f1("", "Kavenbra") == 0
    assert token_f1("the red old mill", "old red barn") == pytest.approx(2 / 3)
    f1 = get_task("qa:f1")
    town = Sample([], "Kavenbra")
    assert f1.score(town, " The town of Kavenbra.") and not f1.score(
        town, " Kavenbra is a town far away"
    )
    assert f1.details(town, " The town of Kavenbra.\nMore.") == {"f1": 0.5}


def test_task_options_have_one_canonical_name_and_hash():
    assert get_task("niah:number:noise").name == "niah"
    assert get_task("niah:prose:uuid").name == get_task("niah:uuid:prose").name == "niah:uuid:prose"
    plain = get_task("niah").task_hash([1024], 5, 0)
    assert get_task("niah:number").task_hash([1024], 5, 0) == plain
    assert (
        len(
            {get_task(f"niah{o}").task_hash([1024], 5, 0) for o in ("", ":uuid", ":word", ":prose")}
        )
        == 4
    )
    for bad in ("niah:f1", "niah:uuid:word", "vt:prose", "niah-xx"):
        with pytest.raises(UserError):
            get_task(bad)


def test_the_prose_generator_version_enters_prose_task_hashes(monkeypatch):
    prose, noise = get_task("niah-mv:prose"), get_task("niah-mv")
    before = prose.task_hash([1024], 5, 0), noise.task_hash([1024], 5, 0)
    monkeypatch.setattr(niah, "SOURCE", "kvpareto.tasks.prose v999")
    assert prose.task_hash([1024], 5, 0) != before[0]
    assert noise.task_hash([1024], 5, 0) == before[1]


def test_prose_reads_as_sentences_and_grows_without_changing():
    words = prose_words(4000, "a")
    text = " ".join(words)
    assert prose_words(1000, "a") == words[:1000] and prose_words(1000, "b") != words[:1000]
    sentences = re.findall(r"[A-Z][^.]*\.", text)
    assert len(sentences) > 200 and len(set(sentences)) > 0.8 * len(sentences)
    assert not re.search(r"\d|-|\bkey\b|magic|number", text)


def test_default_niah_prompts_are_unchanged_byte_for_byte():
    """The needle and haystack options must not move the prompts cached results were made on
    (niah v2, niah-mk v1). If this fails on purpose, bump the task's version and the pin."""
    tok = byte_tokenizer()
    pins = {"niah": "35d7eb418bd63869", "niah-mk": "77fcc7f76ab39efd"}
    for name, pin in pins.items():
        ids = [s.input_ids for s in get_task(name).samples(tok, 1024, 3, seed=0)]
        assert hashlib.sha256(repr(ids).encode()).hexdigest()[:16] == pin


@pytest.mark.parametrize("name", ["niah-mv", "niah-mq:uuid:prose", "niah-mv:word:prose"])
def test_multi_needles_start_at_the_depth_and_spread_after_it(name):
    tok = byte_tokenizer()
    for s in get_task(name).samples(tok, 2048, 5, seed=0):
        text = tok.decode(s.input_ids)
        start = text.index("hidden in this text.\n\n") + len("hidden in this text.\n\n")
        doc = text[start : text.index("\n\nWhat are all")]
        needles = list(re.finditer(r"(One of the|The) special magic \w+ for \w+ is: (\S+)\.", doc))
        assert [m[2] for m in needles] == s.answer.split()
        # Depth is measured in the haystack alone: the needles' own text is not part of it.
        skipped = [sum(len(m[0]) + 1 for m in needles[:k]) for k in range(len(needles))]
        hay = len(doc) - skipped[-1] - len(needles[-1][0]) - 1
        where = [(m.start() - cut) / hay for m, cut in zip(needles, skipped, strict=True)]
        # A needle moves back to the start of its sentence, by at most the longest one (and depth
        # counts words, this counts characters).
        slack = max(len(sentence) for sentence in re.findall(r"[^.]+\.", doc)) / hay
        assert abs(where[0] - s.meta["depth"]) <= slack
        gaps = [b - a for a, b in zip(where, where[1:], strict=False)]
        assert all(abs(g - (1 - s.meta["depth"]) / 4) <= slack for g in gaps)


def test_trials_leave_room_for_the_longest_answer(tiny_models):
    tiny = tiny_models["tiny-llama"]
    with pytest.raises(UserError, match="room for the answer"):
        run_trial(tiny, Config(), ["niah", "niah-mq:uuid"], [4096 - 100], 1, seed=0)


def test_smollm2_finds_the_needle_at_every_depth(smollm2):
    result = run_trial(smollm2, Config(), ["niah"], [1024, 2048], samples=5, seed=0)
    assert result.tasks["niah"].accuracy >= 0.9
    assert len({s["depth"] for s in result.samples}) == 5


def test_a_random_tiny_model_fails_the_same_needles(tiny_models):
    result = run_trial(tiny_models["tiny-llama"], Config(), ["niah"], [1024, 2048], 5, seed=0)
    assert result.tasks["niah"].accuracy <= 0.1


def test_a_random_tiny_model_fails_every_needle_kind_and_records_details(tiny_models):
    names = ["niah:uuid", "niah:word:prose", "niah-mv", "niah-mq:word", "qa:f1"]
    result = run_trial(tiny_models["tiny-llama"], Config(), names, [1024], 5, seed=0)
    assert all(result.tasks[name].accuracy <= 0.1 for name in names)
    outcomes = result.samples
    assert all("f1" in s for s in outcomes if s["task"] == "qa:f1")
    assert all("recall" in s and "depth" in s for s in outcomes if s["task"] == "niah-mv")


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
