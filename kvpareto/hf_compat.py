"""How the installed transformers names the KV cache in a model call.

transformers 5.24 renamed the cache argument of `forward` (model, decoder layers, attention) from
`past_key_values` to `cache`; the old name still works until 5.40 but warns on every call. We
call the model with whichever name the installed version declares, so normal runs print no
deprecation warning, and hooks that look for the cache in a call's keyword arguments accept
either name.
"""

from __future__ import annotations

import inspect

from transformers.models.llama.modeling_llama import LlamaModel

# Read once from a stock model class: every architecture we load follows the same convention.
_RENAMED = "cache" in inspect.signature(LlamaModel.forward).parameters
CACHE_ARG = "cache" if _RENAMED else "past_key_values"
_NAMES = ("cache", "past_key_values")


def with_cache(cache) -> dict:
    """Keyword arguments that hand `cache` to a model call: `model(ids, **with_cache(cache))`."""
    return {CACHE_ARG: cache}


def cache_of(kwargs: dict):
    """The cache a hooked call received (under either name), or None."""
    for name in _NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def without_cache(kwargs: dict) -> dict:
    """A call's keyword arguments less the cache and `use_cache`, to replay a layer cache-free."""
    return {k: v for k, v in kwargs.items() if k not in (*_NAMES, "use_cache")}
