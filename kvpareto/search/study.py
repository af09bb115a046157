"""`kvpareto search`: a multi-objective Optuna study per model over a search space.

Each trial is one Config evaluated by `evaluation.trial.run_trial`: objectives are two or three of
total memory in MB at the declared context length (minimize), mean accuracy (maximize), mean KLD
from the 16-bit baseline's answers (minimize, `kvpareto.fidelity`) and decode latency (minimize);
memory and accuracy by default. The memory budget is a constraint, set with
`trial.set_constraint` (feasible when <= 0).

Reliability rules:
- Baselines are enqueued first: the 16-bit cache, the space's own `baselines`, then `--baseline`
  files.
- Results are cached by (config, tasks, model, settings, samples run): duplicates and re-runs
  cost nothing, and a trial stopped at its first rung is never served as a full one.
- Racing (`search.racing`): a trial first runs `min_samples` per task and length and stops
  there when a cheaper finished trial is already shown more accurate on their common samples;
  after the last trial the knee and its neighbours get `knee_samples` (trials of their own,
  marked `top_up_of`, which `--trials` does not count; their first samples are read from their
  full trial's cached record), again for the new knee's group where the top-up moved the knee.
- A trial that raises (out of memory, NaN logits, a bug) is recorded FAIL with its reason; the
  search goes on.
- Re-running the same study resumes it: trials left RUNNING by a killed process are marked FAIL
  and their config is enqueued again, so at most one trial is redone per dead worker. Only local
  storages are cleaned this way (their workers all belong to this command); PostgreSQL studies
  shared by many machines are left alone.
- `--trials N` is the number of finished trials the study should hold. A trial cut short by a
  killed process does not count (it is redone), nor does a config the study already ran (the
  sampler proposed it again and the cache answered it for free; `repeat_of` names the first),
  until repeats pass (REPEAT_LIMIT - 1) x N: a sampler that only repeats itself has converged.
  K local workers split the remainder; this process then runs what their repeats left.
- Ctrl-C stops after the current trial; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from kvpareto.config import Config, canonical
from kvpareto.errors import UserError
from kvpareto.evaluation.result import TrialResult
from kvpareto.hardware import ComputeDtype, resolve_compute_dtype, resolve_device
from kvpareto.search.racing import RacedOut, default_min_samples, raced_out, rivals
from kvpareto.search.samplers import (
    REPEAT_LIMIT,
    SAMPLERS,
    enqueue_fixed,
    make_sampler,
    trial_config,
)
from kvpareto.search.space import SearchSpace
from kvpareto.search.store import TrialCache, check_storage, resolve_storage

# Each objective's direction, in the order a study lists them.
OBJECTIVES = {
    "memory": "minimize",
    "accuracy": "maximize",
    "kld": "minimize",
    "latency": "minimize",
}


# Room left for the answer after the prompt: a context length must leave it free.
ANSWER_ROOM = 32

# Defining settings added after studies recorded theirs, with the value every older study had.
DEFINING_BEFORE_RECORDED = {"device": "cpu"}


def check_fits(model: str, length: int, limit: int) -> None:
    """A one-line error when `length` tokens (and the answer) exceed the model's context."""
    if limit and length + ANSWER_ROOM > limit:
        raise UserError(
            f"--context-length {length} does not fit {model} (max {limit} tokens, "
            f"{ANSWER_ROOM} of them left for the answer)"
        )


