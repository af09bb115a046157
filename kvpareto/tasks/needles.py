"""Needle kinds for NIAH tasks: numbers, UUIDs and words, as in RULER.

A needle kind knows three things: how to draw a value from the task's seeded `random.Random`
(never a global source, so prompts are reproducible), how a prompt names it ("number", "UUID",
"word"), and how to find values of its shape in a generated answer. Scoring is exact match on
those found values: a number must be the whole digit run ("12345" does not match inside
"123456"), a UUID the whole 36-character form in any case, a word the whole hyphenated compound
("amber-falcon"; RULER's word needles are adjective-noun pairs too, which no haystack contains).
"""

from __future__ import annotations

import random
import re
import uuid
from dataclasses import dataclass

# Neither list shares a word with the prose haystack or the needle keys (`text.VOCAB`).
_ADJECTIVES = (
    "amber brave calm dusty eager faint gentle hollow icy jolly keen lively misty noble odd pale "
    "ruddy rapid silent tidy urban vivid wild plucky zesty bitter crisp dim fierce golden"
).split()
_NOUNS = (
    "badger beetle cobweb dagger fiddle garnet helmet jigsaw kitten lobster mantis noodle oriole "
    "pigeon rocket sparrow teapot urchin walrus beacon comet donkey ferret goblet hermit jackal "
    "locket mitten nugget otter"
).split()
_UUID = r"(?<![0-9a-f])[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}(?![0-9a-f])"


@dataclass(frozen=True)
class Needle:
    kind: str
    noun: str  # how a prompt names one value
    nouns: str  # ... and several
    pattern: str  # the shape of a value, matched in a lower-cased answer
    tokens: int  # decode budget for one value in a BPE tokenizer, with room for a separator

    def draw(self, rng: random.Random) -> str:
        raise NotImplementedError

    def found(self, output: str) -> list[str]:
        """Values of this shape in a generated answer, in order."""
        return re.findall(self.pattern, output.lower())


@dataclass(frozen=True)
class Number(Needle):
    digits: int = 7

    def draw(self, rng: random.Random) -> str:
        return str(rng.randint(10 ** (self.digits - 1), 10**self.digits - 1))


class Uuid(Needle):
    def draw(self, rng: random.Random) -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))


class Word(Needle):
    def draw(self, rng: random.Random) -> str:
        return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


KINDS = ("number", "uuid", "word")


def needle_kind(kind: str, digits: int = 7) -> Needle:
    """The needle of a kind; `digits` sizes numbers (the pass key keeps its historical five)."""
    if kind == "number":
        return Number("number", "number", "numbers", r"\d+", digits + 3, digits)
    if kind == "uuid":
        return Uuid("uuid", "UUID", "UUIDs", _UUID, 38)
    if kind == "word":
        return Word("word", "word", "words", r"[a-z]+(?:-[a-z]+)+", 8)
    raise ValueError(f"no needle kind {kind!r}; kinds: {', '.join(KINDS)}")
