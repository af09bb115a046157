"""Byte accounting: weights, KV cache and activation peak, each measured and modeled.

Measured means bytes of tensors actually held (weights, KV) or a peak observed while the model
ran (activations). Modeled means a closed-form formula from the architecture and the Config.
Reports show both; tests check that they agree (KV to the byte, activations within 10%).

The activation peak is measured on CPU with a `TorchDispatchMode` that sees every tensor an op
creates and tracks live storages with `weakref.finalize` (two methods agreed exactly in
FINDINGS.md; this one is far cheaper than the profiler). Parameters are not activations, and
neither are bytes held by the KV cache at that moment, so both are excluded: what remains is the
part that chunked prefill shrinks. On CUDA, `torch.cuda.max_memory_allocated` is used instead.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kvpareto.config import Config
from kvpareto.engine import prefill
from kvpareto.quant.adaptive import make_cache


@dataclass
class MemoryParts:
    weights_bytes: int
    kv_bytes: int  # the most the KV cache held during prefill (see measure_prefill)
    activation_peak_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.activation_peak_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def _unique_storages(tensors) -> dict[int, int]:
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return seen


def weights_bytes_measured(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer storage, tied weights counted once."""
    return sum(_unique_storages(list(model.parameters()) + list(model.buffers())).values())


def weights_bytes_modeled(model: torch.nn.Module) -> int:
    """Parameter count (tied counted once) times element size, plus buffers; a packed linear
    counts by its closed form (`PackedLinear.modeled_nbytes`), not by its tensors."""
    from kvpareto.quant.packed_linear import PackedLinear

    total, seen = 0, set()
    for module in model.modules():
        if isinstance(module, PackedLinear):
            total += module.modeled_nbytes()
            seen.update(id(t) for t in module.parameters())
            continue
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


class _LiveBytes(TorchDispatchMode):
    """Tracks bytes of live storages created by ops, and the peak of (live - KV-held)."""

    def __init__(self, ignore_ptrs: set[int], kv_held):
        super().__init__()
        self.ignore = ignore_ptrs
        self.kv_held = kv_held
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        self.current -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in self.live or ptr in self.ignore or storage.nbytes() == 0:
                continue
            self.live[ptr] = storage.nbytes()
            self.current += storage.nbytes()
            weakref.finalize(storage, self._release, ptr)
        self.peak = max(self.peak, self.current - self.kv_held())
        return out


@torch.inference_mode()
def measure_prefill(model, input_ids: torch.Tensor, config: Config) -> tuple[int, int]:
    """Run one prefill; return (activation peak bytes, KV peak bytes), both measured.

    The KV figure is the most the cache held after any layer update (`peak_nbytes`), which is
    what a device must have room for: the bytes at the end of the prompt, unless a full-precision
    tail was flushed into tiles or a window slid on the way there.
    """
    dtype = next(model.parameters()).dtype
    cache = make_cache(model, config, dtype, prompt_length=input_ids.shape[1])
    if input_ids.device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        prefill(model, input_ids, cache, config.chunk_size)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base - cache.nbytes()
        return max(peak, 0), cache.peak_nbytes
    ignore = set(_unique_storages(list(model.parameters()) + list(model.buffers())))
    ignore.add(input_ids.untyped_storage().data_ptr())
    with _LiveBytes(ignore, cache.nbytes) as tracker:
        prefill(model, input_ids, cache, config.chunk_size)
    return tracker.peak, cache.peak_nbytes