@dataclass
class SearchSettings:
    model: str
    space_path: str
    tasks: list[str]
    context_length: int
    trials: int
    sampler: str = "tpe"
    seed: int = 0
    budget_mb: float | None = None
    study: str = "default"
    storage: str | None = None
    workers: int = 1
    out: str = "results"
    objectives: list[str] = field(default_factory=lambda: ["memory", "accuracy"])
    samples: int = 5  # per task and length, at full fidelity
    min_samples: int | None = None  # racing's first rung; None: `racing.default_min_samples`
    knee_samples: int | None = None  # knee top-up per task and length; None: 2 x samples; 0: off
    lengths: list[int] = field(default_factory=list)  # task prompt lengths; default: context
    dtype: str = "auto"  # the compute dtype asked for; `compute` is what it resolves to here
    storage_dtype: str = "bfloat16"  # what float weights and full-precision K/V are held in
    threads: int | None = None
    device: str = "auto"  # asked for; `device_type` is what it resolves to here
    perplexity: bool = False  # also measure held-out perplexity (reported, not an objective)
    # configs to evaluate first, after the space's baselines (`search --baseline FILE`)
    baselines: list[dict] = field(default_factory=list)

    def validate(self) -> None:
        if self.sampler not in SAMPLERS:
            choices = ", ".join(SAMPLERS.names())
            raise UserError(f"--sampler must be one of {choices}; got {self.sampler!r}")
        self._validate_objectives()
        if self.trials < 1:
            raise UserError(f"--trials must be at least 1; got {self.trials}")
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1; got {self.workers}")
        if self.budget_mb is not None and not self.budget_mb > 0:
            raise UserError(f"--budget-mb must be a positive number of MB; got {self.budget_mb}")
        if self.context_length < 64:
            raise UserError(
                f"--context-length must be at least 64 tokens; got {self.context_length}"
            )
        for data in self.baselines:
            canonical(data)  # a bad baseline file fails before the model loads
        if self.min_samples is not None and not 0 <= self.min_samples <= self.samples:
            raise UserError(
                f"--min-samples must be 0 to --samples ({self.samples}); got {self.min_samples}"
            )
        if self.knee_samples is not None and 0 < self.knee_samples <= self.samples:
            raise UserError(
                f"--knee-samples must exceed --samples ({self.samples}), or be 0 (off); "
                f"got {self.knee_samples}"
            )
        if any(n > self.context_length for n in self.lengths):
            raise UserError("task lengths cannot exceed --context-length")
        if not self.study or any(c in self.study for c in "/\\ "):
            raise UserError(
                f"--study must be a plain name (no slashes or spaces); got {self.study!r}"
            )
        check_storage(self.storage, self.workers)
        # --device cuda without a GPU, or a CPU-only knob value off the CPU, fails here.
        _ = self.device_type
        from kvpareto.models import resolve_ref

        kind, spec = resolve_ref(self.model)
        limit = spec.max_context if kind == "catalog" else 0
        check_fits(self.model, self.context_length, limit)

    def _knob_choices(self) -> dict[str, list]:
        """Each knob's values that the space and the baselines may run."""
        from kvpareto.search.space import load_space

        choices = {k: list(v) for k, v in load_space(self.space_path).choices.items()}
        for config in (canonical(data) for data in self.baselines):
            for knob, value in config.to_dict().items():
                choices.setdefault(knob, []).append(value)
        return choices

    def _validate_objectives(self) -> None:
        ordered = [o for o in OBJECTIVES if o in self.objectives]
        if (
            ordered != self.objectives
            or not 2 <= len(ordered) <= 3
            or not {"accuracy", "kld"} & set(ordered)
        ):
            raise UserError(
                "--objectives takes two or three of memory, accuracy, kld, latency, in that "
                "order, with accuracy or kld among them (e.g. memory,accuracy or memory,kld); "
                f"got {','.join(self.objectives)}"
            )
        from kvpareto.evaluation import get_task

        if "kld" in self.objectives and all(get_task(t).runs_itself for t in self.tasks):
            raise UserError(
                "--objectives kld needs a task that hands out its prompts (lm-eval tasks "
                "score themselves, with no baseline answer to follow)"
            )

    @cached_property
    def device_type(self) -> str:
        """The device resolved on this machine (cpu or cuda): where trials run. `auto` keeps a
        space with CPU-only knob values (weight quantization) on the CPU."""
        import torch

        if self.device == "cpu" or not torch.cuda.is_available():  # the space cannot matter
            return resolve_device(self.device)
        return resolve_device(self.device, self._knob_choices())

    @cached_property
    def compute(self) -> ComputeDtype:
        """The compute dtype resolved on this machine: what trials run in and are keyed by."""
        return resolve_compute_dtype(self.dtype, self.device_type)

    @property
    def rung(self) -> int | None:
        """Samples per task and length of racing's first rung; None when racing is off."""
        m = default_min_samples(self.samples) if self.min_samples is None else self.min_samples
        return m if 0 < m < self.samples else None

    @property
    def top_up(self) -> int:
        """Samples per task and length the knee is given after the search; 0 when off. The
        default doubles `samples`: a top-up reads its first `samples` from its full trial's
        record (`TrialRun.reuse`), so it costs what it adds, about one trial per config."""
        return 2 * self.samples if self.knee_samples is None else self.knee_samples

    @property
    def task_lengths(self) -> list[int]:
        return self.lengths or [self.context_length]

    def defining(self) -> dict:
        """The settings that decide what a trial's figures mean (`Search.check_resumable`)."""
        return {
            "tasks": list(self.tasks),
            "task_lengths": self.task_lengths,
            "samples": self.samples,
            "seed": self.seed,
            "context_length": self.context_length,
            "objectives": list(self.objectives),
            "budget_mb": self.budget_mb,  # each trial's feasibility is set against it
            "compute_dtype": self.compute.name,
            "storage_dtype": self.storage_dtype,
            "device": self.device_type,
        }

    def study_dir(self) -> Path:
        return Path(self.out) / self.model.replace("/", "_") / self.study


