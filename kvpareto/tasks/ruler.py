"""More RULER-style tasks, generated: common-words and frequent-words extraction (RULER's NIAH
variants, multi-key among them, live in `tasks.niah`).

- `cwe` (common words extraction): a numbered list of words in which five words appear many times
  and the rest once or twice; name the five most common. Passes when all five are named.
- `fwe` (frequent words extraction): coded words with falling frequencies (6:3:2:1 per block);
  name the three most frequent. Passes when all three are named.
Prompts are sized in the model's own tokens like every task (`tasks.text.fit`).
"""

from __future__ import annotations

import random
import re
import string

from kvpareto.tasks import Sample, Task, register_task
from kvpareto.tasks.text import VOCAB, fit, format_prompt


def _code(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=5))


class _WordCount(Task):
    """Shared shape of cwe and fwe: a list of words, the top-k to name, pass when all are named."""

    top = 3
    max_new_tokens = 40

    def words(self, rng: random.Random, length: int) -> tuple[list[str], list[str]]:
        raise NotImplementedError

    def samples(self, tokenizer, context_length: int, n: int, seed: int) -> list[Sample]:
        rng = random.Random(f"{self.name}-{seed}-{context_length}")
        out = []
        for i in range(n):
            stream, answer = self.words(rng, context_length)
            question = (
                f"\n\nWhat are the {self.top} words that appear most often in the list above? "
                "Answer with the words only."
            )

            def build(count, stream=stream, question=question):
                listed = " ".join(f"{j + 1}. {w}" for j, w in enumerate(stream[:count]))
                return format_prompt(
                    tokenizer,
                    "Below is a numbered list of words.\n\n" + listed + question,
                    "The most common words are:",
                )

            _, ids = fit(build, context_length, self.name)
            out.append(
                Sample(ids, " ".join(answer), {"context_length": context_length, "index": i})
            )
        return out

    def score(self, sample: Sample, output: str) -> bool:
        named = set(re.findall(r"[a-z]+", output.lower()))
        return set(sample.answer.split()) <= named


@register_task("cwe")
class CommonWords(_WordCount):
    version = 1
    top = 5

    def words(self, rng, length):
        common = rng.sample(VOCAB, self.top)
        rare = [w for w in VOCAB if w not in common]
        # Enough items to overfill any prompt; the fit keeps a prefix. The common words are dealt
        # evenly through the whole stream so that every prefix keeps them the most frequent.
        stream = []
        while len(stream) < length:
            block = common + rng.sample(rare, 2 * self.top)
            rng.shuffle(block)
            stream += block
        return stream, common


@register_task("fwe")
class FrequentWords(_WordCount):
    version = 1
    top = 3

    def words(self, rng, length):
        codes = [_code(rng) for _ in range(30)]
        # Zipf-like but with a guaranteed order: each shuffled block holds the top three codes
        # 6, 3 and 2 times and eight others once, so after two blocks the top three are strict.
        stream = []
        while len(stream) < length:
            block = [codes[0]] * 6 + [codes[1]] * 3 + [codes[2]] * 2 + rng.sample(codes[3:], 8)
            rng.shuffle(block)
            stream += block
        return stream, codes[: self.top]
