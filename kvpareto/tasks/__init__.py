"""Tasks: seeded, deterministic prompts and their scorers, found by name in a registry.

A task is a small class with `samples(tokenizer, context_length, n, seed)` and
`score(sample, output)`. Registering it with `@register_task("name")` makes it usable as
`--tasks name` without touching any central list.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from kvpareto.errors import UserError

TASKS: dict[str, type] = {}


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

    def samples(self, tokenizer, context_length: int, n: int, seed: int) -> list[Sample]:
        raise NotImplementedError

    def score(self, sample: Sample, output: str) -> bool:
        raise NotImplementedError

    def task_hash(self, context_lengths: list[int], n: int, seed: int) -> str:
        blob = json.dumps([self.name, self.version, sorted(context_lengths), n, seed])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def register_task(name: str):
    def wrap(cls):
        cls.name = name
        TASKS[name] = cls
        return cls

    return wrap


def get_task(name: str) -> Task:
    from kvpareto.tasks import agreement, niah, qa, ruler, vt  # noqa: F401  (they register)

    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]()
