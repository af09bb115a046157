"""How close a sampler came to the exhaustive grid: hypervolume reached, and when.

Both studies must be of the same model and space. Hypervolume is computed the same way for both
(normalized by the grid's baseline memory), and the sampler's is replayed trial by trial, in the
order the trials finished, to say after how many trials it first held 95% of the grid's.
"""

from __future__ import annotations

from pathlib import Path

from kvpareto.errors import UserError
from kvpareto.search.frontier import Point, hypervolume, pareto_front
from kvpareto.search.outputs import is_baseline


def _rows(folder: Path):
    import pandas as pd

    path = folder / "trials.parquet"
    if not path.is_file():
        raise UserError(f"{folder} has no trials.parquet; run kvpareto search first")
    return pd.read_parquet(path).sort_values("trial").to_dict("records")


def _points(rows) -> list[Point]:
    return [
        Point(r["config_key"], r["total_bytes"], r["accuracy"])
        for r in rows
        if r["state"] == "COMPLETE" and r["feasible"] and not r.get("raced_out_by")
    ]


def compare_to_grid(sampler_dir: Path, grid_dir: Path) -> dict:
    grid_rows = _rows(grid_dir)
    base = next((r for r in grid_rows if is_baseline(r)), None)
    if base is None:
        raise UserError(f"{grid_dir} has no 16-bit baseline trial to normalize memory by")
    base_mem = base["total_bytes"]
    grid_hv = hypervolume(pareto_front(_points(grid_rows)), base_mem)
    rows = _rows(sampler_dir)
    trials_to_95, seen = None, []
    for i, r in enumerate(rows, start=1):
        seen.append(r)
        hv = hypervolume(pareto_front(_points(seen)), base_mem)
        if trials_to_95 is None and grid_hv > 0 and hv >= 0.95 * grid_hv:
            trials_to_95 = i
    final = hypervolume(pareto_front(_points(rows)), base_mem)
    return {
        "fraction": final / grid_hv if grid_hv else 0.0,
        "sampler_hypervolume": final,
        "grid_hypervolume": grid_hv,
        "grid_trials": len(grid_rows),
        "sampler_trials": len(rows),
        "trials_to_95": trials_to_95,
    }
