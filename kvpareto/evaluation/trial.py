"""One trial: a Config run on one model over tasks and context lengths, with honest metrics.

This is the unit that `kvpareto eval` prints and that a search repeats. Accuracy is the mean over
all samples with a 95% interval (`stats.mean_interval`); memory is measured (and modeled) on the
longest prompt, which is what a deployment must hold; timing is prefill tokens/s and decode
ms/token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from kvpareto.config import Config
from kvpareto.engine import generate, score_tokens
from kvpareto.kv import make_cache
from kvpareto.memory.measure import (
    MemoryParts,
    measure_prefill,
    weights_bytes_measured,
    weights_bytes_modeled,
)
from kvpareto.memory.model import modeled_activation_peak
from kvpareto.models import LoadedModel
from kvpareto.models.storage_dtype import compute_dtype, dtype_name, storage_dtype
from kvpareto.stats import mean_interval
from kvpareto.tasks import get_task
from kvpareto.tasks.perplexity import held_out_ids, source
from kvpareto.weights.quantize import quantized_model


def run_trial(
    loaded: LoadedModel,
    config: Config,
    task_names: list[str],
    context_lengths: list[int],
    samples: int,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
    memory_length: int | None = None,
    perplexity: bool = False,
) -> dict:
    """Evaluate `config`; memory is taken at `memory_length` tokens, or the longest prompt.

    With `perplexity`, the held-out text's perplexity at the longest context length is measured
    too, as a metric of its own beside accuracy."""
    model, tok = loaded.model, loaded.tokenizer
    tasks = [get_task(name) for name in task_names]
    _check_lengths(loaded, context_lengths, max(t.max_new_tokens for t in tasks))
    work = [
        (task, s)
        for task in tasks
        if not task.runs_itself
        for length in context_lengths
        for s in task.samples(tok, length, samples, seed)
    ]
    for task, sample in work:
        if task.needs_reference:
            sample.answer = _reference(loaded, task, sample)
    # References come from the unquantized model above; everything below runs the trial's weights.
    baseline, loaded = loaded, quantized_model(loaded, config)
    model = loaded.model
    own = [(task, length) for task in tasks if task.runs_itself for length in context_lengths]
    per_task: dict[str, list[float]] = {t.name: [] for t in tasks}
    outcomes = []
    prefill_tokens = prefill_s = decode_steps = decode_s = 0.0
    reused = 0  # prefills replayed from a recorded forward pass (kvpareto.prefill_reuse)
    cached_tokens = cached_bits = 0.0  # for the mean KV bits, token-weighted over prompts
    for i, (task, sample) in enumerate(work):
        ids = torch.tensor([sample.input_ids])
        gen = generate(model, tok, ids, config, max_new_tokens=task.max_new_tokens)
        correct = task.score(sample, gen.text)
        per_task[task.name].append(correct)
        details = task.details(sample, gen.text)
        outcomes.append({"task": task.name, **sample.meta, **details, "correct": correct})
        prefill_tokens += gen.prompt_tokens
        prefill_s += gen.prefill_s
        decode_steps += gen.decode_steps
        decode_s += gen.decode_s
        reused += gen.prefill_reused
        cached_tokens += gen.cache.get_seq_length()
        cached_bits += gen.cache.mean_bits() * gen.cache.get_seq_length()
        if progress:
            progress(i + 1, len(work) + len(own))
    for j, (task, length) in enumerate(own, start=len(work) + 1):
        # Tasks with their own requests and metrics (lm-eval) score partly right answers too.
        for index, score in enumerate(task.evaluate(loaded, config, length, samples, seed)):
            per_task[task.name].append(score)
            outcomes.append(
                {"task": task.name, "context_length": length, "index": index, "correct": score}
            )
        if progress:
            progress(j, len(work) + len(own))

    # Tasks that run themselves hand back no prompts: their memory is taken at the longest length.
    longest = max((s.input_ids for _, s in work), key=len, default=None)
    memory_prompt = longest
    memory_length = memory_length or (None if longest else max(context_lengths))
    if memory_length:
        # KV bytes and activations depend on the length only: any seeded tokens will do.
        gen = torch.Generator().manual_seed(memory_length)
        vocab = model.get_input_embeddings().num_embeddings
        memory_prompt = torch.randint(3, vocab, (memory_length,), generator=gen).tolist()
    memory, modeled, effective_bits = _memory(loaded, config, memory_prompt)
    hits = [ok for oks in per_task.values() for ok in oks]
    acc = sum(hits) / len(hits)
    result = {
        "model": loaded.spec.name,
        "model_hash": loaded.model_hash,
        "config": config.to_dict(),
        "config_key": config.key(),
        "label": config.label(),
        "tasks": {
            name: {
                "accuracy": sum(oks) / len(oks),
                "accuracy_ci": list(mean_interval(oks)),
                "n": len(oks),
                "task_hash": get_task(name).task_hash(context_lengths, samples, seed),
            }
            for name, oks in per_task.items()
        },
        "accuracy": acc,
        "accuracy_ci": list(mean_interval(hits)),
        "n": len(hits),
        # Code bits only (k+v)/2, or the realized widths of adaptive/rule; kept under its old name.
        "mean_bits": cached_bits / cached_tokens if cached_tokens else None,
        "nominal_kv_bits": cached_bits / cached_tokens if cached_tokens else None,
        "effective_kv_bits": effective_bits,
        "context_lengths": context_lengths,
        "samples": outcomes,
        "longest_prompt_tokens": len(longest or memory_prompt),
        "memory_tokens": len(memory_prompt),
        "memory": {**memory.to_dict(), "modeled": modeled.to_dict(), "measured": True},
        "timing": {
            "prefill_tokens_per_s": prefill_tokens / prefill_s if prefill_s else None,
            "decode_ms_per_token": 1000 * decode_s / decode_steps if decode_steps else None,
            "prefills_reused": reused,
        },
        "weights": _weights_summary(loaded, config, baseline),
        "source_precision": baseline.source_precision.to_dict(),
        "compute_dtype": dtype_name(compute_dtype(model)),
        "storage_dtype": dtype_name(storage_dtype(model)),
        "threads": torch.get_num_threads(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if perplexity:
        result["perplexity"] = _perplexity(baseline, loaded, config, max(context_lengths), seed)
    return result


_REFERENCES: dict[tuple, str] = {}
_BASELINE_PERPLEXITY: dict[tuple, float] = {}


def _perplexity(
    baseline: LoadedModel, loaded: LoadedModel, config: Config, n_tokens: int, seed: int
) -> dict:
    """Perplexity of the held-out text's second half through the cache (`tasks.perplexity`),
    and its change from the 16-bit baseline (unquantized weights and cache), computed once."""
    ids = torch.tensor([held_out_ids(loaded.tokenizer, n_tokens, seed)])
    key = (baseline.model_hash, source(), n_tokens, seed)
    if key not in _BASELINE_PERPLEXITY:
        _BASELINE_PERPLEXITY[key] = _ppl(baseline.model, ids, Config())
    value, base = _ppl(loaded.model, ids, config), _BASELINE_PERPLEXITY[key]
    return {
        "value": value,
        "tokens": n_tokens - n_tokens // 2,
        "text": source(),
        "baseline": base,
        "delta_vs_baseline": value - base,
    }


def _ppl(model, ids: torch.Tensor, config: Config) -> float:
    logprobs, _ = score_tokens(model, ids, config, start=ids.shape[1] // 2)
    return math.exp(-logprobs.mean().item())


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
) -> tuple[MemoryParts, MemoryParts, float]:
    """Measured and modeled memory for `prompt`, and the effective bits per cached value there:
    the bytes the cache holds at the prompt's end (scales, zeros, full-precision tail and the
    unfilled rows of each store's last block included; modeled, which the tests hold equal to
    measured to the byte) x 8 over the K and V values it stores."""
    model = loaded.model
    ids = torch.tensor([prompt])
    activation, kv = measure_prefill(model, ids, config)
    storage = storage_dtype(model)
    with make_cache(model, config, storage, prompt_length=len(prompt)) as cache:
        modeled_kv, effective = cache.modeled_peak_nbytes(), cache.effective_bits(len(prompt))
    measured = MemoryParts(weights_bytes_measured(model), kv, activation)
    modeled = MemoryParts(
        weights_bytes_modeled(model),
        modeled_kv,
        modeled_activation_peak(model.config, config, len(prompt), compute_dtype(model), storage),
    )
    return measured, modeled, effective


def _weights_summary(loaded: LoadedModel, config: Config, baseline: LoadedModel) -> dict:
    """What the weights were: method, the group sizes actually used, whether read from disk,
    the path their layers take per phase on this machine, and whether they rebuild the grid the
    unquantized weights were stored on upstream."""
    from kvpareto.weights.packed_linear import PackedLinear, kernel_summary
    from kvpareto.weights.source_grid import measured_block, reproduces_source_grid

    method, group, backend = config.weight_method
    groups = sorted({m.group for m in loaded.model.modules() if isinstance(m, PackedLinear)})
    return {
        "method": method,
        "group_size": group or None,
        "effective_group_sizes": groups if method in ("int4", "awq4") else [],
        "awq_backend": backend or None,
        "from_cache": loaded.from_cache if method != "none" else None,
        "kernels": kernel_summary(loaded.model) or None,
        "source_block_measured": measured_block(baseline.model),
        "reproduces_source_grid": reproduces_source_grid(baseline.model, config),
    }


def _check_lengths(loaded: LoadedModel, lengths: list[int], answer_tokens: int) -> None:
    from kvpareto.errors import UserError

    limit = loaded.spec.max_context
    too_long = [n for n in lengths if limit and n + max(32, answer_tokens) > limit]
    if too_long:
        raise UserError(
            f"context length {too_long[0]} does not fit {loaded.spec.name} "
            f"(max {limit} tokens, including room for the answer)"
        )