def eval_key(
    config: Config, model_hash: str, s: SearchSettings, samples_run: int | None = None
) -> str:
    """Identity of one evaluation: the trial cache key (task hashes enter through tasks+lengths).
    `samples_run` per task and length, when not `s.samples`: racing's first rung (the first of
    the study's samples) or the knee's top-up (more, `TrialRun`'s extra)."""
    from kvpareto.evaluation import get_task

    tasks = [get_task(t).task_hash(s.task_lengths, s.samples, s.seed) for t in s.tasks]
    identity = [config.key(), model_hash, tasks, s.context_length, s.compute.name]
    if samples_run is not None and samples_run != s.samples:  # a full run keeps its old key
        identity.append({"samples_run": samples_run})
    if s.storage_dtype != s.compute.name:  # equal dtypes keep the keys made before the split
        identity.append({"storage_dtype": s.storage_dtype})
    if s.device_type != "cpu":  # the CPU keeps the keys made before --device
        identity.append({"device": s.device_type})
    if s.perplexity:  # only when asked, so caches written before it existed stay valid
        from kvpareto.engine import SCORING_VERSION
        from kvpareto.tasks.perplexity import source

        identity.append(f"perplexity of {source()}, scoring v{SCORING_VERSION}")
    if config.kv_scheme == "adaptive":  # the controller file's contents, not just its name
        from kvpareto.kv.controller import controller_hash

        identity.append(controller_hash(config.controller))
    blob = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class _StopRequests:
    """First Ctrl-C: finish the current trial, then stop. Second: stop now."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


class Search:
    """One model's study: owns the Optuna study, the trial cache and the loaded model."""

    def __init__(self, settings: SearchSettings, space: SearchSpace, worker: int = 0):
        import optuna

        self.s = settings
        self.space = space
        self.dir = settings.study_dir()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cache = TrialCache(
            Path(settings.out) / settings.model.replace("/", "_") / "trial-cache"
        )
        self.local_storage = settings.storage is None or not settings.storage.startswith(
            "postgresql"
        )
        storage = resolve_storage(settings.storage, self.dir, settings.workers)
        directions = [OBJECTIVES[name] for name in settings.objectives]
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures show in our table
        self.study = optuna.create_study(
            study_name=f"{settings.study}:{settings.model}",
            storage=storage,
            directions=directions,
            # Local workers seeded alike would propose the same configs at the same time (each
            # runs before the other's result is in), so worker i's sampler gets seed + i. The
            # task data keeps `seed`: every worker runs the same prompts.
            sampler=make_sampler(settings.sampler, settings.seed + worker),
            load_if_exists=True,
        )
        self.target = settings.trials  # finished trials to reach (`prepare` sets a grid's)
        self.loaded = None
        self.left_out_groups: list[int] = []  # weight groups that would rebuild the source grid

    # --- bookkeeping ---------------------------------------------------------------------------
    def check_resumable(self) -> None:
        """Refuse to resume a study with settings that change what its trials' figures mean
        (tasks, lengths, samples, seed, dtypes...): one frontier would mix incomparable
        trials. A new study records its settings; one from before they were recorded is
        checked against the study.json beside it."""
        wanted = self.s.defining()
        if not self.study.get_trials(deepcopy=False):
            self.study.set_user_attr("defining", wanted)
            return
        held = self.study.user_attrs.get("defining")
        if held is None and (self.dir / "study.json").is_file():
            facts = json.loads((self.dir / "study.json").read_text())
            held = {k: facts.get(k) for k in wanted}
        if held is not None:  # a setting recorded later has its old value where it is absent
            held = {**DEFINING_BEFORE_RECORDED, **{k: v for k, v in held.items() if v is not None}}
        changed = [k for k in wanted if held is not None and held.get(k) != wanted[k]]
        if changed:
            was = ", ".join(f"{k} {held.get(k)}" for k in changed)
            now = ", ".join(f"{k} {wanted[k]}" for k in changed)
            raise UserError(
                f"study {self.s.study!r} of {self.s.model} was run with {was}; this command "
                f"asks for {now}: pass those settings to resume it, or another --study"
            )

    def finished(self) -> int:
        from optuna.trial import TrialState

        states = (TrialState.COMPLETE, TrialState.FAIL)
        trials = self.study.get_trials(deepcopy=False, states=states)
        # Top-ups come on top. A trial whose worker died mid-trial (FAIL with no error, see
        # `prepare`) is run again, so it is not one of the N: a crash costs no finished trial.
        counted = [
            t
            for t in trials
            if "top_up_of" not in t.user_attrs
            and (t.state == TrialState.COMPLETE or "error" in t.user_attrs)
        ]
        # A repeated config cost nothing, so it is not one of the N either, up to a limit.
        repeats = sum("repeat_of" in t.user_attrs for t in counted)
        return len(counted) - min(repeats, (REPEAT_LIMIT - 1) * self.s.trials)

    def _first_trial_of(self, key: str, before: int) -> int | None:
        """The number of the study's first complete trial of config `key` (not a top-up)."""
        from optuna.trial import TrialState

        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            config = t.user_attrs.get("config")
            first = t.number < before and config and "top_up_of" not in t.user_attrs
            if first and Config.from_dict(config).key() == key:
                return t.number
        return None

    def prepare(self) -> int:
        """Enqueue baselines (first run) or recover a killed run; return the trials left to run."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        if not trials:
            first = [canonical(Config()), *self.space.baselines]
            first += [canonical(data) for data in self.s.baselines]
            if self.s.sampler == "grid":
                first += self.space.grid()
            enqueue_fixed(self.study, self.space, first, self._n_layers())
        elif self.local_storage:
            for t in trials:
                if t.state == TrialState.RUNNING:
                    # Optuna's public API cannot attach a reason to another process's trial: a
                    # FAIL without an error attribute reads as interrupted (outputs.INTERRUPTED).
                    self.study.tell(t.number, state=TrialState.FAIL)
                    redo = t.user_attrs.get("config")
                    if redo:
                        redo = Config.from_dict(redo)
                        enqueue_fixed(self.study, self.space, [redo], self._n_layers())
        self.target = self.s.trials
        if self.s.sampler == "grid":
            self.target = max(self.target, len(self.study.get_trials(deepcopy=False)))
        return max(self.target - self.finished(), 0)

    # --- running -------------------------------------------------------------------------------
    def load_model(self):
        import torch

        from kvpareto.models import load_model

        if self.s.threads:
            torch.set_num_threads(self.s.threads)
        self.loaded = load_model(
            self.s.model,
            dtype=getattr(torch, self.s.compute.name),
            storage_dtype=getattr(torch, self.s.storage_dtype),
            device=self.s.device_type,
        )
        check_fits(self.s.model, self.s.context_length, self.loaded.spec.max_context)
        self._leave_out_source_grid()

    def _leave_out_source_grid(self) -> None:
        """On weights stored on a 4-bit grid upstream, an int4 group equal to the source block
        rebuilds that grid, and its accuracy cost is not a 16->4-bit cost: leave it out. Every
        worker decides the same from the same weights, so they share one space."""
        from kvpareto.weights.source_grid import aligned_groups

        if not {"int4", "awq4"} & set(self.space.choices.get("weights", ())):
            return
        offered = self.space.choices.get("weight_group_size", ())
        narrowed = self.space.without_weight_groups(aligned_groups(self.loaded.model, offered))
        self.left_out_groups = [
            g for g in offered if g not in narrowed.choices["weight_group_size"]
        ]
        self.space = narrowed

    def _n_layers(self) -> int:
        return self.loaded.model.config.get_text_config().num_hidden_layers

    def objective(self, trial):
        config = trial_config(trial, self.space, self._n_layers())
        trial.set_user_attr("config", config.to_dict())
        trial.set_user_attr("label", config.label())
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        try:
            result, samples_run, verdict = self._result(trial, config)
        except Exception as e:  # noqa: BLE001  (any failure is recorded and the search goes on)
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:500])
            raise
        for name, value in result.study_attrs().items():
            trial.set_user_attr(name, value)
        trial.set_user_attr("samples_run", samples_run)
        if trial.user_attrs.get("cached") and "top_up_of" not in trial.user_attrs:
            # the sampler proposed a config this study already ran: answered for free
            earlier = self._first_trial_of(config.key(), before=trial.number)
            if earlier is not None:
                trial.set_user_attr("repeat_of", earlier)
        for name, value in (verdict.attrs() if verdict else {}).items():
            trial.set_user_attr(name, value)
        memory_mb = result.memory.measured.total_bytes / 1e6
        budget = self.s.budget_mb
        trial.set_constraint("memory_budget_mb", memory_mb - budget if budget else -1.0)
        values = {
            "memory": memory_mb,
            "accuracy": result.accuracy,
            "kld": result.fidelity.kld if result.fidelity else None,
            "latency": result.timing.decode_ms_per_token or 0.0,
        }
        return [values[name] for name in self.s.objectives]

    def _result(self, trial, config: Config) -> tuple[TrialResult, int, RacedOut | None]:
        """(result, samples run per task and length, `racing.RacedOut` or None) for `config`:
        the trial cache's, or a fresh run's, then cached. A top-up trial runs `top_up` samples;
        any other runs racing's first rung, stops there when raced out, else runs the rest."""
        from kvpareto.search.paired import outcomes
        from kvpareto.weights.source_grid import reproduces_source_grid

        trial.set_user_attr(
            "reproduces_source_grid", reproduces_source_grid(self.loaded.model, config)
        )
        full = self.s.top_up if "top_up_of" in trial.user_attrs else self.s.samples
        key = eval_key(config, self.loaded.model_hash, self.s, full)
        result = self.cache.get(key)
        trial.set_user_attr("cached", result is not None)
        if result is not None:
            return result, full, None
        run = None
        if self.s.rung and full == self.s.samples:
            rung_key = eval_key(config, self.loaded.model_hash, self.s, self.s.rung)
            first = self.cache.get(rung_key)
            if first is None:
                run = self._trial_run(config, full)
                first = run.result(self.s.rung, perplexity=self.s.perplexity)
            memory_mb = first.memory.measured.total_bytes / 1e6
            verdict = raced_out(outcomes(first.samples), memory_mb, rivals(self.study, full))
            if verdict is not None:  # cached only then: a full run is served from its own record
                trial.set_user_attr("cached", run is None)
                if run is not None:
                    self.cache.put(rung_key, first)
                return first, self.s.rung, verdict
        # A rung read from the cache was answered by no run here: the full run answers it again.
        run = run or self._trial_run(config, full)
        if full != self.s.samples:  # a top-up: its first samples are its full trial's, cached
            earlier = self.cache.get(eval_key(config, self.loaded.model_hash, self.s))
            trial.set_user_attr("samples_reused", run.reuse(earlier) if earlier else 0)
        result = run.result(full, perplexity=self.s.perplexity)
        self.cache.put(key, result)
        return result, full, None

    def _trial_run(self, config: Config, samples: int):
        from kvpareto.evaluation.trial import TrialRun

        return TrialRun(
            self.loaded,
            config,
            self.s.tasks,
            self.s.task_lengths,
            self.s.samples,
            self.s.seed,
            memory_length=self.s.context_length,
            extra=samples - self.s.samples,
        )

    def top_up_knee(self, on_trial=None, stop=None) -> int:
        """Top up the knee's group (`racing.top_up_keys`) until every config in it has its
        top-up; return how many configs were topped up. More samples change a config's figures
        and can move the knee (a point first read at 0.9 of 10 samples may hold 0.75 of 40), so
        the group is read again after each round; TOP_UP_ROUNDS bounds the cost."""
        from kvpareto.search.outputs import frontier_summary, trial_rows
        from kvpareto.search.racing import TOP_UP_ROUNDS, top_up_keys

        ran = 0
        for _ in range(TOP_UP_ROUNDS):
            keys = top_up_keys(frontier_summary(trial_rows(self.study)))
            new = self.top_up(keys, on_trial=on_trial, stop=stop)
            ran += new
            if not new:
                break
        return ran

    def top_up(self, keys: list[str], on_trial=None, stop=None) -> int:
        """Run each config of `keys` again with `top_up` samples per task and length, as a trial
        of its own marked `top_up_of` (its first full trial); a config the study already holds
        a top-up of is skipped, so a resumed study redoes none. Returns how many ran."""
        from optuna.trial import TrialState

        first: dict[str, object] = {}
        topped = set()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            config = t.user_attrs.get("config")
            if not config or t.user_attrs.get("raced_out_by"):
                continue
            key = Config.from_dict(config).key()
            if t.user_attrs.get("top_up_of") is not None:
                topped.add(key)
            else:
                first.setdefault(key, t)
        ran = 0
        for key in keys:
            if key in topped or key not in first or (stop is not None and stop.requested):
                continue
            ran += 1
            t = first[key]
            config = Config.from_dict(t.user_attrs["config"])
            attrs = {"top_up_of": t.number}
            enqueue_fixed(self.study, self.space, [config], self._n_layers(), attrs)
            self.study.optimize(
                self.objective, n_trials=1, catch=(Exception,), gc_after_trial=False
            )
            if on_trial:
                on_trial(self.study.get_trials(deepcopy=False)[-1])
        return ran

    def run(
        self, n_trials: int | None, on_trial=None, stop=None, target: int | None = None
    ) -> None:
        """Run trials in this process until `n_trials` ran here (failed ones count) or, when
        `target` is given, until the study holds `target` finished trials from any worker."""
        if self.loaded is None:
            self.load_model()

        def after(study, frozen):
            if on_trial:
                on_trial(frozen)
            if (stop is not None and stop.requested) or (target and self.finished() >= target):
                study.stop()

        if target and self.finished() >= target:
            return
        self.study.optimize(
            self.objective,
            n_trials=n_trials,
            catch=(Exception,),
            callbacks=[after],
            gc_after_trial=False,
            show_progress_bar=False,
        )


