"""Tasks: seeded, deterministic prompts and their scorers, found by name in a registry.

A task is a small class with `samples(tokenizer, context_length, n, seed)` and
`score(sample, output)`. Registering it with `@register_task("name")` makes it usable as
`--tasks name` without touching any central list. A task may declare `options`, variant knobs
chosen as name suffixes: `niah-mv:uuid:prose` is `niah-mv` with `needle=uuid, haystack=prose`.
A value left at its default is dropped from the canonical name (`niah:number` is `niah`), so
adding an option keeps every existing name, trial cache key and task hash.
A task family claims every name with its prefix: `lm-eval:NAME` is an lm-evaluation-harness
task, registered from `kvpareto.evaluation.lmeval.task` (tasks stay a leaf: they know nothing of
lm-eval, models or quantization).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from kvpareto.errors import UserError
from kvpareto.registry import Registry

TASKS: Registry[type[Task]] = Registry("task")
# name prefix -> factory(rest of the name) -> Task
FAMILIES: Registry[Callable[[str], Task]] = Registry("task family", "task families")


@dataclass
class Sample:
    input_ids: list[int]
    answer: str
    meta: dict = field(default_factory=dict)


class Task:
    name: str = ""
    version: int = 1
    max_new_tokens: int = 16
    # When True, each sample's answer is the unquantized model's own greedy continuation, filled
    # in by the trial runner (tasks never run the model themselves).
    needs_reference: bool = False
    # Each option's allowed values, default first; values are unique across a task's options.
    options: dict[str, tuple[str, ...]] = {}

    def __init__(self, **chosen: str):
        for option, allowed in self.options.items():
            setattr(self, option, chosen.get(option, allowed[0]))
        changed = [
            chosen[o]
            for o, allowed in self.options.items()
            if chosen.get(o, allowed[0]) != allowed[0]
        ]
        self.name = ":".join([type(self).name, *changed])

    def samples(self, tokenizer, context_length: int, n: int, seed: int) -> list[Sample]:
        raise NotImplementedError

    def score(self, sample: Sample, output: str) -> bool:
        raise NotImplementedError

    def details(self, sample: Sample, output: str) -> dict:
        """Per-sample figures beyond pass/fail (a token F1, a recall), kept in trial outcomes."""
        return {}

    def evaluate(self, loaded, config, context_length: int, n: int, seed: int) -> list[float]:
        """Scores in [0, 1] of n samples, for a task that brings its own requests and metrics
        (lm-eval's) and so runs the model itself. Tasks that describe prompts leave this alone:
        the trial runner generates from `samples` and calls `score`."""
        raise NotImplementedError

    @property
    def runs_itself(self) -> bool:
        return type(self).evaluate is not Task.evaluate

    def task_hash(self, context_lengths: list[int], n: int, seed: int) -> str:
        blob = json.dumps([self.name, self.version, sorted(context_lengths), n, seed])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def register_task(name: str):
    def wrap(cls):
        cls.name = name
        return TASKS.add(name, cls)

    return wrap


def register_family(prefix: str):
    """Claim every task name that starts with `prefix` (e.g. "lm-eval:") for one factory."""
    return FAMILIES.register(prefix)


def get_task(name: str) -> Task:
    from kvpareto.tasks import agreement, niah, qa, ruler, vt  # noqa: F401  (they register)

    for prefix in FAMILIES:
        if name.startswith(prefix):
            return FAMILIES.get(prefix)(name.removeprefix(prefix))

    base, *values = name.split(":")
    cls, chosen = TASKS.get(base), {}
    for value in values:
        option = next((o for o, allowed in cls.options.items() if value in allowed), None)
        if option is None or option in chosen:
            known = "; ".join(f"{o}: {', '.join(a)}" for o, a in cls.options.items()) or "none"
            raise UserError(f"task {base!r} takes no {value!r} (options, one value each: {known})")
        chosen[option] = value
    return cls(**chosen)
