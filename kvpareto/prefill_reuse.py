"""Prefill reuse: a prompt's forward pass is computed once per model and replayed into each cache.

When the prompt is prefilled as one chunk into a static, unpruned cache, attention inside that
chunk reads its own K/V in full precision and there is no history yet, so the forward pass (every
layer's K/V and the last logits) does not depend on the KV configuration at all: only what the
cache stores does. So the first such prefill of a prompt on a model records, per layer, the K/V
that the model handed to `cache.update`, and the last logits; a later trial of another KV
configuration on the same model (the same weights) and prompt builds a fresh cache and calls
`update` with the recorded tensors in layer order, exactly as the model would have. The cache
then holds the same state, byte for byte, and decoding from it gives the same tokens as a cold
prefill (tests/test_prefill_reuse.py checks this bit for bit).

Chunked, pruned or adaptive prefills are not reused: later chunks read earlier ones back from
the quantized store, pruning scorers look at queries, and the adaptive controller at attention.

The records are held in memory, per model object and prompt, up to `KVPARETO_PREFILL_CACHE_MB`
(default 1024) of tensors, least recently used first out. Timing: a
replayed prefill reports the forward time measured when it was recorded plus the time of its own
cache writes, so prefill tokens/s stays a property of the configuration, not of the reuse.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from kvpareto.config import Config


@dataclass
class _Record:
    keys_values: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, as given to cache.update
    logits: torch.Tensor  # the last position's logits
    forward_s: float  # the cold prefill's wall time

    @property
    def nbytes(self) -> int:
        kv = sum(k.nbytes + v.nbytes for k, v in self.keys_values)
        return kv + self.logits.nbytes


def reusable(config: Config, prompt_tokens: int) -> bool:
    """Whether the prompt's forward pass is independent of the KV configuration."""
    one_chunk = config.chunk_size == 0 or config.chunk_size >= prompt_tokens
    return config.kv_scheme == "static" and config.prune_rate == 0 and one_chunk


class PrefillStore:
    """Recorded prefills per (model, prompt), bounded in bytes, least recently used out first.

    A model is known by a serial number stamped on it at first use, never by `id()`, which a
    later model could reuse. Records of a model that was freed simply age out."""

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self._records: OrderedDict[tuple[int, tuple[int, ...]], _Record] = OrderedDict()
        self._held = 0
        self._serials = itertools.count()

    def _key(self, model, prompt: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        if not hasattr(model, "_kvpareto_serial"):
            model._kvpareto_serial = next(self._serials)
        return model._kvpareto_serial, prompt

    def get(self, model, prompt: tuple[int, ...]) -> _Record | None:
        key = self._key(model, prompt)
        record = self._records.get(key)
        if record is not None:
            self._records.move_to_end(key)
        return record

    def put(self, model, prompt: tuple[int, ...], record: _Record) -> None:
        if record.nbytes > self.limit:
            return
        key = self._key(model, prompt)
        if key in self._records:
            self._held -= self._records.pop(key).nbytes
        self._records[key] = record
        self._held += record.nbytes
        while self._held > self.limit:
            _, old = self._records.popitem(last=False)
            self._held -= old.nbytes

    def clear(self) -> None:
        self._records.clear()
        self._held = 0


STORE = PrefillStore(int(os.environ.get("KVPARETO_PREFILL_CACHE_MB", "1024")) * 2**20)


def record_prefill(model, input_ids: torch.Tensor, cache, run) -> torch.Tensor:
    """Run `run()` (a one-chunk prefill into `cache`), recording what it writes; return logits."""
    written: list[tuple[torch.Tensor, torch.Tensor]] = []
    update = cache.update

    def recording_update(key_states, value_states, layer_idx, *args, **kwargs):
        written.append((key_states, value_states))
        return update(key_states, value_states, layer_idx, *args, **kwargs)

    cache.update = recording_update
    start = time.perf_counter()
    try:
        logits = run()
    finally:
        del cache.update  # back to the class's method
    if len(written) == len(cache.layers):
        record = _Record(written, logits, time.perf_counter() - start)
        STORE.put(model, tuple(input_ids[0].tolist()), record)
    return logits


def replay_prefill(record: _Record, cache) -> torch.Tensor:
    """Write a recorded prefill into a fresh `cache`, layer by layer; return its last logits."""
    for layer_idx, (keys, values) in enumerate(record.keys_values):
        cache.update(keys, values, layer_idx)
    return record.logits