class _EventStop:
    """A worker's view of the parent's stop request (a shared multiprocessing Event)."""

    def __init__(self, event):
        self.event = event

    @property
    def requested(self) -> bool:
        return self.event.is_set()


def _worker(settings: SearchSettings, n_trials: int | None, stop_event, index: int) -> None:
    """Entry point of one local worker process (spawned): run its share of trials, or, on a
    shared PostgreSQL study, trials until the study holds `settings.trials`."""
    from kvpareto.search.space import load_space

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    search = Search(settings, load_space(settings.space_path), worker=index)
    target = None if search.local_storage else settings.trials
    search.run(n_trials, stop=_EventStop(stop_event), target=target)


def run_search(settings: SearchSettings, command: list[str], progress=None) -> dict:
    """Run (or resume) one model's study to `settings.trials` finished trials; write outputs.

    `progress(done, total, summary, last_label)` is called after every finished trial.
    """
    from kvpareto.search.outputs import frontier_summary, trial_rows, write_outputs
    from kvpareto.search.space import load_space

    settings.validate()
    space = load_space(settings.space_path)
    search = Search(settings, space)
    search.check_resumable()
    search.load_model()  # first: the grid sampler enqueues the space the weights leave
    remaining = search.prepare()
    source = search.loaded.source_precision
    if search.left_out_groups:
        groups = ", ".join(str(g) for g in search.left_out_groups)
        print(
            f"note: {settings.model}: {source.description}; weight_group_size {groups} "
            "reproduces the source grid and is left out of the space (make it the only choice "
            "to study it)",
            file=sys.stderr,
        )
    facts = study_facts(settings, space, command, source)
    total = search.finished() + remaining

    def report(label):
        summary = write_outputs(search.study, search.dir, facts)
        if progress:
            progress(search.finished(), total, summary, label)

    if progress:
        progress(search.finished(), total, frontier_summary(trial_rows(search.study)), None)
    on_trial = lambda t: report(t.user_attrs.get("label"))  # noqa: E731
    with _StopRequests() as stop:
        if not search.local_storage and settings.workers == 1:
            # Other machines share this study: run until it holds N trials, whoever ran them.
            search.run(None, on_trial=on_trial, stop=stop, target=settings.trials)
        elif settings.workers == 1 or remaining <= 1:
            search.run(None, on_trial=on_trial, stop=stop, target=search.target)
        else:
            _run_workers(search, settings, remaining, stop, report)
            if not stop.requested:  # the workers' repeated configs did not count: run more here
                search.run(None, on_trial=on_trial, stop=stop, target=search.target)
        if settings.top_up and not stop.requested and search.finished() >= settings.trials:
            search.top_up_knee(on_trial=on_trial, stop=stop)
    return write_outputs(search.study, search.dir, facts)


