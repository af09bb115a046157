"""The held-out text for perplexity: real English prose that ships with Python itself.

Perplexity through the quantized cache is a cheap proxy for what KV quantization costs: each
token is predicted from its history as the cache holds it. The text must be natural (generated
word salad has a perplexity that context barely moves) and must not need a download, so it is
CPython's own documentation of the language (`pydoc_data.topics`, part of the standard library
under the PSF license): reference prose with code examples that a 135M model has not memorized.
The seed picks the topic the text starts at; topics follow in name order, wrapping around, until
the text has the requested number of the model's tokens. The text differs between Python
releases, so `source()`, which names it in results and cache keys, carries the Python version.

How it is scored (`trial`): the first half of the text is the prompt, prefilled as the config
says (chunked, pruned); the second half is scored teacher-forced (`engine.score_tokens`), token
by token or in blocks no longer than the residual window, so that each token reads what came
before it from the cache as stored (quantized), as generated text would.
Scoring the whole text as one prompt would hide KV quantization whenever prefill is unchunked.
It is a metric of its own, reported next to accuracy and never folded into it.
"""

from __future__ import annotations

import platform

from kvpareto.errors import UserError

TEXT_VERSION = 1


def source() -> str:
    """What the text is, for reports and cache keys. CPython regenerates its topics with each
    release, so the same seed gives other text under another Python: the version is part of it."""
    return f"CPython {platform.python_version()} pydoc_data.topics v{TEXT_VERSION}"


def held_out_ids(tokenizer, n_tokens: int, seed: int) -> list[int]:
    """The first `n_tokens` tokens of the held-out text for `seed`."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    first = seed % len(names)
    ids: list[int] = []
    for name in names[first:] + names[:first]:
        ids += tokenizer.encode(topics[name].strip() + "\n\n", add_special_tokens=False)
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise UserError(f"the held-out text is shorter than {n_tokens} tokens")
