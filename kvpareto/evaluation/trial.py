"""One trial: a Config run on one model over tasks and context lengths, with honest metrics.

This is the unit that `kvpareto eval` prints and that a search repeats. Accuracy is the mean over
all samples with a 95% interval (`stats.mean_interval`); memory is measured (and modeled) on the
longest prompt, which is what a deployment must hold; timing is prefill tokens/s and decode
ms/token. Every prompt also gets a fidelity score (`kvpareto.fidelity`): the KLD from the 16-bit
baseline's next-token distributions along the baseline's answer, and that answer's
log-probability, each with a bootstrap 95% interval over the samples. The result is a typed
`TrialResult` (`evaluation.result`).

`TrialRun.result` reads as its steps, in the order they call the model; keep that order, since
the reference answers and prefill reuse (`kvpareto.prefill_reuse`) depend on it. A search's
racing (`search.racing`) answers a trial in slices, first samples first; `run_trial` is one slice
of them all.
"""

from __future__ import annotations

import hashlib
import json
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
    run = TrialRun(
        loaded, config, task_names, context_lengths, samples, seed, progress, memory_length
    )
    return run.result(samples, perplexity=perplexity)


class TrialRun:
    """One trial answered in slices, for multi-fidelity racing (`search.racing`).

    `result(n)` answers the prompts among the first `n` samples per task and length that have
    not run yet, and returns the result over every sample answered so far. The prompts are
    always the full plan's (`samples` per task and length, then `extra` more drawn with another
    seed, `extra_seed`), so a slice's samples are exactly the first ones of the full run's,
    whatever the task does with its sample count, and the last slice's result equals a plain
    run's: rows keep the plan's order and memory is measured once. Tasks that run themselves
    (lm-eval) answer all their samples in the first slice.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        config: Config,
        task_names: list[str],
        context_lengths: list[int],
        samples: int,
        seed: int,
        progress: Callable[[int, int], None] | None = None,
        memory_length: int | None = None,
        extra: int = 0,
    ):
        tasks = [get_task(name) for name in task_names]
        self.plan = _Plan(tasks, context_lengths, samples, seed, extra)
        _check_lengths(loaded, context_lengths, max(t.max_new_tokens for t in tasks))
        self.baseline, self.config, self.memory_length = loaded, config, memory_length
        self.prompts = _prompts(loaded, self.plan)
        self.outcomes = _Outcomes(tasks, len(self.prompts) + len(self.plan.own_runs), progress)
        self.timer = _Timer()
        self.answered: set[int] = set()  # positions in `prompts`
        self.loaded: LoadedModel | None = None  # the trial's weights, once quantized
        self.memory: _MemoryAt | None = None
        self.held_out: Perplexity | None = None
        self.own_taken = False  # the tasks that run themselves came from an earlier record

    def reuse(self, earlier: TrialResult) -> int:
        """Take the outcomes of `earlier`, this config's plain run over the plan's first `samples`
        per task and length (a knee top-up's own full trial, from the trial cache), instead of
        answering those prompts again; returns how many outcomes were taken.

        A record is taken only if it matches the plan: the same task hashes (tasks, lengths,
        samples and seed), one row per prompt among the first `samples`, in plan order, each
        with the score and fidelity figures `_assemble` reads. A record that does not match is
        left alone and every prompt is answered. Timing and the mean KV bits stay over the
        prompts answered here (a record keeps neither per prompt).
        """
        if self.answered or self.outcomes.by_place:
            raise RuntimeError("reuse() must come before the first result()")
        plain = replace(self.plan, extra=0)  # the plan of the run `earlier` must be
        if {n: s.task_hash for n, s in earlier.tasks.items()} != {
            t.name: plain.task_hash(t) for t in plain.tasks
        }:
            return 0
        first = [i for i, p in enumerate(self.prompts) if p.index < self.plan.samples]
        rows = list(earlier.samples)
        own = rows[len(first) :]
        if len(rows) < len(first) or not all(
            _same_prompt(rows[k], self.prompts[i]) for k, i in enumerate(first)
        ):
            return 0
        own_places = self._own_places(own)
        if own_places is None:
            return 0
        for k, position in enumerate(first):
            row = rows[k]
            fidelity = AnswerFidelity(row["kld"], row["answer_logprob"])
            self.outcomes.take((position, 0), row, fidelity)
            self.outcomes.step()
        for place, row in zip(own_places, own, strict=True):
            self.outcomes.take(place, row)
        for _ in {place[0] for place in own_places}:
            self.outcomes.step()
        self.answered.update(first)
        self.own_taken = bool(own)
        return len(rows)

    def _own_places(self, rows: list[dict]) -> list[tuple[int, int]] | None:
        """The outcome places of an earlier record's rows of the tasks that run themselves
        (they get no extra samples, so a record holds all of theirs); None if they do not
        cover exactly this plan's runs of those tasks."""
        runs = {(t.name, n): r for r, (t, n) in enumerate(self.plan.own_runs)}
        places = []
        for row in rows:
            run = runs.get((row["task"], row.get("context_length")))
            if run is None:
                return None
            places.append((len(self.prompts) + run, row["index"]))
        if {p[0] for p in places} != {len(self.prompts) + r for r in runs.values()}:
            return None
        return places

    def result(self, n: int, perplexity: bool = False) -> TrialResult:
        """The result over the first `n` samples per task and length (tasks that run themselves:
        all of theirs), answering only those not answered yet."""
        first = self.loaded is None
        if first:  # reference answers came from the unquantized model; now the trial's weights
            self.loaded = quantized_model(self.baseline, self.config, calibration)
        todo = [i for i, p in enumerate(self.prompts) if p.index < n and i not in self.answered]
        _run_prompts(self.loaded, self.config, self.prompts, todo, self.outcomes, self.timer)
        self.answered.update(todo)
        if first:
            if not self.own_taken:
                _run_own(self.loaded, self.config, self.plan, self.outcomes, len(self.prompts))
            self.memory = _measure_memory(
                self.loaded, self.config, self.prompts, self.plan.lengths, self.memory_length
            )
        result = _assemble(
            self.baseline,
            self.loaded,
            self.config,
            self.plan,
            self.outcomes,
            self.timer,
            self.memory,
        )
        if perplexity and self.held_out is None:
            self.held_out = _perplexity(
                self.baseline, self.loaded, self.config, max(self.plan.lengths), self.plan.seed
            )
        return replace(result, perplexity=self.held_out) if perplexity else result


def _same_prompt(row: dict, prompt: _Prompt) -> bool:
    """Whether an earlier record's row answered `prompt`: its task, the facts its sample
    carries (length, depth, ...), and the fidelity figures, which `reuse` needs."""
    meta = prompt.sample.meta
    return (
        row.get("task") == prompt.task.name
        and all(row.get(k) == v for k, v in meta.items())
        and "kld" in row
        and "answer_logprob" in row
    )


def extra_seed(seed: int) -> int:
    """The seed of the samples drawn beyond a study's own (`TrialRun`'s `extra`): another seed,
    so every task's first `samples` prompts stay those of the plain run."""
    return seed + 1_000_003


@dataclass(frozen=True)
class _Plan:
    """What the trial was asked to run."""

    tasks: list[Task]
    lengths: list[int]
    samples: int  # per task and length
    seed: int
    extra: int = 0  # samples per task and length beyond `samples`, drawn with `extra_seed`

    @property
    def own_runs(self) -> list[tuple[Task, int]]:
        """(task, length) for the tasks that run themselves (lm-eval), once per length."""
        return [(task, n) for task in self.tasks if task.runs_itself for n in self.lengths]

    def task_hash(self, task: Task) -> str:
        plain = task.task_hash(self.lengths, self.samples, self.seed)
        if not self.extra or task.runs_itself:  # tasks that run themselves get no extra
            return plain
        blob = json.dumps([plain, "extra", self.extra, extra_seed(self.seed)])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def draw(self, task: Task, tokenizer, length: int) -> list[Sample]:
        drawn = task.samples(tokenizer, length, self.samples, self.seed)
        if self.extra:
            drawn += task.samples(tokenizer, length, self.extra, extra_seed(self.seed))
        return drawn


@dataclass(frozen=True)
class _Prompt:
    task: Task
    sample: Sample
    baseline: Reference  # the unquantized model's answer, for the fidelity score
    index: int  # its place among its task's samples at its length


def _prompts(loaded: LoadedModel, plan: _Plan) -> list[_Prompt]:
    """Every seeded prompt of the tasks that hand theirs out, each with the answer of `loaded`,
    the unquantized model, which also fills in the reference answer of tasks that need one."""
    prompts = []
    for task in plan.tasks:
        if task.runs_itself:
            continue
        for length in plan.lengths:
            for index, sample in enumerate(plan.draw(task, loaded.tokenizer, length)):
                text, reference = _baseline_answer(loaded, task, sample)
                if task.needs_reference:
                    sample.answer = text
                prompts.append(_Prompt(task, sample, reference, index))
    return prompts


class _Outcomes:
    """One outcome per sample, kept by its place in the plan (prompts first, then the tasks that
    run themselves), so slices answered in any order read back in the plain run's order;
    reports progress."""

    def __init__(self, tasks: list[Task], steps: int, progress: Callable[[int, int], None] | None):
        self.tasks = {t.name: t for t in tasks}
        self.by_place: dict[tuple[int, int], tuple[str, float, dict, AnswerFidelity | None]] = {}
        self.steps, self.done, self.progress = steps, 0, progress

    def add(
        self,
        place: tuple[int, int],
        task: Task,
        score: float,
        facts: dict,
        fidelity: AnswerFidelity | None = None,
    ) -> None:
        row = {"task": task.name, **facts, "correct": score}
        if fidelity is not None:
            row |= {"kld": fidelity.kld, "answer_logprob": fidelity.answer_logprob}
        self.by_place[place] = (task.name, score, row, fidelity)

    def take(self, place: tuple[int, int], row: dict, fidelity: AnswerFidelity | None = None):
        """Keep a row an earlier run recorded (`TrialRun.reuse`) as this place's outcome."""
        self.by_place[place] = (row["task"], row["correct"], row, fidelity)

    def _ordered(self):
        return [self.by_place[k] for k in sorted(self.by_place)]

    @property
    def scores(self) -> dict[str, list[float]]:
        """Scores per task, of the tasks with any sample answered."""
        scores: dict[str, list[float]] = {}
        for name, score, _, _ in self._ordered():
            scores.setdefault(name, []).append(score)
        return {name: scores[name] for name in self.tasks if name in scores}

    @property
    def rows(self) -> list[dict]:
        return [row for _, _, row, _ in self._ordered()]

    @property
    def fidelity(self) -> list[AnswerFidelity]:
        """Of the prompts' samples, in order."""
        return [f for _, _, _, f in self._ordered() if f is not None]

    def step(self) -> None:
        self.done += 1
        if self.progress:
            self.progress(self.done, self.steps)


@dataclass
class _Timer:
    """Prompt timings summed over every slice, and the cached bits for the mean KV bits."""

    prefill_tokens: float = 0.0
    prefill_s: float = 0.0
    decode_steps: float = 0.0
    decode_s: float = 0.0
    reused: int = 0  # prefills replayed from a recorded forward pass (kvpareto.prefill_reuse)
    cached_tokens: float = 0.0  # for the mean KV bits, token-weighted over prompts
    cached_bits: float = 0.0

    @property
    def timing(self) -> Timing:
        return Timing(
            prefill_tokens_per_s=self.prefill_tokens / self.prefill_s if self.prefill_s else None,
            decode_ms_per_token=1000 * self.decode_s / self.decode_steps
            if self.decode_steps
            else None,
            prefills_reused=self.reused,
        )

    @property
    def nominal_kv_bits(self) -> float | None:
        """Token-weighted over the prompts; None without prompts."""
        return self.cached_bits / self.cached_tokens if self.cached_tokens else None


def _run_prompts(
    loaded: LoadedModel,
    config: Config,
    prompts: list[_Prompt],
    todo: list[int],
    outcomes: _Outcomes,
    timer: _Timer,
) -> None:
    """Answer the prompts at positions `todo` through the trial's weights and cache, and score
    the answers, and how faithfully the baseline's answer is followed."""
    for position in todo:
        prompt = prompts[position]
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
        fidelity = compare(prompt.baseline, gen.answer_logprobs)
        outcomes.add((position, 0), task, correct, facts, fidelity)
        timer.prefill_tokens += gen.prompt_tokens
        timer.prefill_s += gen.prefill_s
        timer.decode_steps += gen.decode_steps
        timer.decode_s += gen.decode_s
        timer.reused += gen.prefill_reused
        timer.cached_tokens += gen.cache.get_seq_length()
        timer.cached_bits += gen.cache.mean_bits() * gen.cache.get_seq_length()
        outcomes.step()


def _run_own(
    loaded: LoadedModel, config: Config, plan: _Plan, outcomes: _Outcomes, after: int
) -> None:
    """Run the tasks with their own requests and metrics (lm-eval); they score partly right
    answers too. Their outcomes go after the `after` prompts."""
    for run, (task, length) in enumerate(plan.own_runs):
        scores = task.evaluate(loaded, config, length, plan.samples, plan.seed)
        for index, score in enumerate(scores):
            facts = {"context_length": length, "index": index}
            outcomes.add((after + run, index), task, score, facts)
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
    timer: _Timer,
    memory: _MemoryAt,
) -> TrialResult:
    """The result: scores per task and over all, with what the weights, cache and model were."""
    scores = outcomes.scores
    hits = [ok for oks in scores.values() for ok in oks]
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
                task_hash=plan.task_hash(outcomes.tasks[name]),
            )
            for name, oks in scores.items()
        },
        accuracy=sum(hits) / len(hits),
        accuracy_ci=mean_interval(hits),
        n=len(hits),
        fidelity=_fidelity(outcomes.fidelity),
        nominal_kv_bits=timer.nominal_kv_bits,
        effective_kv_bits=memory.effective_kv_bits,
        context_lengths=plan.lengths,
        samples=outcomes.rows,
        longest_prompt_tokens=memory.longest_prompt_tokens,
        memory_tokens=memory.tokens,
        memory=memory.memory,
        timing=timer.timing,
        weights=_weights_facts(loaded, config, baseline),
        source_precision=baseline.source_precision,
        compute_dtype=dtype_name(compute_dtype(model)),
        storage_dtype=dtype_name(storage_dtype(model)),
        threads=torch.get_num_threads(),
        device=next(model.parameters()).device.type,
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
