"""Variable tracking (RULER-style): follow a chain of assignments hidden in filler text.

"VAR QXKMB = 48213." starts a chain; later lines assign each new variable the previous one
("VAR JRTPL = VAR QXKMB."). The question asks which variables end up holding the value. The
chain's lines are spread evenly through the filler. A sample scores when every variable of the
chain appears in the answer (RULER's string-match-all, as a pass/fail).
"""

from __future__ import annotations

import random
import re
import string

from kvpareto.tasks import Sample, Task, register_task
from kvpareto.tasks.text import fit, format_prompt, noise_words, weave

CHAIN = 4


@register_task("vt")
class VariableTracking(Task):
    version = 2
    max_new_tokens = 48  # room to name four variables even when the model restates assignments

    def samples(self, tokenizer, context_length: int, n: int, seed: int) -> list[Sample]:
        rng = random.Random(f"vt-{seed}-{context_length}")
        out = []
        for i in range(n):
            names = ["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(CHAIN)]
            value = str(rng.randint(10000, 99999))
            lines = [f"VAR {names[0]} = {value}."] + [
                f"VAR {names[j]} = VAR {names[j - 1]}." for j in range(1, CHAIN)
            ]
            question = (
                f"\n\nFind all variables that are assigned the value {value} in the text above, "
                "directly or through other variables. Answer with the variable names only."
            )

            def build(words, lines=lines, question=question):
                # Spread the chain's lines evenly, each between two sentences.
                cuts = [(j + 1) * words // (CHAIN + 1) for j in range(CHAIN)]
                woven = weave(noise_words(words), list(zip(cuts, lines, strict=True)))
                text = "Memorize the variable assignments hidden in this text.\n\n" + woven
                return format_prompt(tokenizer, text + question, "The variables are:")

            _, ids = fit(build, context_length, self.name)
            out.append(Sample(ids, " ".join(names), {"context_length": context_length, "index": i}))
        return out

    def score(self, sample: Sample, output: str) -> bool:
        found = set(re.findall(r"[A-Z]{5}", output))
        return set(sample.answer.split()) <= found
