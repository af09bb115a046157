"""One trial: a Config run on one model over tasks and context lengths, with honest metrics.

This is the unit that `kvpareto eval` prints and that a search repeats. Accuracy is the mean over
all samples with a 95% interval (`stats.mean_interval`); memory is measured (and modeled) on the
longest prompt, which is what a deployment must hold; timing is prefill tokens/s and decode
ms/token. Every prompt also gets a fidelity score (`kvpareto.fidelity`): the KLD from the 16-bit
baseline's next-token distributions along the baseline's answer, and that answer's
log-probability, each with a bootstrap 95% interval over the samples. The result is a typed
`TrialResult` (`evaluation.result`).

`run_trial` reads as its steps, in the order they call the model; keep that order, since the
reference answers and prefill reuse (`kvpareto.prefill_reuse`) depend on it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from kvpareto.config import Config
from kvpareto.engine import generate, score_tokens
from kvpareto.evaluation.calibration_data import calibration
from kvpareto.evaluation.result import (
    Fidelity,
    Memory,
    Perplexity,
    TaskScore,
    Timing,
    TrialResult,
    WeightsFacts,
)
from kvpareto.fidelity import AnswerFidelity, Reference, compare
from kvpareto.kv import make_cache
from kvpareto.memory import MemoryParts
from kvpareto.memory.measure import (
    measure_prefill,
    weights_bytes_measured,
    weights_bytes_modeled,
)
from kvpareto.memory.model import modeled_activation_peak
from kvpareto.models import LoadedModel
from kvpareto.models.storage_dtype import compute_dtype, dtype_name, storage_dtype
from kvpareto.stats import bootstrap, mean_interval
from kvpareto.tasks import Sample, Task, get_task
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
) -> TrialResult:
    """Evaluate `config`; memory is taken at `memory_length` tokens, or the longest prompt.

    With `perplexity`, the held-out text's perplexity at the longest context length is measured
    too, as a metric of its own beside accuracy."""
    plan = _Plan([get_task(name) for name in task_names], context_lengths, samples, seed)
    _check_lengths(loaded, context_lengths, max(t.max_new_tokens for t in plan.tasks))
    prompts = _prompts(loaded, plan)
    # Reference answers came from the unquantized model; from here on the trial's weights run.
    baseline, loaded = loaded, quantized_model(loaded, config, calibration)
    outcomes = _Outcomes(plan.tasks, len(prompts) + len(plan.own_runs), progress)
    run = _run_prompts(loaded, config, prompts, outcomes)
    _run_own(loaded, config, plan, outcomes)
    memory = _measure_memory(loaded, config, prompts, context_lengths, memory_length)
    result = _assemble(baseline, loaded, config, plan, outcomes, run, memory)
    if perplexity:
        held_out = _perplexity(baseline, loaded, config, max(context_lengths), seed)
        result = replace(result, perplexity=held_out)
    return result


@dataclass(frozen=True)
class _Plan:
    """What the trial was asked to run."""

    tasks: list[Task]
    lengths: list[int]
    samples: int  # per task and length
    seed: int

    @property
    def own_runs(self) -> list[tuple[Task, int]]:
        """(task, length) for the tasks that run themselves (lm-eval), once per length."""
        return [(task, n) for task in self.tasks if task.runs_itself for n in self.lengths]


@dataclass(frozen=True)
class _Prompt:
    task: Task
    sample: Sample
    baseline: Reference  # the unquantized model's answer, for the fidelity score


def _prompts(loaded: LoadedModel, plan: _Plan) -> list[_Prompt]:
    """Every seeded prompt of the tasks that hand theirs out, each with the answer of `loaded`,
    the unquantized model, which also fills in the reference answer of tasks that need one."""
    prompts = []
    for task in plan.tasks:
        if task.runs_itself:
            continue
        for length in plan.lengths:
            for sample in task.samples(loaded.tokenizer, length, plan.samples, plan.seed):
                text, reference = _baseline_answer(loaded, task, sample)
                if task.needs_reference:
                    sample.answer = text
                prompts.append(_Prompt(task, sample, reference))
    return prompts


class _Outcomes:
    """Scores per task and one outcome per sample, in the order they ran; reports progress."""

    def __init__(self, tasks: list[Task], steps: int, progress: Callable[[int, int], None] | None):
        self.tasks = {t.name: t for t in tasks}
        self.scores: dict[str, list[float]] = {t.name: [] for t in tasks}
        self.rows: list[dict] = []
        self.fidelity: list[AnswerFidelity] = []  # of the prompts' samples, in order
        self.steps, self.done, self.progress = steps, 0, progress

    def add(
        self, task: Task, score: float, facts: dict, fidelity: AnswerFidelity | None = None
    ) -> None:
        self.scores[task.name].append(score)
        row = {"task": task.name, **facts, "correct": score}
        if fidelity is not None:
            self.fidelity.append(fidelity)
            row |= {"kld": fidelity.kld, "answer_logprob": fidelity.answer_logprob}
        self.rows.append(row)

    def step(self) -> None:
        self.done += 1
        if self.progress:
            self.progress(self.done, self.steps)


@dataclass(frozen=True)
class _PromptRun:
    timing: Timing
    nominal_kv_bits: float | None  # token-weighted over the prompts; None without prompts


def _run_prompts(
    loaded: LoadedModel, config: Config, prompts: list[_Prompt], outcomes: _Outcomes
) -> _PromptRun:
    """Answer every prompt through the trial's weights and cache, and score the answers, and
    how faithfully the baseline's answer is followed."""
    prefill_tokens = prefill_s = decode_steps = decode_s = 0.0
    reused = 0  # prefills replayed from a recorded forward pass (kvpareto.prefill_reuse)
    cached_tokens = cached_bits = 0.0  # for the mean KV bits, token-weighted over prompts
    for prompt in prompts:
        task, sample = prompt.task, prompt.sample
        ids = torch.tensor([sample.input_ids])
        gen = generate(
            loaded.model,
            loaded.tokenizer,
            ids,
            config,
            task.max_new_tokens,
            logprobs=True,
            follow=prompt.baseline.tokens,
        )
        correct = task.score(sample, gen.text)
        facts = {**sample.meta, **task.details(sample, gen.text)}
        outcomes.add(task, correct, facts, compare(prompt.baseline, gen.answer_logprobs))
        prefill_tokens += gen.prompt_tokens
        prefill_s += gen.prefill_s
        decode_steps += gen.decode_steps
        decode_s += gen.decode_s
        reused += gen.prefill_reused
        cached_tokens += gen.cache.get_seq_length()
        cached_bits += gen.cache.mean_bits() * gen.cache.get_seq_length()
        outcomes.step()
    timing = Timing(
        prefill_tokens_per_s=prefill_tokens / prefill_s if prefill_s else None,
        decode_ms_per_token=1000 * decode_s / decode_steps if decode_steps else None,
        prefills_reused=reused,
    )
    return _PromptRun(timing, cached_bits / cached_tokens if cached_tokens else None)


