"""One trial: a Config run on one model over tasks and context lengths, with honest metrics.

This is the unit that `kvpareto eval` prints and that a search repeats. Accuracy is the mean over
all samples with a Wilson interval; memory is measured (and modeled) on the longest prompt,
which is what a deployment must hold; timing is prefill tokens/s and decode ms/token.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from kvpareto.config import Config
from kvpareto.engine import generate
from kvpareto.memory import (
    MemoryParts,
    measure_prefill,
    weights_bytes_measured,
    weights_bytes_modeled,
)
from kvpareto.memory_model import modeled_activation_peak
from kvpareto.models import LoadedModel
from kvpareto.quant.kv_cache import QuantizedKVCache
from kvpareto.stats import wilson
from kvpareto.tasks import get_task


def run_trial(
    loaded: LoadedModel,
    config: Config,
    task_names: list[str],
    context_lengths: list[int],
    samples: int,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
    memory_length: int | None = None,
) -> dict:
    """Evaluate `config`; memory is taken at `memory_length` tokens, or the longest prompt."""
    _check_supported(config)
    model, tok = loaded.model, loaded.tokenizer
    _check_lengths(loaded, context_lengths)
    tasks = [get_task(name) for name in task_names]
    work = [
        (task, s)
        for task in tasks
        for length in context_lengths
        for s in task.samples(tok, length, samples, seed)
    ]
    for task, sample in work:
        if task.needs_reference:
            sample.answer = _reference(loaded, task, sample)
    per_task: dict[str, list[bool]] = {t.name: [] for t in tasks}
    outcomes = []
    prefill_tokens = prefill_s = decode_steps = decode_s = 0.0
    for i, (task, sample) in enumerate(work):
        ids = torch.tensor([sample.input_ids])
        gen = generate(model, tok, ids, config, max_new_tokens=task.max_new_tokens)
        correct = task.score(sample, gen.text)
        per_task[task.name].append(correct)
        outcomes.append({"task": task.name, **sample.meta, "correct": correct})
        prefill_tokens += gen.prompt_tokens
        prefill_s += gen.prefill_s
        decode_steps += gen.decode_steps
        decode_s += gen.decode_s
        if progress:
            progress(i + 1, len(work))

    longest = max(work, key=lambda w: len(w[1].input_ids))[1].input_ids
    memory_prompt = longest
    if memory_length:
        # KV bytes and activations depend on the length only: any seeded tokens will do.
        gen = torch.Generator().manual_seed(memory_length)
        vocab = model.get_input_embeddings().num_embeddings
        memory_prompt = torch.randint(3, vocab, (memory_length,), generator=gen).tolist()
    memory, modeled = _memory(loaded, config, memory_prompt)
    hits = [ok for oks in per_task.values() for ok in oks]
    acc = sum(hits) / len(hits)
    return {
        "model": loaded.spec.name,
        "model_hash": loaded.model_hash,
        "config": config.to_dict(),
        "config_key": config.key(),
        "label": config.label(),
        "tasks": {
            name: {
                "accuracy": sum(oks) / len(oks),
                "accuracy_ci": list(wilson(sum(oks), len(oks))),
                "n": len(oks),
                "task_hash": get_task(name).task_hash(context_lengths, samples, seed),
            }
            for name, oks in per_task.items()
        },
        "accuracy": acc,
        "accuracy_ci": list(wilson(sum(hits), len(hits))),
        "n": len(hits),
        "context_lengths": context_lengths,
        "samples": outcomes,
        "longest_prompt_tokens": len(longest),
        "memory_tokens": len(memory_prompt),
        "memory": {**memory.to_dict(), "modeled": modeled.to_dict(), "measured": True},
        "timing": {
            "prefill_tokens_per_s": prefill_tokens / prefill_s if prefill_s else None,
            "decode_ms_per_token": 1000 * decode_s / decode_steps if decode_steps else None,
        },
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


_REFERENCES: dict[tuple, str] = {}


def _reference(loaded: LoadedModel, task, sample) -> str:
    """The 16-bit cache's greedy continuation of a prompt, computed once per model and prompt."""
    key = (loaded.model_hash, task.name, task.version, tuple(sample.input_ids))
    if key not in _REFERENCES:
        ids = torch.tensor([sample.input_ids])
        gen = generate(loaded.model, loaded.tokenizer, ids, Config(), task.max_new_tokens)
        _REFERENCES[key] = gen.text
    return _REFERENCES[key]


def _memory(
    loaded: LoadedModel, config: Config, prompt: list[int]
) -> tuple[MemoryParts, MemoryParts]:
    model = loaded.model
    ids = torch.tensor([prompt])
    activation, kv = measure_prefill(model, ids, config)
    dtype = next(model.parameters()).dtype
    cache = QuantizedKVCache(model.config, config, dtype)
    measured = MemoryParts(weights_bytes_measured(model), kv, activation)
    modeled = MemoryParts(
        weights_bytes_modeled(model),
        cache.modeled_nbytes(len(prompt)),
        modeled_activation_peak(model.config, config, len(prompt), dtype),
    )
    return measured, modeled


def _check_supported(config: Config) -> None:
    """Knobs whose runtime is still being built fail loudly rather than being ignored."""
    from kvpareto.errors import UserError

    pending = {
        "weights": config.weights != "none",
        "prune_rate": config.prune_rate > 0,
        "kv_scheme": config.kv_scheme != "static",
    }
    for knob, used in pending.items():
        if used:
            raise UserError(f"{knob} is not implemented yet in this build")


def _check_lengths(loaded: LoadedModel, lengths: list[int]) -> None:
    from kvpareto.errors import UserError

    limit = loaded.spec.max_context
    too_long = [n for n in lengths if limit and n + 32 > limit]
    if too_long:
        raise UserError(
            f"context length {too_long[0]} does not fit {loaded.spec.name} "
            f"(max {limit} tokens, including room for the answer)"
        )
