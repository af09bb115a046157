"""KV caches: the cache contract (`base`), one registry of schemes, and their implementations.

`make_cache` is how every caller builds a cache: `config.kv_scheme` names the class in `SCHEMES`
(static: packed per-stream tiles, `static.py`; adaptive and rule: per-token widths, `adaptive.py`).
"""

from __future__ import annotations

import torch

from kvpareto.config import Config
from kvpareto.kv.adaptive import AdaptiveKVCache
from kvpareto.kv.base import KVCache
from kvpareto.kv.static import QuantizedKVCache
from kvpareto.registry import Registry

SCHEMES: Registry[type[KVCache]] = Registry("KV scheme")
SCHEMES.add("static", QuantizedKVCache)
SCHEMES.add("adaptive", AdaptiveKVCache)
SCHEMES.add("rule", AdaptiveKVCache)


def make_cache(
    model, config: Config, dtype: torch.dtype, prompt_length: int | None = None, **options
) -> KVCache:
    """A fresh cache for `model` under `config`, of its scheme's class. `dtype` is the storage
    dtype (what full-precision K/V are held in); `prompt_length` is needed by pruning and the
    modeled peak; `options` are the scheme's own (static: `fused`; adaptive: `observer`)."""
    return SCHEMES.get(config.kv_scheme).for_model(model, config, dtype, prompt_length, **options)
