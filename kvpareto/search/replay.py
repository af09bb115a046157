"""Which sampler finds the frontier with the fewest trials: samplers replayed against a grid.

A grid table holds every config of a space with the memory and accuracy a `--sampler grid` study
measured for it (stored under benchmarks/samplers/). Replaying a sampler asks it for configs
exactly as a search does (the same space, the same baselines enqueued first) but answers from the
table, so twenty seeds of every sampler cost minutes instead of days of trials.

The budget counts distinct configs evaluated, as a search's `--trials` does: the trial cache answers
a repeated proposal for free. A sampler that keeps proposing configs it has seen is stopped after
`samplers.REPEAT_LIMIT` times the budget in trials, with what it found.

Scores are hypervolumes (search.frontier) of the configs found so far, divided by the hypervolume
of the whole grid's frontier: 1.0 means the sampler has found a frontier as good as the grid's.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from kvpareto.config import Config, canonical
from kvpareto.errors import UserError
from kvpareto.search.frontier import Point, hypervolume, pareto_front
from kvpareto.search.samplers import REPEAT_LIMIT, enqueue_fixed, make_sampler, trial_config
from kvpareto.search.space import SearchSpace, load_space

FRACTIONS = (0.1, 0.2, 0.4)  # of the grid's configs: where the hypervolume ratio is read
TABLE_FORMAT = 1


@dataclass(frozen=True)
class GridTable:
    """One space evaluated exhaustively: config key -> (total bytes, accuracy)."""

    name: str
    space: SearchSpace
    points: dict[str, Point]
    baseline_key: str
    facts: dict  # how the grid was measured (model, tasks, samples, command, hardware)

    @property
    def baseline_memory(self) -> float:
        return self.points[self.baseline_key].memory

    def hypervolume(self, keys=None) -> float:
        found = [self.points[k] for k in (self.points if keys is None else keys)]
        return hypervolume(pareto_front(found), self.baseline_memory)


def table_from_study(folder: Path, space_path: Path) -> dict:
    """The JSON of a grid table, from a finished `--sampler grid` study folder."""
    import csv

    study = json.loads((folder / "study.json").read_text())
    with (folder / "trials.csv").open() as f:
        # a knee top-up re-runs a config with more samples: the table keeps every config's run
        # at the study's own sample count
        rows = [r for r in csv.DictReader(f) if r["state"] == "COMPLETE" and not r.get("top_up_of")]
    if any(r.get("raced_out_by") for r in rows):
        raise UserError(
            f"{folder}: the grid study raced trials out at their first samples; a stored grid "
            "needs every config's full figures (run it with --min-samples 0)"
        )
    points = {
        r["config_key"]: {
            "label": r["label"],
            # a column with any empty cell (a failed or unfinished trial) is written as floats
            "total_bytes": int(float(r["total_bytes"])),
            "accuracy": float(r["accuracy"]),
        }
        for r in rows
    }
    space = load_space(space_path)
    missing = [c.label() for c in space.grid() if c.key() not in points]
    if missing:
        raise UserError(f"{folder}: the grid study lacks {len(missing)} configs, e.g. {missing[0]}")
    facts = {k: study.get(k) for k in ("model", "tasks", "task_lengths", "samples", "seed")}
    facts.update(
        command=study.get("command"),
        compute_dtype=study.get("compute_dtype"),
        versions=study.get("versions"),
        hardware=study.get("hardware"),
    )
    return {
        "format": TABLE_FORMAT,
        "space": space_path.name,
        "space_hash": space.source_hash,
        "facts": facts,
        "points": points,
    }


def load_table(path: Path) -> GridTable:
    """A stored grid table; its space file sits beside it and must be the one it was measured on."""
    try:
        data = json.loads(path.read_text())
        space = load_space(path.parent / data["space"])
        points = {
            key: Point(key, float(p["total_bytes"]), float(p["accuracy"]))
            for key, p in data["points"].items()
        }
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a readable grid table ({type(e).__name__}: {e})") from None
    if data.get("format") != TABLE_FORMAT or data.get("space_hash") != space.source_hash:
        raise UserError(f"{path}: measured on another version of {data['space']}; re-measure it")
    baseline = canonical(Config()).key()
    if baseline not in points:
        raise UserError(f"{path}: the table lacks the 16-bit baseline")
    return GridTable(path.stem, space, points, baseline, data.get("facts", {}))


def replay(table: GridTable, sampler: str, seed: int, budgets: list[int]) -> list[float]:
    """Hypervolume ratio after each budget (distinct configs evaluated) for one sampler run."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(
        directions=["minimize", "maximize"], sampler=make_sampler(sampler, seed)
    )
    # baselines first, as Search.prepare enqueues them
    enqueue_fixed(study, table.space, [canonical(Config()), *table.space.baselines])
    found: dict[str, None] = {}  # distinct keys, in the order the sampler found them
    for _ in range(REPEAT_LIMIT * max(budgets)):
        if len(found) >= max(budgets):
            break
        trial = study.ask()
        config = trial_config(trial, table.space)
        point = table.points.get(config.key())
        if point is None:
            raise UserError(f"{table.name}: the grid table lacks {config.label()}")
        study.tell(trial, [point.memory / 1e6, point.accuracy])
        found.setdefault(point.key)
    whole = table.hypervolume()
    keys = list(found)
    return [table.hypervolume(keys[:budget]) / whole for budget in budgets]


def sampler_table(
    table: GridTable, samplers: list[str], seeds: int, fractions=FRACTIONS, progress=None
) -> list[dict]:
    """Median and quartiles of the hypervolume ratio per sampler and budget, over `seeds` runs."""
    budgets = [max(1, round(f * len(table.points))) for f in fractions]
    rows = []
    for name in samplers:
        runs = []
        for seed in range(seeds):
            runs.append(replay(table, name, seed, budgets))
            if progress:
                progress(name, seed)
        for i, (fraction, budget) in enumerate(zip(fractions, budgets, strict=True)):
            values = sorted(run[i] for run in runs)
            q1, median, q3 = (
                statistics.quantiles(values, n=4, method="inclusive")
                if len(values) > 1
                else values * 3
            )
            rows.append(
                {
                    "grid": table.name,
                    "sampler": name,
                    "fraction": fraction,
                    "trials": budget,
                    "median": median,
                    "q1": q1,
                    "q3": q3,
                    "seeds": seeds,
                }
            )
    return rows
