"""Passkey retrieval (Needle-in-a-Haystack, single needle, "noise" haystack).

The haystack is the classic repeated filler; the needle is a seeded 5-digit pass key placed at a
depth (the fraction of the haystack before it) that sweeps evenly from 0% to 100% across the n
samples. The prompt is sized in the model's own tokens: the filler is repeated until the whole
chat-formatted prompt reaches the target length (within 1%).
Scoring is exact match: the first number in the generated answer must equal the pass key.
"""

from __future__ import annotations

import random
import re

from kvpareto.errors import UserError
from kvpareto.tasks import Sample, Task, register_task

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it.\n\n"
QUESTION = "\n\nWhat is the pass key? Answer with the number only."


def _format(tokenizer, content: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
        )
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return list(ids) + tokenizer.encode("The pass key is", add_special_tokens=False)
    return tokenizer.encode(content + "\nThe pass key is", add_special_tokens=False)


@register_task("niah")
class PasskeyNIAH(Task):
    version = 1
    max_new_tokens = 8

    def samples(self, tokenizer, context_length: int, n: int, seed: int) -> list[Sample]:
        rng = random.Random(f"niah-{seed}-{context_length}")
        filler_tokens = len(tokenizer.encode(FILLER, add_special_tokens=False))
        out = []
        for i in range(n):
            key = str(rng.randint(10000, 99999))
            depth = i / (n - 1) if n > 1 else 0.5
            needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
            fixed = len(_format(tokenizer, INTRO + needle + QUESTION))
            units = (context_length - fixed) // filler_tokens
            if units < 1:
                raise UserError(f"context length {context_length} is too short for the niah task")
            before = round(depth * units)
            ids = _format(
                tokenizer, INTRO + FILLER * before + needle + FILLER * (units - before) + QUESTION
            )
            # Pad with single filler words to land on the target, since units are coarse.
            words = FILLER.split()
            pad = 0
            while pad < len(words) and len(ids) < context_length - filler_tokens // 4:
                pad += 1
                ids = _format(
                    tokenizer,
                    INTRO
                    + FILLER * before
                    + needle
                    + FILLER * (units - before)
                    + " ".join(words[:pad])
                    + QUESTION,
                )
            out.append(Sample(ids, key, {"depth": depth, "context_length": context_length}))
        return out

    def score(self, sample: Sample, output: str) -> bool:
        found = re.search(r"\d+", output)
        return bool(found) and found.group() == sample.answer