def _run_own(loaded: LoadedModel, config: Config, plan: _Plan, outcomes: _Outcomes) -> None:
    """Run the tasks with their own requests and metrics (lm-eval); they score partly right
    answers too."""
    for task, length in plan.own_runs:
        scores = task.evaluate(loaded, config, length, plan.samples, plan.seed)
        for index, score in enumerate(scores):
            outcomes.add(task, score, {"context_length": length, "index": index})
        outcomes.step()


@dataclass(frozen=True)
class _MemoryAt:
    memory: Memory
    effective_kv_bits: float
    tokens: int  # the length it was measured at
    longest_prompt_tokens: int


def _measure_memory(
    loaded: LoadedModel,
    config: Config,
    prompts: list[_Prompt],
    lengths: list[int],
    memory_length: int | None,
) -> _MemoryAt:
    """Memory at `memory_length` tokens, or at the longest prompt. Tasks that run themselves
    hand back no prompts: without any, memory is taken at the longest context length."""
    longest = max((p.sample.input_ids for p in prompts), key=len, default=None)
    memory_prompt = longest
    memory_length = memory_length or (None if longest else max(lengths))
    if memory_length:
        # KV bytes and activations depend on the length only: any seeded tokens will do.
        gen = torch.Generator().manual_seed(memory_length)
        vocab = loaded.model.get_input_embeddings().num_embeddings
        memory_prompt = torch.randint(3, vocab, (memory_length,), generator=gen).tolist()
    memory, effective_bits = _memory(loaded, config, memory_prompt)
    return _MemoryAt(memory, effective_bits, len(memory_prompt), len(longest or memory_prompt))


