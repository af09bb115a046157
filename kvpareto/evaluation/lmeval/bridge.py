"""The lm-eval bridge: any lm-evaluation-harness task, run under a kvpareto Config.

`KVParetoLM` is registered with lm-eval as the model `kvpareto`. It is lm-eval's own HF model
(tokenization, request bookkeeping, answer extraction) with the two places that run the model
replaced, so that every request goes through our quantized KV cache and engine:
- generate_until runs `engine.generate` on a fresh cache per request: chunked prefill, greedy
  decode, our stop rules;
- loglikelihood (and loglikelihood_rolling, which is built on it) runs `engine.score_tokens`:
  the context is prefilled into a fresh cache, chunked as configured, and the continuation is
  fed as decoding would feed it (`engine.scoring_block`), so each of its tokens is scored from
  what precedes it as the cache holds it (quantized) even when prefill is unchunked. lm-eval's
  HFLM scores with one cache-less forward pass instead, which no KV setting could ever touch.
Requests run one at a time (batch size 1): a padded batch is not what the cache models.

`evaluate_task` runs one task by name for `--tasks lm-eval:NAME`, offline, and returns a score
per document. lm-eval 0.4.13 has no plugin entry points, so `main` is lm-eval's own command line
with this model registered (`kvpareto lm-eval --model kvpareto ...`). Offline is set once, at
the command line's entry (`kvpareto.cli.main`), before lm-eval or datasets is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from functools import cache
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from kvpareto.config import Config
from kvpareto.engine import generate, score_tokens
from kvpareto.errors import UserError
from kvpareto.evaluation.lmeval import LOCAL_TASKS
from kvpareto.hardware import (
    COMPUTE_DTYPES,
    STORAGE_DTYPES,
    dtype_choice,
    resolve_compute_dtype,
)
from kvpareto.knobs import KNOB
from kvpareto.models import DEFAULT_MODEL, LoadedModel, load_model, pull, resolve_ref


@register_model("kvpareto")
class KVParetoLM(HFLM):
    """lm-eval's HF model, with generation and scoring through kvpareto's cache and engine.

    From lm-eval's command line: `--model_args model=NAME,dtype=auto,k_bits=4,...`, where every
    key other than `model`, `dtype` (the compute dtype, `auto` by default) and `storage_dtype`
    (bfloat16 by default) is a Config knob. From Python: pass a `LoadedModel` and a `Config`.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        dtype: str = "auto",
        storage_dtype: str = "bfloat16",
        loaded: LoadedModel | None = None,
        config: Config | None = None,
        batch_size: int | str = 1,
        device: str | None = None,  # lm-eval always passes one; the model stays where it is
        max_batch_size: int | None = None,  # likewise: batches are always of one request
        **knobs,
    ):
        if str(batch_size) != "1":
            raise UserError(f"the kvpareto model runs one request at a time; got {batch_size=}")
        if loaded is None:
            from kvpareto.evaluation.calibration_data import calibration
            from kvpareto.weights.quantize import quantized_model

            config = config_from_args(knobs)
            compute = resolve_compute_dtype(dtype_choice(dtype, "dtype", COMPUTE_DTYPES))
            storage = dtype_choice(storage_dtype, "storage_dtype", STORAGE_DTYPES)
            base = load_model(
                model,
                dtype=getattr(torch, compute.name),
                storage_dtype=getattr(torch, storage),
            )
            loaded = quantized_model(base, config, calibration)
        self.loaded = loaded
        self.kvpareto_config = config or Config()
        super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=1)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if generation_kwargs.get("do_sample") or generation_kwargs.get("temperature", 0) > 0:
            raise UserError("the kvpareto model decodes greedily; this task asks for sampling")
        gen = generate(
            self.model,
            self.tokenizer,
            context,
            self.kvpareto_config,
            max_new_tokens=max_length - context.shape[1],
            stop_strings=tuple(stop),
        )
        return torch.cat([context, torch.tensor([gen.new_tokens], device=context.device)], dim=1)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
        results = []
        for request, context, continuation in tqdm(
            requests, disable=disable_tqdm, desc="Running loglikelihood requests"
        ):
            ids = (context + continuation)[-(self.max_length + 1) :]
            logprobs, greedy = score_tokens(
                self.model,
                torch.tensor([ids]),
                self.kvpareto_config,
                start=len(ids) - len(continuation),
            )
            answer = (float(logprobs.sum()), bool(greedy.all()))
            if request is not None:  # rolling windows come without a key of their own
                self.cache_hook.add_partial("loglikelihood", request, answer)
            results.append(answer)
        return results


def config_from_args(args: dict) -> Config:
    """A Config from lm-eval model args, whose values arrive as strings or guessed types."""
    data = {}
    for key, value in args.items():
        kind = KNOB[key].type if key in KNOB else None
        if isinstance(value, str) and kind in (int, float):
            try:
                value = kind(value)
            except ValueError:
                raise UserError(f"{key} takes a number; got {value!r}") from None
        elif isinstance(value, str) and kind is bool:
            value = {"true": True, "false": False}.get(value.lower(), value)
        data[key] = value
    return Config.from_dict(data)


