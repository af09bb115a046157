"""Shared prompt plumbing for generated tasks: chat formatting and sizing in the model's tokens.

A task describes its prompt as `build(n)`: the text with n filler *words*. `fit` finds the largest
n whose formatted prompt fits the target token count (binary search; tokenizing is the cost), so a
4096-token prompt is 4096 tokens minus at most one word's tokens, in the model's own tokenizer.
The haystack is the classic "noise" filler, or generated prose (`tasks.prose`) for tasks that
offer the choice; `weave` inserts needles into either between sentences.
"""

from __future__ import annotations

from collections.abc import Callable

from kvpareto.errors import UserError
from kvpareto.tasks.prose import prose_words

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_NOISE_WORDS = NOISE.split()
HAYSTACKS = ("noise", "prose")

# Plain nouns: the keys of RULER-style needles and the items of the word-count tasks.
VOCAB = (
    "apple bridge candle dragon eagle forest garden harbor island jungle kettle lantern meadow "
    "needle orchard pepper quarry rabbit saddle timber umbrella velvet walnut yarrow zephyr anchor "
    "barrel cactus dolphin ember falcon glacier hammer igloo jasmine kernel lemon marble nectar "
    "oyster parrot quiver raven spindle tulip vessel willow basket copper"
).split()


def noise_words(n: int) -> list[str]:
    """The first n words of the endlessly repeated noise haystack."""
    return [_NOISE_WORDS[i % len(_NOISE_WORDS)] for i in range(n)]


def haystack(kind: str, n: int, seed: str) -> list[str]:
    """The first n words of a haystack; `seed` picks the prose (the noise is always the same)."""
    return noise_words(n) if kind == "noise" else prose_words(n, seed)


def at_sentence_end(words: list[str], position: int) -> int:
    """The largest index <= position that starts a sentence (0 if none)."""
    position = min(position, len(words))
    while position > 0 and not words[position - 1].endswith("."):
        position -= 1
    return position


def format_prompt(tokenizer, content: str, answer_prefix: str) -> list[int]:
    """Token ids of `content` as a user turn (chat template when the model has one), followed
    by the start of the assistant's answer, which steers small models to answer tersely."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
        )
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        return list(ids) + tokenizer.encode(answer_prefix, add_special_tokens=False)
    return tokenizer.encode(content + "\n" + answer_prefix, add_special_tokens=False)


def fit(build: Callable[[int], list[int]], target: int, name: str) -> tuple[int, list[int]]:
    """Largest n with len(build(n)) <= target; returns (n, ids)."""
    lo, hi = 0, 1
    if len(build(0)) > target:
        raise UserError(f"context length {target} is too short for the {name} task")
    while len(build(hi)) <= target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(build(mid)) <= target:
            lo = mid
        else:
            hi = mid
    return lo, build(lo)


def weave(hay: list[str], inserts: list[tuple[int, str]]) -> str:
    """Join the haystack words with each text inserted, in order, at the sentence start at or
    before its word position (never before the previous insert)."""
    body, start = [], 0
    for position, text in inserts:
        cut = max(at_sentence_end(hay, position), start)
        body += hay[start:cut] + [text]
        start = cut
    return " ".join(body + hay[start:])
