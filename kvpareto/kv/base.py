"""The cache contract: what every KV scheme's cache answers, beyond transformers' `Cache`.

A scheme is a `KVCache` subclass made of `KVLayer`s. Callers (the engine, memory, the trial, the
benchmarks) use only what is named here, so a new scheme plugs in by implementing it and
registering its class in `kvpareto.kv.SCHEMES`. Bytes come in two kinds that must agree to the
byte (tests/contracts.py checks every scheme): measured, the bytes of the tensors held, and
modeled, a closed form of the token count. Values are counted in K and V elements stored, so that
bytes x 8 / values is the effective bits a cached value costs.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvpareto.config import Config


class KVLayer(CacheLayerMixin, ABC):
    """One attention layer's stores."""

    @abstractmethod
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the layer holds, whole buffers (unfilled rows included)."""

    def nbytes(self) -> int:
        """Measured: the bytes of `tensors()`."""
        return sum(t.nbytes for t in self.tensors())


class KVCache(Cache, ABC):
    """One sequence batch's KV cache under one `Config`.

    `prompt_length`, where given, is where the prompt ends: pruning and the modeled peak need it.
    A cache may hook the model it was built for (to see input ids or queries); `close()`, or
    leaving a `with` block, removes those hooks. The bytes stay readable after `close()`.
    """

    layers: list[KVLayer]
    prompt_length: int | None

    @classmethod
    @abstractmethod
    def for_model(
        cls, model, config: Config, dtype: torch.dtype, prompt_length: int | None = None, **options
    ) -> KVCache:
        """The cache `make_cache` builds for `model`; `dtype` is the storage dtype (what
        full-precision K/V are held in), `options` the scheme's own (see each class)."""

    def nbytes(self) -> int:
        """Measured: the bytes of every tensor the layers hold now."""
        return sum(layer.nbytes() for layer in self.layers)

    @property
    @abstractmethod
    def peak_nbytes(self) -> int:
        """Measured: the most bytes held after any layer update so far (what a device must have
        room for, which may exceed the bytes held at the end)."""

    @abstractmethod
    def modeled_nbytes(self, total: int, batch: int = 1) -> int:
        """Modeled: the bytes held after `total` tokens, in closed form."""

    @abstractmethod
    def modeled_peak_nbytes(self, batch: int = 1) -> int:
        """Modeled: `peak_nbytes` at the end of the prompt's prefill (needs `prompt_length`)."""

    @abstractmethod
    def stored_values(self, total: int, batch: int = 1) -> int:
        """The K and V values held after `total` tokens, whatever their width."""

    def effective_bits(self, total: int) -> float:
        """Bits a stored value costs after `total` tokens, scales, zeros, full-precision tails
        and unfilled rows included: modeled bytes x 8 over `stored_values`."""
        return 8 * self.modeled_nbytes(total) / self.stored_values(total)

    @abstractmethod
    def mean_bits(self) -> float:
        """The mean code width of a cached K/V value, without scales, zeros or slack (each scheme
        says what it averages over)."""

    def fork(self) -> KVCache:
        """An independent copy of the cache as it stands, to run a second continuation from here
        (the engine teacher-forces the baseline's answer on one): feeding either leaves the other
        as it was. A scheme whose cache holds more than tensors and plain values (hooks on the
        model) says how it is copied."""
        return copy.deepcopy(self)

    def close(self) -> None:
        """Remove what the cache hooked on its model (nothing, unless a scheme says otherwise)."""

    def __enter__(self) -> KVCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
