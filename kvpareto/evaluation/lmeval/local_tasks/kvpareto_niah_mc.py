"""Documents of the `kvpareto_niah_mc` lm-eval task (multi-key NIAH as multiple choice).

Four "special magic numbers", each bound to a key word, sit at seeded depths in the noise
haystack; the question names one key and the choices are all four numbers. Every choice appears
in the document, so recognising a number seen before is worth nothing (chance is 25%): only the
binding of key to number, held in the KV cache across the whole context, picks the right one.
Each document is sized to the target length in the model's own tokens, with room for a choice.
lm-eval calls `documents` with the task's metadata (and, from its command line, the model args).
"""

from __future__ import annotations

import random
from functools import cache

import datasets
from transformers import AutoTokenizer

from kvpareto.tasks.text import fit, noise_words, weave

DOCUMENTS_PER_LENGTH = 100
KEYS = (
    "apple bridge candle dragon eagle forest garden harbor island kettle lantern meadow orchard "
    "pepper rabbit saddle timber velvet walnut willow"
).split()
INTRO = "Some special magic numbers are hidden in the following text. Remember them.\n"
ANSWER_ROOM = 8  # tokens left for the longest choice


def documents(tokenizer=None, max_seq_lengths=(1024,), seed=0, **_) -> dict:
    if not tokenizer:
        raise ValueError(
            "kvpareto_niah_mc sizes its documents in the model's tokens: pass "
            '--metadata \'{"tokenizer": "<model folder>"}\''
        )
    tok = _tokenizer(tokenizer)
    docs = [
        _document(tok, length, random.Random(f"kvpareto_niah_mc-{seed}-{length}-{i}"))
        for length in max_seq_lengths
        for i in range(DOCUMENTS_PER_LENGTH)
    ]
    return {"test": datasets.Dataset.from_list(docs)}


@cache
def _tokenizer(folder: str):
    return AutoTokenizer.from_pretrained(folder)


def _document(tok, length: int, rng: random.Random) -> dict:
    keys = rng.sample(KEYS, 4)
    numbers = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
    depths = sorted(rng.random() for _ in keys)
    asked = rng.randrange(4)
    question = (
        f"\n\nQuestion: What is the special magic number for {keys[asked]} mentioned in the "
        "text above?\nAnswer: The special magic number is"
    )
    needles = [
        f"One of the special magic numbers for {k} is: {n}."
        for k, n in zip(keys, numbers, strict=True)
    ]

    def text(words: int) -> str:
        inserts = [(round(d * words), needle) for d, needle in zip(depths, needles, strict=True)]
        return INTRO + weave(noise_words(words), inserts) + question

    words, _ = fit(lambda n: tok.encode(text(n)), length - ANSWER_ROOM, "kvpareto_niah_mc")
    return {"input": text(words), "choices": numbers, "label": asked, "max_length": length}
