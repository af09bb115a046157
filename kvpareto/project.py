"""`kvpareto project`: a finished study's configs re-ranked by memory at another context length
or batch.

Accuracy stays what the study measured, at its own context length. Memory is the study's own
measurement where the length is the searched one and the batch 1, and the closed-form model of
every part elsewhere (`memory.projection`, which the caller hands in as `memory_at`, so that this
module knows nothing of torch). The projected frontier is `frontier_summary` over the re-measured
rows, so at the searched length it is the study's frontier, point for point. The memory budget
is `--budget-mb` or else the study's own, in MB of 10^6 bytes as in `search`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvpareto.config import Config
from kvpareto.errors import UserError
from kvpareto.search.outputs import StudyFolder, frontier_summary, row_config

PARTS = ("weights_bytes", "kv_bytes", "activation_peak_bytes", "total_bytes")


@dataclass(frozen=True)
class Projection:
    length: int
    batch: int
    searched_length: int  # where the study measured memory and accuracy
    budget_mb: float | None
    memory: str  # "measured" (the study's own figures) or "modeled"
    summary: dict  # `frontier_summary` of the projected rows; each entry says its memory source


def project(
    study: StudyFolder,
    length: int,
    batch: int,
    budget_mb: float | None,
    memory_at: Callable[[Config, int], dict],
) -> Projection:
    """The study's frontier with memory at `length` tokens for `batch` sequences.
    `memory_at(config, modeled_weights_bytes)` gives the modeled parts (`PARTS`) there."""
    measured = length == study.context_length and batch == 1
    budget = budget_mb if budget_mb is not None else study.facts.get("budget_mb")
    rows = [_projected(row, measured, budget, memory_at) for row in study.rows]
    done = [r for r in rows if r["state"] == "COMPLETE" and r["total_bytes"] is not None]
    if done and not any(r["feasible"] for r in done):
        cheapest = min(r["total_bytes"] for r in done) / 1e6
        raise UserError(
            f"nothing fits under {budget:g} MB at {length} tokens, batch {batch}: the cheapest "
            f"config needs {cheapest:.1f} MB"
        )
    summary = frontier_summary(rows)
    source = "measured" if measured else "modeled"
    for entry in summary["frontier"]:
        entry["memory_source"] = source
    return Projection(length, batch, study.context_length, budget, source, summary)


def _projected(row: dict, measured: bool, budget: float | None, memory_at) -> dict:
    row = dict(row)
    if row["state"] != "COMPLETE" or row["total_bytes"] is None:
        return row
    if not measured:
        config = Config.from_dict(row_config(row))
        parts = memory_at(config, row["modeled_weights_bytes"])
        for part in PARTS:
            row[part] = row[f"modeled_{part}"] = parts[part]
    row["feasible"] = budget is None or row["total_bytes"] / 1e6 <= budget
    return row


def most_accurate(projection: Projection, k: int) -> list[dict]:
    """The `k` most accurate points of the projected frontier (the cheaper first among ties):
    what `--verify K` measures at the new length."""
    front = projection.summary["frontier"]
    return sorted(front, key=lambda e: (-e["accuracy"], e["total_bytes"]))[:k]