def _run_workers(search: Search, settings: SearchSettings, remaining: int, stop, report) -> None:
    import multiprocessing as mp

    workers = min(settings.workers, remaining)
    shares = [remaining // workers + (i < remaining % workers) for i in range(workers)]
    if not search.local_storage:
        shares = [None] * workers  # a shared study: each runs until the study holds N
    ctx = mp.get_context("spawn")
    stop_event = ctx.Event()
    procs = [
        ctx.Process(target=_worker, args=(settings, n, stop_event, i)) for i, n in enumerate(shares)
    ]
    for p in procs:
        p.start()
    seen = search.finished()
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(1.0)
            if stop.requested:
                stop_event.set()  # each worker stops after its current trial
            done = search.finished()
            if done != seen:
                seen = done
                last = search.study.get_trials(deepcopy=False)[-1]
                report(last.user_attrs.get("label"))
    finally:  # reached at once on a second Ctrl-C: stop the workers now
        for p in procs:
            if p.is_alive() and stop.requested:
                p.kill()
            p.join()
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed and not stop.requested:
        raise RuntimeError(f"{len(failed)} worker(s) exited with codes {failed}")


def study_facts(settings, space, command: list[str], source) -> dict:
    """What a study ran: command, settings, versions, hardware, and `source`, the model's
    upstream `SourcePrecision`."""
    import optuna
    import torch
    import transformers

    from kvpareto import __version__
    from kvpareto.memory.sdpa_packing import sdpa_packs

    return {
        "command": command,
        "model": settings.model,
        "study": settings.study,
        "space": {"path": settings.space_path, "name": space.name, "hash": space.source_hash},
        "tasks": settings.tasks,
        "task_lengths": settings.task_lengths,
        "samples": settings.samples,
        "min_samples": settings.rung or settings.samples,  # racing's first rung
        "knee_samples": settings.top_up,
        "context_length": settings.context_length,
        "sampler": settings.sampler,
        "seed": settings.seed,
        "budget_mb": settings.budget_mb,
        "objectives": settings.objectives,
        **settings.compute.to_dict(),
        "storage_dtype": settings.storage_dtype,
        "device": settings.device_type,
        "versions": {
            "kvpareto": __version__,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "optuna": optuna.__version__,
        },
        "hardware": {
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
            # what the activation model assumed of this machine's SDPA (`kvpareto project`)
            "sdpa_packs": sdpa_packs(getattr(torch, settings.compute.name)),
        },
        "source_precision": source.to_dict(),
        "baseline_note": source.description,
    }
