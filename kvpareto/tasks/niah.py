"""Needle in a Haystack: pass-key retrieval and RULER's multi-key, multi-value, multi-query.

Every variant is a grid of context lengths x needle depths in gkamradt's convention: depth is the
fraction of the haystack before the needle, sweeping evenly from 0% to 100% across a context
length's samples, and each sample's meta carries `depth` and `context_length` (the report's
heatmaps read them). Needles always sit between two sentences, and prompts are sized in the
model's own tokens (`tasks.text.fit`).

Two options, chosen as name suffixes (`niah-mv:uuid:prose`, see `tasks.get_task`): `needle` is
`number` (default), `uuid` or `word` (`tasks.needles`), and `haystack` is `noise` (default, the
repeated filler) or `prose` (generated, `tasks.prose`). The defaults give the prompts these tasks
had before the options existed, byte for byte.

- `niah`: one pass key. Passes when the first value of the needle's shape in the answer is it.
- `niah-mk` (multi-key): four needles "The special magic number for <key> is: <value>." at 20, 40,
  60 and 80%; one key is asked (its depth is the sample's), the other three are distractors.
  Passes like `niah`.
- `niah-mv` (multi-value): one key with four values ("One of the special magic numbers for <key>
  is: <value>."); the question asks for all of them.
- `niah-mq` (multi-query): four keys with one value each, all four asked in one question.
The multi-needle variants place their needles as gkamradt's multi-needle tester does: the first
at the sample's depth, the rest evenly spaced after it, so `depth` is the first needle's. They
pass when every expected value is reported, that is, appears in the answer as a whole value of
its shape (RULER's string-match-all, as pass/fail): order does not matter, and other values are
not penalized, since the decode budget leaves room for the answers and little more. The fraction
reported is recorded per sample as `recall`.
"""

from __future__ import annotations

import hashlib
import random

from kvpareto.tasks import Sample, Task, register_task
from kvpareto.tasks.needles import KINDS, Needle, needle_kind
from kvpareto.tasks.prose import SOURCE
from kvpareto.tasks.text import HAYSTACKS, VOCAB, fit, format_prompt, haystack, weave

INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it.\n\n"
QUESTION = "\n\nWhat is the pass key? Answer with the {noun} only."


class _NIAH(Task):
    """What every variant shares: the needle and haystack options and their scoring."""

    options = {"needle": KINDS, "haystack": HAYSTACKS}
    digits = 7  # the size of number needles

    @property
    def kind(self) -> Needle:
        return needle_kind(self.needle, self.digits)

    def hay(self, words: int, seed: int, context_length: int, index: int) -> list[str]:
        return haystack(self.haystack, words, f"{self.name}-{seed}-{context_length}-{index}")

    def task_hash(self, context_lengths: list[int], n: int, seed: int) -> str:
        plain = super().task_hash(context_lengths, n, seed)
        if self.haystack == "noise":
            return plain
        # The prose generator's version is part of what the prompts are made of.
        return hashlib.sha256(f"{plain} {SOURCE}".encode()).hexdigest()[:16]

    def score(self, sample: Sample, output: str) -> bool:
        found = self.kind.found(output)
        return bool(found) and found[0] == sample.answer


@register_task("niah")
class PasskeyNIAH(_NIAH):
    version = 2
    digits = 5

    @property
    def max_new_tokens(self) -> int:
        return self.kind.tokens

    def samples(self, tokenizer, context_length: int, n: int, seed: int) -> list[Sample]:
        rng = random.Random(f"niah-{seed}-{context_length}")
        question = QUESTION.format(noun=self.kind.noun)
        out = []
        for i in range(n):
            key = self.kind.draw(rng)
            depth = i / (n - 1) if n > 1 else 0.5
            needle = f"The pass key is {key}. Remember it. {key} is the pass key."

            def build(words, needle=needle, depth=depth, i=i):
                text = weave(
                    self.hay(words, seed, context_length, i), [(round(depth * words), needle)]
                )
                return format_prompt(tokenizer, INTRO + text + question, "The pass key is")

            _, ids = fit(build, context_length, self.name)
            out.append(Sample(ids, key, {"depth": depth, "context_length": context_length}))
        return out


