"""Long-document QA over invented entities, with answers at known depths.

The document is the noise haystack with eight facts about people ("Alice Baker was born in the
town of Tamberlow."; the towns are invented, so only the document can answer). One fact per
sample is the asked one, placed at a depth that sweeps 0-100% across the samples; the seven others
are distractors of the same form, spread through the document. Scored on the first line of the
answer, by one of two rules (the `scoring` option: `qa` or `qa:f1`):
- `match` (default), string match as RULER does: the exact town name must appear as a whole word
  ("The town of Kavenbra." passes, "Kaven" does not).
- `f1`, SQuAD's token F1: both texts are lower-cased and stripped of punctuation and of the
  articles a/an/the; F1 is the harmonic mean of the shared tokens' precision and recall. A sample
  passes at F1 >= 0.5, so that trial accuracy stays a fraction with a Wilson interval: "Kavenbra"
  scores 1, "The town of Kavenbra." 0.5 (passes), "Kavenbra is a town far away" 0.33 (fails).
Either way each sample's F1 is recorded in the trial's outcomes as `f1`.
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter

from kvpareto.tasks import Sample, Task, register_task
from kvpareto.tasks.text import fit, format_prompt, noise_words, weave

# People get ordinary, distinct names (a 135M model confuses look-alike invented ones); towns are
# invented, so only the document can answer.
_FIRST = (
    "Alice Bruno Clara Daniel Elena Felix Grace Hugo Irene Jonas Karen Louis Maria Nathan Olivia "
    "Peter Rosa Samuel Teresa Victor Wendy Xavier Yvonne Zachary"
).split()
_LAST = (
    "Adams Baker Carter Dawson Ellis Fischer Garcia Hughes Ingram Jensen Keller Lopez Moreau "
    "Nolan Ortiz Price Quinn Rossi Schmidt Turner Vance Walsh Young Zimmer"
).split()
DISTRACTORS = 7
F1_PASS = 0.5
_SYL = ["ka", "lo", "ven", "tor", "mi", "sa", "rel", "dun", "bra", "the", "os", "qui", "nar", "ul"]


def _person(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"


def _town(rng: random.Random) -> str:
    return "".join(rng.choice(_SYL) for _ in range(3)).capitalize()


@register_task("qa")
class EntityQA(Task):
    version = 3
    max_new_tokens = 16
    options = {"scoring": ("match", "f1")}

    def samples(self, tokenizer, context_length: int, n: int, seed: int) -> list[Sample]:
        rng = random.Random(f"qa-{seed}-{context_length}")
        out = []
        for i in range(n):
            depth = i / (n - 1) if n > 1 else 0.5
            person, town = _person(rng), _town(rng)
            fact = f"{person} was born in the town of {town}."
            others = [p for p in (_person(rng) for _ in range(2 * DISTRACTORS)) if p != person]
            facts = [f"{p} was born in the town of {_town(rng)}." for p in others[:DISTRACTORS]]
            question = f"\n\nIn which town was {person} born? Answer with the town name only."

            def build(words, facts=facts, fact=fact, question=question, depth=depth):
                # The asked fact at its depth, the distractors spread evenly around it.
                inserts = sorted(
                    [(depth, fact)] + [((j + 0.5) / DISTRACTORS, f) for j, f in enumerate(facts)]
                )
                positions = [(round(where * words), text) for where, text in inserts]
                doc = "Here is a document about people.\n\n" + weave(noise_words(words), positions)
                return format_prompt(tokenizer, doc + question, "Answer:")

            _, ids = fit(build, context_length, self.name)
            out.append(Sample(ids, town, {"context_length": context_length, "depth": depth}))
        return out

    def score(self, sample: Sample, output: str) -> bool:
        if self.scoring == "f1":
            return token_f1(_first_line(output), sample.answer) >= F1_PASS
        return sample.answer in re.findall(r"[A-Za-z]+", _first_line(output))

    def details(self, sample: Sample, output: str) -> dict:
        return {"f1": token_f1(_first_line(output), sample.answer)}


def _first_line(output: str) -> str:
    return output.strip().split("\n")[0]


def _tokens(text: str) -> list[str]:
    """SQuAD's answer normalization, as a token list."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(prediction: str, truth: str) -> float:
    """SQuAD's token F1 between a predicted and a true answer."""
    predicted, true = _tokens(prediction), _tokens(truth)
    shared = sum((Counter(predicted) & Counter(true)).values())
    if not shared:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(true)
    return 2 * precision * recall / (precision + recall)