def _assemble(
    baseline: LoadedModel,
    loaded: LoadedModel,
    config: Config,
    plan: _Plan,
    outcomes: _Outcomes,
    run: _PromptRun,
    memory: _MemoryAt,
) -> TrialResult:
    """The result: scores per task and over all, with what the weights, cache and model were."""
    hits = [ok for oks in outcomes.scores.values() for ok in oks]
    model = loaded.model
    return TrialResult(
        model=loaded.spec.name,
        model_hash=loaded.model_hash,
        config=config,
        config_key=config.key(),
        label=config.label(),
        tasks={
            name: TaskScore(
                accuracy=sum(oks) / len(oks),
                accuracy_ci=mean_interval(oks),
                n=len(oks),
                task_hash=outcomes.tasks[name].task_hash(plan.lengths, plan.samples, plan.seed),
            )
            for name, oks in outcomes.scores.items()
        },
        accuracy=sum(hits) / len(hits),
        accuracy_ci=mean_interval(hits),
        n=len(hits),
        fidelity=_fidelity(outcomes.fidelity),
        nominal_kv_bits=run.nominal_kv_bits,
        effective_kv_bits=memory.effective_kv_bits,
        context_lengths=plan.lengths,
        samples=outcomes.rows,
        longest_prompt_tokens=memory.longest_prompt_tokens,
        memory_tokens=memory.tokens,
        memory=memory.memory,
        timing=run.timing,
        weights=_weights_facts(loaded, config, baseline),
        source_precision=baseline.source_precision,
        compute_dtype=dtype_name(compute_dtype(model)),
        storage_dtype=dtype_name(storage_dtype(model)),
        threads=torch.get_num_threads(),
        when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def _fidelity(samples: list[AnswerFidelity]) -> Fidelity | None:
    """Means over the samples, with bootstrap intervals (the scores are continuous); None for a
    trial whose tasks all run themselves."""
    if not samples:
        return None
    kld, logprob = [s.kld for s in samples], [s.answer_logprob for s in samples]
    return Fidelity(
        kld=sum(kld) / len(kld),
        kld_ci=bootstrap(kld),
        answer_logprob=sum(logprob) / len(logprob),
        answer_logprob_ci=bootstrap(logprob),
        n=len(samples),
    )


_BASELINE_ANSWERS: dict[tuple, tuple[str, Reference]] = {}
_BASELINE_PERPLEXITY: dict[tuple, float] = {}


def _perplexity(
    baseline: LoadedModel, loaded: LoadedModel, config: Config, n_tokens: int, seed: int
) -> Perplexity:
    """Perplexity of the held-out text's second half through the cache (`tasks.perplexity`),
    and its change from the 16-bit baseline (unquantized weights and cache), computed once."""
    ids = torch.tensor([held_out_ids(loaded.tokenizer, n_tokens, seed)])
    key = (baseline.model_hash, source(), n_tokens, seed)
    if key not in _BASELINE_PERPLEXITY:
        _BASELINE_PERPLEXITY[key] = _ppl(baseline.model, ids, Config())
    value = _ppl(loaded.model, ids, config)
    return Perplexity(value, n_tokens - n_tokens // 2, source(), _BASELINE_PERPLEXITY[key])


def _ppl(model, ids: torch.Tensor, config: Config) -> float:
    logprobs, _ = score_tokens(model, ids, config, start=ids.shape[1] // 2)
    return math.exp(-logprobs.mean().item())


def _baseline_answer(loaded: LoadedModel, task, sample) -> tuple[str, Reference]:
    """The 16-bit cache's greedy continuation of a prompt on the unquantized model, as text and
    as a fidelity `Reference`; computed once per model and prompt in a process and held in
    memory (a reference is a few kB), so every trial's figures depend on the prompt alone."""
    key = (loaded.model_hash, task.name, task.version, tuple(sample.input_ids))
    if key not in _BASELINE_ANSWERS:
        ids = torch.tensor([sample.input_ids])
        gen = generate(
            loaded.model, loaded.tokenizer, ids, Config(), task.max_new_tokens, logprobs=True
        )
        reference = Reference.from_logprobs(gen.new_tokens, gen.answer_logprobs)
        _BASELINE_ANSWERS[key] = gen.text, reference
    return _BASELINE_ANSWERS[key]


def _memory(loaded: LoadedModel, config: Config, prompt: list[int]) -> tuple[Memory, float]:
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
    return Memory(measured, modeled), effective


def _weights_facts(loaded: LoadedModel, config: Config, baseline: LoadedModel) -> WeightsFacts:
    """What the weights were: method, the group sizes actually used, whether read from disk,
    the path their layers take per phase on this machine, and whether they rebuild the grid the
    unquantized weights were stored on upstream."""
    from kvpareto.weights.packed_linear import PackedLinear, kernel_summary
    from kvpareto.weights.source_grid import measured_block, reproduces_source_grid

    method, group, backend = config.weight_method
    layers = [m for m in loaded.model.modules() if isinstance(m, PackedLinear)]
    groups = sorted({m.group for m in layers if not m.embedding_table})
    return WeightsFacts(
        method=method,
        group_size=group or None,
        effective_group_sizes=tuple(groups) if method in ("int4", "awq4") else (),
        awq_backend=backend or None,
        from_cache=loaded.from_cache if loaded is not baseline else None,
        kernels=kernel_summary(loaded.model) or None,
        source_block_measured=measured_block(baseline.model),
        reproduces_source_grid=reproduces_source_grid(baseline.model, config),
    )


def _check_lengths(loaded: LoadedModel, lengths: list[int], answer_tokens: int) -> None:
    from kvpareto.errors import UserError

    limit = loaded.spec.max_context
    too_long = [n for n in lengths if limit and n + max(32, answer_tokens) > limit]
    if too_long:
        raise UserError(
            f"context length {too_long[0]} does not fit {loaded.spec.name} "
            f"(max {limit} tokens, including room for the answer)"
        )
