"""Agreement with the unquantized model: does the greedy continuation stay the same?

Each prompt is seeded filler prose with random numbers mixed in; the expected answer is what the
same model generates with a 16-bit cache (filled in by the trial runner). A sample scores when the
first `max_new_tokens` generated tokens decode to the same text. This measures fidelity, not
knowledge, so it separates configurations even on random-init models, where every real task
scores zero: the smoke search uses it for that reason.
"""

from __future__ import annotations

import random

from kvpareto.tasks import Sample, Task, register_task

_WORDS = (
    "river",
    "stone",
    "lamp",
    "orchard",
    "window",
    "copper",
    "meadow",
    "lantern",
    "harbor",
    "signal",
    "winter",
    "garden",
    "paper",
    "bridge",
    "candle",
    "thunder",
    "violet",
    "engine",
    "silver",
    "forest",
)


@register_task("agreement")
class Agreement(Task):
    version = 1
    max_new_tokens = 8
    needs_reference = True

    def samples(self, tokenizer, context_length: int, n: int, seed: int) -> list[Sample]:
        rng = random.Random(f"agreement-{seed}-{context_length}")
        out = []
        for i in range(n):
            ids: list[int] = []
            while len(ids) < context_length:
                word = rng.choice(_WORDS) if rng.random() < 0.8 else str(rng.randint(0, 9999))
                ids += tokenizer.encode(word + " ", add_special_tokens=False)
            out.append(
                Sample(ids[:context_length], "", {"context_length": context_length, "index": i})
            )
        return out

    def score(self, sample: Sample, output: str) -> bool:
        return output == sample.answer