@register_task("niah-mk")
class MultiKeyNIAH(_NIAH):
    version = 1

    @property
    def max_new_tokens(self) -> int:
        return self.kind.tokens

    def samples(self, tokenizer, context_length: int, n: int, seed: int) -> list[Sample]:
        rng = random.Random(f"niah-mk-{seed}-{context_length}")
        kind = self.kind
        intro = f"Some special magic {kind.nouns} are hidden in this text.\n\n"
        out = []
        for i in range(n):
            keys = rng.sample(VOCAB, 4)
            values = [kind.draw(rng) for _ in keys]
            asked = i % 4
            needles = [
                f"The special magic {kind.noun} for {k} is: {v}."
                for k, v in zip(keys, values, strict=True)
            ]
            question = (
                f"\n\nWhat is the special magic {kind.noun} for {keys[asked]}? "
                f"Answer with the {kind.noun} only."
            )

            def build(words, needles=needles, question=question, i=i):
                cuts = [(j + 1) * words // 5 for j in range(4)]
                hay = self.hay(words, seed, context_length, i)
                text = intro + weave(hay, list(zip(cuts, needles, strict=True)))
                return format_prompt(tokenizer, text + question, f"The {kind.noun} is")

            _, ids = fit(build, context_length, self.name)
            meta = {"context_length": context_length, "depth": (asked + 1) / 5}
            out.append(Sample(ids, values[asked], meta))
        return out


class _AllValuesNIAH(_NIAH):
    """`keys` keys with `values` values each, every key asked: all values must be reported."""

    keys = 1
    values = 1

    @property
    def max_new_tokens(self) -> int:
        return self.kind.tokens * self.keys * self.values

    def samples(self, tokenizer, context_length: int, n: int, seed: int) -> list[Sample]:
        rng = random.Random(f"{type(self).name}-{seed}-{context_length}")
        kind, count = self.kind, self.keys * self.values
        intro = f"Some special magic {kind.nouns} are hidden in this text.\n\n"
        out = []
        for i in range(n):
            depth = i / (n - 1) if n > 1 else 0.5
            keys = rng.sample(VOCAB, self.keys)
            values: list[str] = []
            while len(values) < count:  # distinct, or "all values" would be fewer than asked
                value = kind.draw(rng)
                if value not in values:
                    values.append(value)
            if self.values > 1:
                needles = [
                    f"One of the special magic {kind.nouns} for {keys[0]} is: {v}." for v in values
                ]
            else:
                needles = [
                    f"The special magic {kind.noun} for {k} is: {v}."
                    for k, v in zip(keys, values, strict=True)
                ]
            asked = _listing(rng.sample(keys, len(keys)))
            question = (
                f"\n\nWhat are all the special magic {kind.nouns} for {asked}? "
                f"Answer with the {kind.nouns} only."
            )
            prefix = f"The special magic {kind.nouns} for {asked} are:"
            # gkamradt's multi-needle placement: the first at `depth`, the rest evenly after it.
            spread = [depth + j * (1 - depth) / count for j in range(count)]

            def build(words, needles=needles, question=question, prefix=prefix, spread=spread, i=i):
                cuts = [round(where * words) for where in spread]
                hay = self.hay(words, seed, context_length, i)
                text = intro + weave(hay, list(zip(cuts, needles, strict=True)))
                return format_prompt(tokenizer, text + question, prefix)

            _, ids = fit(build, context_length, self.name)
            meta = {"context_length": context_length, "depth": depth}
            out.append(Sample(ids, " ".join(values), meta))
        return out

    def score(self, sample: Sample, output: str) -> bool:
        return self.recall(sample, output) == 1

    def recall(self, sample: Sample, output: str) -> float:
        expected, found = sample.answer.split(), set(self.kind.found(output))
        return sum(v in found for v in expected) / len(expected)

    def details(self, sample: Sample, output: str) -> dict:
        return {"recall": self.recall(sample, output)}


@register_task("niah-mv")
class MultiValueNIAH(_AllValuesNIAH):
    version = 1
    values = 4


@register_task("niah-mq")
class MultiQueryNIAH(_AllValuesNIAH):
    version = 1
    keys = 4


def _listing(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"
