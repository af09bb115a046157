"""Samplers replayed against a stored grid table (search/replay.py, `bench --parts samplers`)."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from kvpareto.config import Config, canonical
from kvpareto.errors import UserError
from kvpareto.search.frontier import hypervolume, pareto_front
from kvpareto.search.replay import load_table, replay, sampler_table, table_from_study
from kvpareto.search.space import load_space
from tests.conftest import CLI

SPACE = "name: replay-test\nparams:\n  k_bits: [2, 4, 8, 16]\n  v_bits: [2, 4, 16]\n"
STORED = Path(__file__).parent.parent / "benchmarks" / "samplers"


def _made_up(config: Config) -> tuple[int, float]:
    """Memory grows with bits; accuracy too, with K mattering more than V (a known frontier)."""
    memory = 1_000_000 + 10_000 * (config.k_bits + config.v_bits)
    accuracy = min(config.k_bits, 8) / 8 * 0.7 + min(config.v_bits, 8) / 8 * 0.3
    return memory, accuracy


def _table(folder: Path) -> Path:
    (folder / "space.yaml").write_text(SPACE)
    space = load_space(folder / "space.yaml")
    points = {}
    for c in space.grid():
        memory, accuracy = _made_up(c)
        points[c.key()] = {"label": c.label(), "total_bytes": memory, "accuracy": accuracy}
    data = {"format": 1, "space": "space.yaml", "space_hash": space.source_hash, "points": points}
    (folder / "grid.json").write_text(json.dumps(data))
    return folder / "grid.json"


def test_whole_grid_scores_one_and_budgets_count_distinct_configs(tmp_path):
    table = load_table(_table(tmp_path))
    assert len(table.points) == 12
    # the random sampler over 12 configs with a 5x repeat allowance: read how many it found
    ratios = replay(table, "random", seed=0, budgets=[1, 6, 12])
    assert ratios == sorted(ratios) and all(0 < r <= 1 for r in ratios)
    # budget 1 is the enqueued 16-bit baseline alone: its hypervolume by hand
    base = table.points[canonical(Config()).key()]
    alone = hypervolume([base], base.memory) / table.hypervolume()
    assert ratios[0] == pytest.approx(alone)
    whole = table.hypervolume()
    assert whole == pytest.approx(
        hypervolume(pareto_front(list(table.points.values())), base.memory)
    )


def test_finding_every_config_reaches_the_grids_hypervolume(tmp_path):
    table = load_table(_table(tmp_path))
    assert table.hypervolume(list(table.points)) / table.hypervolume() == 1.0
    # a front missing its best point scores less than 1
    best = max(table.points.values(), key=lambda p: (p.accuracy, -p.memory))
    rest = [k for k in table.points if k != best.key]
    assert table.hypervolume(rest) < table.hypervolume()


def test_sampler_table_gives_quartiles_per_budget(tmp_path):
    table = load_table(_table(tmp_path))
    rows = sampler_table(table, ["random", "nsga2"], seeds=3, fractions=(0.25, 0.5))
    assert [(r["sampler"], r["trials"]) for r in rows] == [
        ("random", 3),
        ("random", 6),
        ("nsga2", 3),
        ("nsga2", 6),
    ]
    for r in rows:
        assert r["q1"] <= r["median"] <= r["q3"] <= 1.0


def test_a_table_of_another_space_version_is_refused(tmp_path):
    path = _table(tmp_path)
    (tmp_path / "space.yaml").write_text(SPACE + "  residual_length: [0, 16]\n")
    with pytest.raises(UserError, match="another version"):
        load_table(path)


def test_a_study_that_is_not_a_full_grid_is_refused(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    (tmp_path / "space.yaml").write_text(SPACE)
    (folder / "study.json").write_text(json.dumps({"model": "tiny-llama"}))
    with (folder / "trials.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["state", "label", "config_key", "total_bytes", "accuracy"])
        w.writeheader()
        w.writerow(
            {
                "state": "COMPLETE",
                "label": "base",
                "config_key": canonical(Config()).key(),
                "total_bytes": 10,
                "accuracy": 1.0,
            }
        )
    with pytest.raises(UserError, match="lacks 11 configs"):
        table_from_study(folder, tmp_path / "space.yaml")


def test_a_grid_table_keeps_each_configs_run_at_the_studys_sample_count(tmp_path):
    """A knee top-up runs a config again with more samples: the table keeps the first run."""
    folder = tmp_path / "study"
    folder.mkdir()
    (tmp_path / "space.yaml").write_text(SPACE)
    (folder / "study.json").write_text(json.dumps({"model": "tiny-llama", "samples": 4}))
    fields = ["state", "label", "config_key", "total_bytes", "accuracy", "top_up_of"]
    grid = load_space(tmp_path / "space.yaml").grid()
    with (folder / "trials.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        for c in grid:
            row = {"state": "COMPLETE", "label": c.label(), "config_key": c.key()}
            # as pandas writes a byte count in a column with empty cells: "10.0"
            w.writerow({**row, "total_bytes": "10.0", "accuracy": 0.5, "top_up_of": ""})
        w.writerow({**row, "total_bytes": 10, "accuracy": 0.75, "top_up_of": "3"})
    points = table_from_study(folder, tmp_path / "space.yaml")["points"]
    assert len(points) == len(grid) and {p["accuracy"] for p in points.values()} == {0.5}
    assert {p["total_bytes"] for p in points.values()} == {10}


# the floor for each stored grid: 300 configs of a tiny model, 96 of a real one
MIN_CONFIGS = {"tiny-llama-agreement": 300, "smollm2-niah": 96}


def test_stored_tables_cover_their_spaces():
    """The shipped tables load, hold every config of their space, and at least their floor."""
    paths = sorted(STORED.glob("*.json"))
    assert paths, "benchmarks/samplers/ holds no grid table"
    for path in paths:
        table = load_table(path)
        grid = {c.key() for c in table.space.grid()}
        # the 16-bit baseline runs first whether or not the space holds it (unchunked)
        assert grid | {table.baseline_key} == set(table.points)
        assert len(grid) >= MIN_CONFIGS.get(path.stem, 300)


def test_bench_samplers_prints_the_table_without_a_model(tmp_path):
    path = _table(tmp_path)
    args = ["bench", "--parts", "samplers", "--grids", str(path), "--replay-seeds", "2"]
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "nsga2" in done.stdout and "random" in done.stdout and "% of grid" in done.stdout
    bad = subprocess.run(
        [*CLI, "bench", "--parts", "samplers", "--grids", str(tmp_path / "none")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
