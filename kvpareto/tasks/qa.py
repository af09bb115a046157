"""Long-document QA over invented entities, with answers at known depths.

The document is a seeded list of facts about invented people ("Orlan Vesk was born in the town
of Tamberlow."); one fact per sample is the asked one, placed at a depth that sweeps 0-100%
across the samples. The other facts are distractors of the same form, so retrieval, not world
knowledge, answers the question. Scored by exact match of the town name.
"""

from __future__ import annotations

import random

from kvpareto.tasks import Sample, Task, register_task
from kvpareto.tasks.text import fit, format_prompt, noise_words

_SYL = ["ka", "lo", "ven", "tor", "mi", "sa", "rel", "dun", "bra", "the", "os", "qui", "nar", "ul"]


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYL) for _ in range(parts)).capitalize()


@register_task("qa")
class EntityQA(Task):
    version = 1
    max_new_tokens = 12

    def samples(self, tokenizer, context_length: int, n: int, seed: int) -> list[Sample]:
        rng = random.Random(f"qa-{seed}-{context_length}")
        out = []
        for i in range(n):
            depth = i / (n - 1) if n > 1 else 0.5
            person, town = f"{_name(rng, 2)} {_name(rng, 2)}", _name(rng, 3)
            fact = f"{person} was born in the town of {town}."
            pool = [
                f"{_name(rng, 2)} {_name(rng, 2)} was born in the town of {_name(rng, 3)}."
                for _ in range(4 * context_length // 10)
            ]
            question = f"\n\nIn which town was {person} born? Answer with the town name only."

            def build(units, pad=0, pool=pool, fact=fact, question=question, depth=depth):
                facts = pool[:units]
                facts.insert(round(depth * units), fact)
                text = "Here are facts about people.\n\n" + " ".join(facts + noise_words(pad))
                return format_prompt(tokenizer, text + question, "Answer:")

            # Whole facts first, then noise words to land within one word of the target.
            units, _ = fit(build, context_length, self.name)
            _, ids = fit(
                lambda pad, units=units, build=build: build(units, pad), context_length, self.name
            )
            out.append(Sample(ids, town, {"context_length": context_length, "depth": depth}))
        return out

    def score(self, sample: Sample, output: str) -> bool:
        words = output.replace(".", " ").split()
        return bool(words) and words[0] == sample.answer
