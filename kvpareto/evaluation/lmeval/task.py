"""`--tasks lm-eval:NAME`: an lm-evaluation-harness task as a kvpareto task.

lm-eval tasks bring their own documents, requests and metrics, so this task describes no prompts
for the trial runner: it runs itself through `bridge.evaluate_task`, where every
request goes through our cache and engine, and hands back a score per document. `samples` per
length is lm-eval's `limit` (the task's first n documents). The lengths reach the tasks that
size their own prompts (RULER's, kvpareto's own `kvpareto_niah_mc`) as `max_seq_lengths`; other
tasks ignore them. The task hash covers the lm-eval version, how loglikelihoods are scored
(`engine.SCORING_VERSION`), and for the tasks shipped here the task files themselves, so a
change to any of them invalidates cached trials.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version

from kvpareto.errors import UserError
from kvpareto.evaluation.lmeval import LOCAL_TASKS
from kvpareto.tasks import Task, register_family

PREFIX = "lm-eval:"


@register_family(PREFIX)
class LMEvalTask(Task):
    def __init__(self, task: str):
        if not task:
            raise UserError("name the lm-eval task, e.g. --tasks lm-eval:niah_single_1")
        try:
            self.lm_eval_version = version("lm_eval")
        except PackageNotFoundError:
            raise UserError(
                "lm-eval tasks need lm-eval; install it with: pip install -e '.[lm-eval]'"
            ) from None
        self.task = task
        self.name = PREFIX + task

    def evaluate(self, loaded, config, context_length: int, n: int, seed: int) -> list[float]:
        from kvpareto.evaluation.lmeval.bridge import evaluate_task

        return evaluate_task(loaded, config, self.task, context_length, n, seed)

    def task_hash(self, context_lengths: list[int], n: int, seed: int) -> str:
        local = sorted(LOCAL_TASKS.glob(f"{self.task}.*"))
        files = [hashlib.sha256(f.read_bytes()).hexdigest() for f in local]
        from kvpareto.engine import SCORING_VERSION

        blob = json.dumps(
            [
                self.name,
                self.lm_eval_version,
                files,
                sorted(context_lengths),
                n,
                seed,
                SCORING_VERSION,
            ]
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
