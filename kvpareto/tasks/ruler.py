"""More RULER-style tasks, generated: common-words and frequent-words extraction (RULER's NIAH
variants, multi-key among them, live in `tasks.niah`).

- `cwe` (common words extraction): a numbered list of words in which five words appear ten times
  as often as each of the others (RULER's 30:3); name the five most common.
- `fwe` (frequent words extraction): thirty coded words with Zipf frequencies (the word of rank r
  has weight 1/r); name the three most frequent.
Each list is shuffled as a whole, and the counts are fixed for the list's length, so the asked
words are strictly the most frequent ones in the prompt. A sample passes when the first k
distinct listed words in the answer are exactly the k asked (k = 5 or 3), in any order.
Prompts are sized in the model's own tokens like every task (`tasks.text.fit`).
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

from kvpareto.errors import UserError
from kvpareto.tasks import Sample, Task, register_task
from kvpareto.tasks.text import VOCAB, fit, format_prompt


@dataclass
class ListSample(Sample):
    """A word-count sample, with the words its list is made of (what the scorer looks for)."""

    listed: tuple[str, ...] = ()


def _code(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=5))


def _counts(weights: list[float], n: int) -> list[int]:
    """n items shared in proportion to `weights` (largest remainder; ties to the earlier word)."""
    shares = [n * w / sum(weights) for w in weights]
    counts = [int(s) for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: (counts[i] - shares[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


class _WordCount(Task):
    """Shared shape of cwe and fwe: a shuffled list of words, the top-k to name.

    A subclass gives its words, most frequent first, and their relative frequencies."""

    top = 3
    max_new_tokens = 40

    def vocabulary(self, rng: random.Random) -> tuple[list[str], list[float]]:
        raise NotImplementedError

    def samples(self, tokenizer, context_length: int, n: int, seed: int) -> list[Sample]:
        rng = random.Random(f"{self.name}-{seed}-{context_length}")
        question = (
            f"\n\nWhat are the {self.top} words that appear most often in the list above? "
            "Answer with the words only."
        )
        out = []
        for i in range(n):
            words, weights = self.vocabulary(rng)
            shuffle_seed = rng.random()

            def build(count, words=words, weights=weights, shuffle_seed=shuffle_seed):
                listed = _shuffled(words, _counts(weights, count), shuffle_seed)
                return format_prompt(
                    tokenizer,
                    "Below is a numbered list of words.\n\n"
                    + " ".join(f"{j + 1}. {w}" for j, w in enumerate(listed))
                    + question,
                    "The most common words are:",
                )

            count, ids = fit(build, context_length, self.name)
            counts = _counts(weights, count)
            if counts[self.top - 1] <= counts[self.top]:
                raise UserError(f"context length {context_length} is too short for {self.name}")
            meta = {"context_length": context_length, "index": i}
            out.append(ListSample(ids, " ".join(words[: self.top]), meta, tuple(words)))
        return out

    def score(self, sample: ListSample, output: str) -> bool:
        # Recall alone (RULER's string-match-all) passes an answer that copies the list, which
        # holds every word. The question asks for exactly k words, so the first k distinct listed
        # words named are the answer, and anything after them is ignored: copying the list
        # passes only when the shuffle happens to open with the top k, which the frequencies make
        # rare. Words not in the list ("the", "and") are skipped, not counted against it.
        listed = set(sample.listed)
        named: list[str] = []
        for word in re.findall(r"[a-z]+", output.lower()):
            if word in listed and word not in named:
                named.append(word)
        return set(named[: self.top]) == set(sample.answer.split())


def _shuffled(words: list[str], counts: list[int], seed: float) -> list[str]:
    items = [w for w, c in zip(words, counts, strict=True) for _ in range(c)]
    random.Random(seed).shuffle(items)
    return items


@register_task("cwe")
class CommonWords(_WordCount):
    version = 2
    top = 5
    ratio = 10  # RULER's cwe: common words 30 times, the others 3 times

    def vocabulary(self, rng):
        common = rng.sample(VOCAB, self.top)
        rare = [w for w in VOCAB if w not in common]
        return common + rare, [self.ratio] * self.top + [1] * len(rare)


@register_task("fwe")
class FrequentWords(_WordCount):
    version = 2
    top = 3
    size = 30

    def vocabulary(self, rng):
        codes: list[str] = []
        while len(codes) < self.size:
            code = _code(rng)
            if code not in codes:
                codes.append(code)
        # Zipf with exponent 1. RULER's exponent 2 would give the top three 80% of the list, and
        # then a list's first three distinct words are the top three about a quarter of the time.
        return codes, [1 / rank for rank in range(1, self.size + 1)]
