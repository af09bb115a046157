"""The "prose" haystack: seeded, generated narrative that reads like a book, not a loop.

RULER's prose haystack is Paul Graham's essays, a download. CI installs only Debian and PyPI
packages and reaches no hub, and no package installed here ships a public-domain book, so the
prose is generated instead: a small grammar (openers, people, things, places, motions, weather,
reported speech, joined clauses) over a fixed vocabulary, drawn from `random.Random(seed)`. It
has the properties a haystack needs: varied sentences, so no position looks like another (unlike
the repeated noise); every sentence ends with a period, so needles go between sentences; and no
digits, hyphenated words, or the words needles use ("key", "magic", "number"), so nothing in it
can be mistaken for a needle. The stream is prefix-stable: more words extend it, never change
it, which is what `tasks.text.fit` needs. Bump `PROSE_VERSION` when the output changes: it
enters the task hash of every prose-haystack task.
"""

from __future__ import annotations

import random
from functools import lru_cache

PROSE_VERSION = 1
SOURCE = f"kvpareto.tasks.prose v{PROSE_VERSION} (seeded grammar)"

_PEOPLE = (
    "miller weaver shepherd baker fisherman widow blacksmith farmer teacher traveler priest "
    "carpenter sailor merchant potter gardener doctor innkeeper soldier painter"
).split()
_PERSON_TRAITS = "old young tired quiet cheerful patient stubborn careful kind clever".split()
_THINGS = (
    "basket letter lamp cart ladder bucket coat box rope book map blanket jar saddle net "
    "bell chair sack cloak wheel"
).split()
_THING_TRAITS = "heavy wooden small old broken empty worn painted warm narrow".split()
_PLACES = (
    "river mill market bridge church harbor orchard hill forest well square inn barn road "
    "meadow chapel shore gate valley field"
).split()
_PREPOSITIONS = "along across toward past around behind beside near".split()
_MOTIONS = "walked hurried wandered rode climbed waited rested worked lingered paused".split()
_DEEDS = "carried found mended painted sold bought opened cleaned lost borrowed hid".split()
_MANNERS = "slowly quietly carefully early alone again happily".split()
_OPENERS = (
    "In the morning",
    "That evening",
    "After the harvest",
    "Before the storm",
    "For a long time",
    "At dusk",
    "On the next day",
    "Without a word",
    "Later",
    "Every winter",
    "When the bells rang",
)
_SKIES = "sky wind rain air light snow fog water".split()
_MOODS = "cold gray still bright warm heavy clear soft".split()
_LINKS = (", and", ", but", " because", " while", " until", " so")


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _person(rng: random.Random) -> str:
    trait = f"{rng.choice(_PERSON_TRAITS)} " if rng.random() < 0.5 else ""
    return f"the {trait}{rng.choice(_PEOPLE)}"


def _thing(rng: random.Random) -> str:
    trait = f"{rng.choice(_THING_TRAITS)} " if rng.random() < 0.6 else ""
    noun = trait + rng.choice(_THINGS)
    return _a(noun) if rng.random() < 0.5 else f"the {noun}"


def _clause(rng: random.Random) -> str:
    """A lower-case clause with no final period."""
    kind = rng.random()
    if kind < 0.4:
        manner = f" {rng.choice(_MANNERS)}" if rng.random() < 0.5 else ""
        place = f"{rng.choice(_PREPOSITIONS)} the {rng.choice(_PLACES)}"
        return f"{_person(rng)} {rng.choice(_MOTIONS)}{manner} {place}"
    if kind < 0.75:
        place = f" to the {rng.choice(_PLACES)}" if rng.random() < 0.4 else ""
        return f"{_person(rng)} {rng.choice(_DEEDS)} {_thing(rng)}{place}"
    return f"the {rng.choice(_SKIES)} was {rng.choice(_MOODS)}"


def _sentence(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.15:
        text = f"{_person(rng)} said that {_clause(rng)}"
    else:
        text = _clause(rng)
        if rng.random() < 0.35:
            text += f"{rng.choice(_LINKS)} {_clause(rng)}"
        if rng.random() < 0.3:
            text = f"{rng.choice(_OPENERS)}, {text}"
    return text[0].upper() + text[1:] + "."


@lru_cache(maxsize=16)
def _stream(seed: str, size: int) -> tuple[str, ...]:
    rng, words = random.Random(f"prose-{seed}"), []
    while len(words) < size:
        words += _sentence(rng).split()
    return tuple(words[:size])


def prose_words(n: int, seed: str) -> list[str]:
    """The first n words of the prose stream for `seed`."""
    # Sizes round up to a power of two so the many lengths `fit` tries share one cached stream.
    return list(_stream(seed, max(1024, 1 << max(n - 1, 0).bit_length()))[:n])
