"""A trial's result, typed: what `run_trial` returns, the trial cache stores and a study keeps.

`TrialResult.to_dict()` is the stored record (a trial-cache file, `kvpareto eval --json`). Studies
on disk depend on its keys and their order, so they are written here and nowhere else, and
`TrialResult.from_dict()` reads a record back and names any key it lacks or does not know: a
record of another shape fails on reading, not when something is printed.

A study keeps part of each result on its Optuna trial (`TrialResult.study_attrs`) and reads it
back for its table as `TrialFigures`, leniently: a failed trial holds none of it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from kvpareto.config import Config
from kvpareto.errors import UserError
from kvpareto.memory import MemoryParts

if TYPE_CHECKING:  # the models package imports torch; reading a record needs none of it
    from kvpareto.models.precision import SourcePrecision

PARTS = ("weights_bytes", "kv_bytes", "activation_peak_bytes", "total_bytes")


class RecordError(ValueError):
    """A stored trial record whose shape is not the one this version writes."""


def _check_keys(data: dict, keys: Iterable[str], where: str, optional: Iterable[str] = ()) -> None:
    if not isinstance(data, dict):
        raise RecordError(f"trial record: {where} is {type(data).__name__}, not a mapping")
    keys = list(keys)
    missing = [k for k in keys if k not in data and k not in optional]
    unknown = [k for k in data if k not in keys]
    if missing or unknown:
        problems = [f"lacks {', '.join(map(repr, missing))}"] if missing else []
        problems += [f"has unknown {', '.join(map(repr, unknown))}"] if unknown else []
        raise RecordError(
            f"trial record: {where} {' and '.join(problems)} (written by another kvpareto version?)"
        )


def _names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


@dataclass(frozen=True)
class TaskScore:
    """One task's mean score over all its samples, with its 95% interval (`stats.mean_interval`)."""

    accuracy: float
    accuracy_ci: tuple[float, float]
    n: int
    task_hash: str  # what its prompts were (`Task.task_hash`)

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "accuracy_ci": list(self.accuracy_ci),
            "n": self.n,
            "task_hash": self.task_hash,
        }

    @classmethod
    def from_dict(cls, data: dict, where: str) -> TaskScore:
        _check_keys(data, ("accuracy", "accuracy_ci", "n", "task_hash"), where)
        return cls(data["accuracy"], tuple(data["accuracy_ci"]), data["n"], data["task_hash"])


@dataclass(frozen=True)
class Memory:
    """Memory at the trial's memory length, measured and modeled (`kvpareto.memory`)."""

    measured: MemoryParts
    modeled: MemoryParts

    def to_dict(self) -> dict:
        return {**self.measured.to_dict(), "modeled": self.modeled.to_dict(), "measured": True}

    @classmethod
    def from_dict(cls, data: dict, where: str = "memory") -> Memory:
        _check_keys(data, (*PARTS, "modeled", "measured"), where)
        _check_keys(data["modeled"], PARTS, f"{where}.modeled")
        if data["measured"] is not True:
            raise RecordError(f"trial record: {where} was not measured")
        return cls(_parts(data, where), _parts(data["modeled"], f"{where}.modeled"))


def _parts(data: dict, where: str) -> MemoryParts:
    parts = MemoryParts(data["weights_bytes"], data["kv_bytes"], data["activation_peak_bytes"])
    if parts.total_bytes != data["total_bytes"]:
        raise RecordError(f"trial record: {where}.total_bytes is not the sum of its parts")
    return parts


@dataclass(frozen=True)
class Timing:
    """Speed over the trial's prompts; None where no prompt ran (tasks that run themselves)."""

    prefill_tokens_per_s: float | None
    decode_ms_per_token: float | None
    prefills_reused: int  # replayed from a recorded forward pass (`kvpareto.prefill_reuse`)

    def to_dict(self) -> dict:
        return {
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_ms_per_token": self.decode_ms_per_token,
            "prefills_reused": self.prefills_reused,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Timing:
        _check_keys(data, _names(cls), "timing")
        return cls(**data)


@dataclass(frozen=True)
class WeightsFacts:
    """What the trial's weights were, and whether they rebuild the grid the unquantized weights
    were stored on upstream (`weights.source_grid`)."""

    method: str
    group_size: int | None  # as configured; None for methods without groups
    effective_group_sizes: tuple[int, ...]  # the groups the layers use (`weight_group`)
    awq_backend: str | None
    from_cache: bool | None  # read from the on-disk store; None for unquantized weights
    kernels: dict | None  # the path packed layers take per phase (`kernel_summary`)
    source_block_measured: int
    reproduces_source_grid: bool

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "group_size": self.group_size,
            "effective_group_sizes": list(self.effective_group_sizes),
            "awq_backend": self.awq_backend,
            "from_cache": self.from_cache,
            "kernels": self.kernels,
            "source_block_measured": self.source_block_measured,
            "reproduces_source_grid": self.reproduces_source_grid,
        }

    @classmethod
    def from_dict(cls, data: dict) -> WeightsFacts:
        _check_keys(data, _names(cls), "weights")
        return cls(**{**data, "effective_group_sizes": tuple(data["effective_group_sizes"])})


