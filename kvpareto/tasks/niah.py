"""Passkey retrieval (Needle-in-a-Haystack, single needle, "noise" haystack).

The haystack is the classic repeated filler; the needle is a seeded 5-digit pass key placed at a
depth (the fraction of the haystack before it) that sweeps evenly from 0% to 100% across the n
samples, always between two sentences. The prompt is sized in the model's own tokens (see
`tasks.text.fit`). Scoring is exact match: the first number in the answer must be the pass key.
"""

from __future__ import annotations

import random
import re

from kvpareto.tasks import Sample, Task, register_task
from kvpareto.tasks.text import fit, format_prompt, noise_words, weave

INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it.\n\n"
QUESTION = "\n\nWhat is the pass key? Answer with the number only."


@register_task("niah")
class PasskeyNIAH(Task):
    version = 2
    max_new_tokens = 8

    def samples(self, tokenizer, context_length: int, n: int, seed: int) -> list[Sample]:
        rng = random.Random(f"niah-{seed}-{context_length}")
        out = []
        for i in range(n):
            key = str(rng.randint(10000, 99999))
            depth = i / (n - 1) if n > 1 else 0.5
            needle = f"The pass key is {key}. Remember it. {key} is the pass key."

            def build(words, needle=needle, depth=depth):
                text = weave(noise_words(words), [(round(depth * words), needle)])
                return format_prompt(tokenizer, INTRO + text + QUESTION, "The pass key is")

            _, ids = fit(build, context_length, self.name)
            out.append(Sample(ids, key, {"depth": depth, "context_length": context_length}))
        return out

    def score(self, sample: Sample, output: str) -> bool:
        found = re.search(r"\d+", output)
        return bool(found) and found.group() == sample.answer
