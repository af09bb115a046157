"""More RULER-style tasks, generated: multi-key NIAH, common-words and frequent-words extraction.

- `niah-mk`: four needles "The special magic number for <key> is: <value>." at spread depths; the
  question names one key, the other three are distractors. Exact match of the number.
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
from kvpareto.tasks.text import fit, format_prompt, noise_words, weave

_VOCAB = (
    "apple bridge candle dragon eagle forest garden harbor island jungle kettle lantern meadow "
    "needle orchard pepper quarry rabbit saddle timber umbrella velvet walnut yarrow zephyr anchor "
    "barrel cactus dolphin ember falcon glacier hammer igloo jasmine kernel lemon marble nectar "
    "oyster parrot quiver raven spindle tulip vessel willow basket copper"
).split()


def _code(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=5))


@register_task("niah-mk")
class MultiKeyNIAH(Task):
    version = 1
    max_new_tokens = 10

    def samples(self, tokenizer, context_length: int, n: int, seed: int) -> list[Sample]:
        rng = random.Random(f"niah-mk-{seed}-{context_length}")
        out = []
        for i in range(n):
            keys = rng.sample(_VOCAB, 4)
            values = [str(rng.randint(1000000, 9999999)) for _ in keys]
            asked = i % 4
            needles = [
                f"The special magic number for {k} is: {v}."
                for k, v in zip(keys, values, strict=True)
            ]
            question = (
                f"\n\nWhat is the special magic number for {keys[asked]}? "
                "Answer with the number only."
            )

            def build(words, needles=needles, question=question):
                cuts = [(j + 1) * words // 5 for j in range(4)]
                text = "Some special magic numbers are hidden in this text.\n\n" + weave(
                    noise_words(words), list(zip(cuts, needles, strict=True))
                )
                return format_prompt(tokenizer, text + question, "The number is")

            _, ids = fit(build, context_length, self.name)
            out.append(
                Sample(
                    ids, values[asked], {"context_length": context_length, "depth": (asked + 1) / 5}
                )
            )
        return out

    def score(self, sample: Sample, output: str) -> bool:
        found = re.search(r"\d+", output)
        return bool(found) and found.group() == sample.answer


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
        common = rng.sample(_VOCAB, self.top)
        rare = [w for w in _VOCAB if w not in common]
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