@dataclass(frozen=True)
class Perplexity:
    """Held-out perplexity through the trial's weights and cache (`tasks.perplexity`), beside
    the 16-bit baseline's on the same tokens."""

    value: float
    tokens: int  # tokens scored: the text's second half
    text: str  # where the text came from (`tasks.perplexity.source`)
    baseline: float

    @property
    def delta_vs_baseline(self) -> float:
        return self.value - self.baseline

    def to_dict(self) -> dict:
        return {
            "value": self.value,
            "tokens": self.tokens,
            "text": self.text,
            "baseline": self.baseline,
            "delta_vs_baseline": self.delta_vs_baseline,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Perplexity:
        _check_keys(
            data, ("value", "tokens", "text", "baseline", "delta_vs_baseline"), "perplexity"
        )
        return cls(data["value"], data["tokens"], data["text"], data["baseline"])


@dataclass(frozen=True)
class Fidelity:
    """How faithfully the trial follows the 16-bit baseline's answers (`kvpareto.fidelity`):
    the mean KLD over the samples and the mean log-probability of the baseline's answer, each
    with a bootstrap 95% interval (`stats.bootstrap`), over `n` samples."""

    kld: float
    kld_ci: tuple[float, float]
    answer_logprob: float
    answer_logprob_ci: tuple[float, float]
    n: int

    def to_dict(self) -> dict:
        return {
            "kld": self.kld,
            "kld_ci": list(self.kld_ci),
            "answer_logprob": self.answer_logprob,
            "answer_logprob_ci": list(self.answer_logprob_ci),
            "n": self.n,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Fidelity:
        _check_keys(data, _names(cls), "fidelity")
        return cls(
            data["kld"],
            tuple(data["kld_ci"]),
            data["answer_logprob"],
            tuple(data["answer_logprob_ci"]),
            data["n"],
        )


# The record's keys, in the order `to_dict` writes them; only `device` and `perplexity` may be
# absent. `device` is written off the CPU only, so CPU records keep the shape they had before.
# `fidelity` is null for a trial whose tasks all run themselves; a record without the key was
# written before fidelity was measured, and the trial cache runs such a trial again.
RECORD_KEYS = tuple(
    """model model_hash config config_key label tasks accuracy accuracy_ci n fidelity mean_bits
    nominal_kv_bits effective_kv_bits context_lengths samples longest_prompt_tokens memory_tokens
    memory timing weights source_precision compute_dtype storage_dtype device threads when
    perplexity
    """.split()
)
# What a study keeps of a result on its Optuna trial (`user_attrs`), in the order it sets them.
STUDY_FIGURES = tuple(
    """accuracy accuracy_ci memory timing tasks samples perplexity mean_bits effective_kv_bits
    fidelity""".split()
)


@dataclass(frozen=True)
class TrialResult:
    """One Config evaluated on one model (`evaluation.trial.run_trial`).

    Accuracy is the mean over all samples of all tasks, with a 95% interval; memory is taken at
    the memory length (`memory_tokens`), which is what a deployment must hold."""

    model: str
    model_hash: str
    config: Config
    config_key: str
    label: str
    tasks: dict[str, TaskScore]
    accuracy: float
    accuracy_ci: tuple[float, float]
    n: int
    fidelity: Fidelity | None  # None when no task hands out prompts (they all run themselves)
    # Code bits only, (k+v)/2 or the realized widths of adaptive/rule, token-weighted over the
    # prompts; None without prompts. Also written as `mean_bits`, its old name.
    nominal_kv_bits: float | None
    effective_kv_bits: float  # KV bytes x 8 / values stored: scales, zeros and tail included
    context_lengths: list[int]
    samples: list[dict]  # one outcome per sample: task, its own facts (length, depth...), correct
    longest_prompt_tokens: int
    memory_tokens: int
    memory: Memory
    timing: Timing
    weights: WeightsFacts
    source_precision: SourcePrecision
    compute_dtype: str
    storage_dtype: str
    threads: int
    when: str  # UTC, ISO 8601
    perplexity: Perplexity | None = None  # measured only when asked
    device: str = "cpu"  # where weights, cache and compute lived: cpu or cuda

    def to_dict(self) -> dict:
        record = {
            "model": self.model,
            "model_hash": self.model_hash,
            "config": self.config.to_dict(),
            "config_key": self.config_key,
            "label": self.label,
            "tasks": {name: score.to_dict() for name, score in self.tasks.items()},
            "accuracy": self.accuracy,
            "accuracy_ci": list(self.accuracy_ci),
            "n": self.n,
            "fidelity": self.fidelity.to_dict() if self.fidelity else None,
            "mean_bits": self.nominal_kv_bits,
            "nominal_kv_bits": self.nominal_kv_bits,
            "effective_kv_bits": self.effective_kv_bits,
            "context_lengths": self.context_lengths,
            "samples": self.samples,
            "longest_prompt_tokens": self.longest_prompt_tokens,
            "memory_tokens": self.memory_tokens,
            "memory": self.memory.to_dict(),
            "timing": self.timing.to_dict(),
            "weights": self.weights.to_dict(),
            "source_precision": self.source_precision.to_dict(),
            "compute_dtype": self.compute_dtype,
            "storage_dtype": self.storage_dtype,
            "device": self.device,
            "threads": self.threads,
            "when": self.when,
        }
        if self.device == "cpu":
            del record["device"]
        if self.perplexity is not None:
            record["perplexity"] = self.perplexity.to_dict()
        return record

    @classmethod
    def from_dict(cls, data: dict) -> TrialResult:
        """Read a record `to_dict` wrote (e.g. parsed from a trial-cache file); `RecordError`
        names what differs when the record has another shape."""
        from kvpareto.models.precision import SourcePrecision

        _check_keys(data, RECORD_KEYS, "the record", optional=("perplexity", "device"))
        try:
            config = Config.from_dict(data["config"])
            source = SourcePrecision.from_dict(data["source_precision"])
        except (UserError, KeyError, TypeError) as e:
            raise RecordError(f"trial record: unreadable config or source precision: {e}") from e
        return cls(
            model=data["model"],
            model_hash=data["model_hash"],
            config=config,
            config_key=data["config_key"],
            label=data["label"],
            tasks={
                name: TaskScore.from_dict(score, f"tasks.{name}")
                for name, score in data["tasks"].items()
            },
            accuracy=data["accuracy"],
            accuracy_ci=tuple(data["accuracy_ci"]),
            n=data["n"],
            fidelity=Fidelity.from_dict(data["fidelity"]) if data["fidelity"] else None,
            nominal_kv_bits=data["nominal_kv_bits"],
            effective_kv_bits=data["effective_kv_bits"],
            context_lengths=data["context_lengths"],
            samples=data["samples"],
            longest_prompt_tokens=data["longest_prompt_tokens"],
            memory_tokens=data["memory_tokens"],
            memory=Memory.from_dict(data["memory"]),
            timing=Timing.from_dict(data["timing"]),
            weights=WeightsFacts.from_dict(data["weights"]),
            source_precision=source,
            compute_dtype=data["compute_dtype"],
            storage_dtype=data["storage_dtype"],
            device=data.get("device", "cpu"),
            threads=data["threads"],
            when=data["when"],
            perplexity=Perplexity.from_dict(data["perplexity"]) if "perplexity" in data else None,
        )

    def study_attrs(self) -> dict:
        """The figures a study keeps on the Optuna trial, as plain data (`STUDY_FIGURES`)."""
        record = self.to_dict()
        return {name: record[name] for name in STUDY_FIGURES if name in record}


@dataclass(frozen=True)
class TrialFigures:
    """A result's figures as a study holds them on an Optuna trial, read back for its table.

    Every figure may be missing, and reads None: a failed or interrupted trial holds none, and
    a trial recorded before a figure existed lacks it. The timing keeps only what the table
    shows, since `prefills_reused` came later than the study's first trials."""

    accuracy: float | None = None
    accuracy_ci: tuple[float | None, float | None] = (None, None)
    memory: Memory | None = None
    prefill_tokens_per_s: float | None = None
    decode_ms_per_token: float | None = None
    mean_bits: float | None = None
    effective_kv_bits: float | None = None
    perplexity: Perplexity | None = None
    fidelity: Fidelity | None = None
    samples: tuple[dict, ...] = ()

    @classmethod
    def from_user_attrs(cls, attrs: dict) -> TrialFigures:
        timing = attrs.get("timing") or {}
        return cls(
            accuracy=attrs.get("accuracy"),
            accuracy_ci=tuple(attrs.get("accuracy_ci") or (None, None)),
            memory=Memory.from_dict(attrs["memory"]) if attrs.get("memory") else None,
            prefill_tokens_per_s=timing.get("prefill_tokens_per_s"),
            decode_ms_per_token=timing.get("decode_ms_per_token"),
            mean_bits=attrs.get("mean_bits"),
            effective_kv_bits=attrs.get("effective_kv_bits"),
            perplexity=Perplexity.from_dict(attrs["perplexity"])
            if attrs.get("perplexity")
            else None,
            fidelity=Fidelity.from_dict(attrs["fidelity"]) if attrs.get("fidelity") else None,
            samples=tuple(attrs.get("samples") or ()),
        )
