"""Byte accounting: weights, KV cache and activation peak, each measured and modeled.

Measured means bytes of tensors actually held (weights, KV) or a peak observed while the model
ran (activations). Modeled means a closed-form formula from the architecture and the Config.
Reports show both; tests check that they agree (KV to the byte, activations within 10%).

The activation peak is measured over a prefill and one decode step. It is read from the
allocator of the model's device (CPU or CUDA) itself, through the torch profiler's memory events:
every allocation and free, those inside composite ops included (SDPA converts its boolean mask
to a float one inside a single op, which a hook on op outputs never sees). Parameters are not
activations, and neither are the bytes the KV cache holds at that moment, so both are left out:
what remains is the part that chunked prefill shrinks. (`torch.cuda.max_memory_allocated` alone
cannot do that on CUDA: it keeps no timeline, so it cannot tell which KV bytes were held at its
peak.)
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity

from kvpareto.config import Config
from kvpareto.engine import on_device, prefill
from kvpareto.hf_compat import with_cache
from kvpareto.kv import make_cache
from kvpareto.weights.packed_linear import resolve_kernel_paths


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
    from kvpareto.weights.packed_linear import PackedLinear

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


_MARK = "kvpareto.kv_update"


def _allocator_peak(events: list[tuple[int, int, int]], marks: list[tuple[int, set[int]]]) -> int:
    """The peak of bytes allocated and not yet freed, KV storages left out.

    `events` are the profiler's CPU allocations and frees, (time, pointer, signed size); a free
    of a storage allocated before profiling started is skipped. `marks` are (time, pointers of
    the storages a layer's cache holds) at the end of each cache update: an allocation still live
    at a mark that names its pointer is a KV store from the moment it was allocated. So each
    moment leaves out exactly the KV bytes held then, and a store that a ring reallocates during
    an update never counts as activation.
    """
    timeline = sorted(
        [(t, 0, ptr, size) for t, ptr, size in events] + [(t, 1, 0, ptrs) for t, ptrs in marks],
        key=lambda e: e[:2],
    )
    live: dict[int, int] = {}  # pointer -> the timeline index of the allocation holding it
    kv: set[int] = set()
    for i, (_, is_mark, ptr, what) in enumerate(timeline):
        if is_mark:
            kv.update(live[p] for p in what if p in live)
        elif what > 0:
            live[ptr] = i
        else:
            live.pop(ptr, None)
    counted: set[int] = set()
    current = peak = 0
    for i, (_, is_mark, ptr, size) in enumerate(timeline):
        if is_mark or (size > 0 and i in kv) or (size < 0 and ptr not in counted):
            continue
        if size > 0:
            counted.add(ptr)
        else:
            counted.discard(ptr)
        current += size
        peak = max(peak, current)
    return peak


def _profiled(prof, device: str) -> tuple[list[tuple[int, int, int]], list[int]]:
    """(allocation events on `device` (a device type), end times of the cache updates in order)
    from a finished profile."""
    from torch._C._profiler import _EventType

    events, marks = [], []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            fields = event.extra_fields
            if fields.device.type == device:
                events.append((event.start_time_ns, fields.ptr, fields.alloc_size))
        elif event.name == _MARK:
            marks.append(event.end_time_ns)
    return events, sorted(marks)


@contextmanager
def _marked_updates(cache, held: list[set[int]]):
    """Wrap each cache update in a profiler range, and note the storages its layer then holds."""
    update = cache.update

    def marked(key_states, value_states, layer_idx, *args, **kwargs):
        with torch.profiler.record_function(_MARK):
            out = update(key_states, value_states, layer_idx, *args, **kwargs)
        held.append(_storages(cache.layers[layer_idx]))
        return out

    cache.update = marked
    try:
        yield
    finally:
        del cache.update


def _storages(layer) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in layer.tensors()}


def _mark_all(cache, held: list[set[int]]) -> None:
    """A mark naming every store the cache holds now: a fused decode step stores its token after
    the update, inside the attention call, so a store it reallocates is only known as KV here."""
    with torch.profiler.record_function(_MARK):
        pass
    held.append(set().union(*(_storages(layer) for layer in cache.layers)))


def _run(model, input_ids: torch.Tensor, cache, config: Config) -> int:
    """Prefill, then one decode step, which reads the whole prompt back from the cache; return
    the KV peak of the prefill."""
    logits = prefill(model, input_ids, cache, config.chunk_size)
    kv = cache.peak_nbytes
    model(logits.argmax(dim=-1)[:, None], **with_cache(cache), use_cache=True, logits_to_keep=1)
    return kv


@torch.inference_mode()
def measure_prefill(model, input_ids: torch.Tensor, config: Config) -> tuple[int, int]:
    """Run one prefill and one decode step; return (activation peak bytes, KV peak bytes), both
    measured.

    The activation peak is the larger of the prefill's and the decode step's: a decode step
    dequantizes the whole history of a layer into the K/V that attention reads. The KV figure is
    the most the cache held after any layer update of the prefill (`peak_nbytes`), which is what
    a device must have room for: the bytes at the end of the prompt, unless a full-precision tail
    was flushed into tiles or a window slid on the way there.
    """
    dtype = next(model.parameters()).dtype
    input_ids = on_device(input_ids, model)
    # A packed layer probes its kernel paths at its first call on a machine; a probe inside the
    # profiled run would count its scratch as activation, so it happens now.
    resolve_kernel_paths(model)
    with make_cache(model, config, dtype, prompt_length=input_ids.shape[1]) as cache:
        return _profiled_peak(
            input_ids.device.type, cache, lambda: _run(model, input_ids, cache, config)
        )


def _profiled_peak(device: str, cache, run):
    """(the `device` allocator's activation peak while `run()` runs, KV stores left out at every
    moment (see `_allocator_peak`), what it returned), with the cache's updates marked."""
    held: list[set[int]] = []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    # Kineto logs "profiler_start/stop" lines straight to stderr at every profile, below any
    # level Python controls; 6 is past its highest level, so it stays quiet unless a user asks.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with (
        _marked_updates(cache, held),
        torch.profiler.profile(activities=activities, profile_memory=True) as prof,
    ):
        result = run()
        _mark_all(cache, held)
    events, ends = _profiled(prof, device)
    if device != "cpu" and not events:
        # A profiler that saw no allocation on the GPU would read as a zero peak: a lie.
        raise RuntimeError(f"the torch profiler recorded no {device} allocations")
    return _allocator_peak(events, list(zip(ends, held, strict=True))), result


@torch.inference_mode()
def measure_phases(model, input_ids: torch.Tensor, config: Config) -> tuple[int, int]:
    """(prefill activation peak, one decode step's activation peak), each measured on its own
    on the allocator of the model's device (KV stores left out, as in `measure_prefill`): what
    a device needs for the prompt, and what each generated token needs after it."""
    dtype = next(model.parameters()).dtype
    input_ids = on_device(input_ids, model)
    resolve_kernel_paths(model)
    with make_cache(model, config, dtype, prompt_length=input_ids.shape[1]) as cache:
        device = input_ids.device.type
        prefill_peak, logits = _profiled_peak(
            device, cache, lambda: prefill(model, input_ids, cache, config.chunk_size)
        )
        token = logits.argmax(dim=-1)[:, None]
        step_peak, _ = _profiled_peak(
            device,
            cache,
            lambda: model(token, **with_cache(cache), use_cache=True, logits_to_keep=1),
        )
    return prefill_peak, step_peak