def tokenizer_folder(loaded: LoadedModel) -> str:
    """A folder the tokenizer loads from, for tasks that size their prompts themselves (RULER):
    the model's own folder when it has one, else a copy saved once per model."""
    folder = getattr(loaded.tokenizer, "name_or_path", "")
    if folder and Path(folder, "tokenizer_config.json").is_file():
        return folder
    from kvpareto.paths import cache_root

    target = cache_root() / "tokenizers" / loaded.model_hash[:32]
    if not (target / "tokenizer_config.json").is_file():
        loaded.tokenizer.save_pretrained(target)
    return str(target)


def _task_folder(name: str) -> Path:
    """The folder of an lm-eval task's YAML, so that a run indexes only that folder."""
    if (LOCAL_TASKS / f"{name}.yaml").is_file():
        return LOCAL_TASKS
    entry = _task_index().get(name)
    if entry is None:
        raise UserError(f"unknown lm-eval task {name!r}; list them with: lm-eval ls tasks")
    if entry.yaml_path is None or entry.kind.name not in ("TASK", "PY_TASK"):
        raise UserError(f"lm-eval:{name} is a group or tag; name one of its tasks instead")
    return Path(entry.yaml_path).parent


@cache
def _task_index() -> dict:
    """lm-eval's index of its own tasks, built once per process (it takes about 10 s)."""
    from lm_eval.tasks import TaskManager

    with _quiet():
        return TaskManager().task_index


def evaluate_task(
    loaded: LoadedModel,
    config: Config,
    name: str,
    context_length: int,
    limit: int,
    seed: int,
    max_gen_toks: int | None = None,
) -> list[float]:
    """Scores in [0, 1] of the first `limit` documents of lm-eval task `name` under `config`.

    Tasks that size their own prompts (RULER, kvpareto's) get the model's tokenizer and
    `context_length` as metadata; others ignore it. A task that cannot be built offline is a
    UserError of one line. `max_gen_toks` caps generation below the task's own budget (RULER
    allows 128 tokens for a 7-digit answer, which costs seconds per document on a CPU).
    """
    from lm_eval.evaluator import evaluate

    tasks = load_task(name, tokenizer_folder(loaded), context_length, seed)
    task = tasks["tasks"][name]
    if max_gen_toks and task.get_config("output_type") == "generate_until":
        task.set_config("generation_kwargs", {"max_gen_toks": max_gen_toks}, update=True)
    with _quiet():
        lm = KVParetoLM(loaded=loaded, config=config)
        results = evaluate(lm, tasks, limit=limit, bootstrap_iters=0, verbosity="ERROR")
    return [_score(name, doc, context_length) for doc in results["samples"][name]]


def load_task(name: str, tokenizer: str, context_length: int, seed: int) -> dict:
    """lm-eval's task dict for `name`, its documents fixed by `seed`.

    Generators such as RULER's draw from Python's global `random`, which lm-eval seeds only in
    `simple_evaluate`; the bridge calls `evaluate` directly, so it seeds here, before the
    documents are built, every source `simple_evaluate` seeds (Python, numpy, torch, and the
    task's fewshot sampler). Without it each process would score other documents under the
    same task hash, and the trial cache would mix them.
    """
    import random

    import numpy as np
    from lm_eval.tasks import TaskManager

    folder = _task_folder(name)
    metadata = {"tokenizer": tokenizer, "max_seq_lengths": [context_length], "seed": seed}
    paths = sorted({str(folder), str(LOCAL_TASKS)})
    manager = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        with _quiet():
            tasks = manager.load([name])
    except Exception as e:  # noqa: BLE001  (dataset code raises anything; the user needs one line)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"lm-eval task {name!r} could not be built offline ({type(e).__name__}: {reason}); "
            "tasks that download data from a hub cannot run here"
        ) from None
    tasks["tasks"][name].set_fewshot_seed(seed=seed)
    return tasks


def _score(name: str, doc: dict, context_length: int) -> float:
    """The document's score on the task's first metric (RULER names its metric by length)."""
    metric = str(context_length) if str(context_length) in doc["metrics"] else doc["metrics"][0]
    value = float(doc[metric])
    if not 0.0 <= value <= 1.0:
        raise UserError(
            f"lm-eval:{name} scores {metric}={value}, not a fraction in [0, 1]; "
            "kvpareto's accuracy needs a task scored as right/wrong or partly right"
        )
    return value


@contextlib.contextmanager
def _quiet():
    """Keep lm-eval's and the datasets' progress bars and notices (some printed to stdout, where
    they would spoil `--json`) off our terminal."""
    import logging

    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def main(args: list[str]) -> None:
    """lm-eval's command line, with the `kvpareto` model registered. Tasks that size their own
    prompts (RULER's, ours) are handed the model's tokenizer folder unless the command names a
    tokenizer itself."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *args, *_tokenizer_metadata(args)]
    cli_evaluate()


def _tokenizer_metadata(args: list[str]) -> list[str]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", "-M")
    parser.add_argument("--model_args", "-a", nargs="+", default=[])
    known, _ = parser.parse_known_args(args)
    if known.model != "kvpareto" or any("tokenizer" in a for a in args):
        return []
    pairs = [kv.split("=", 1) for a in known.model_args for kv in a.split(",") if "=" in kv]
    ref = dict(pairs).get("model", DEFAULT_MODEL)
    kind, value = resolve_ref(ref)
    if kind == "catalog" and not value.tiny:
        return ["--metadata", f"tokenizer={pull(ref)}"]
    return ["--metadata", f"tokenizer={value}"] if kind == "folder" else []
