"""`kvpareto search` on tiny models: outputs, determinism, resume, crash recovery, workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

from kvpareto.search.samplers import REPEAT_LIMIT
from kvpareto.stats import mcnemar_exact
from tests.conftest import CLI

SMOKE = [
    "--model",
    "tiny-llama",
    "--space",
    "search_spaces/smoke.yaml",
    "--tasks",
    "agreement",
    "--context-length",
    "512",
    "--samples",
    "6",
    # no knee top-up: a study here holds exactly --trials trials (tests/test_racing.py and the
    # golden smoke study cover the top-up)
    "--knee-samples",
    "0",
]


def _search(out: Path, *extra: str, study: str = "s", check: bool = True):
    done = subprocess.run(
        [*CLI, "search", *SMOKE, "--out", str(out), "--study", study, *extra],
        capture_output=True,
        text=True,
    )
    if check:
        assert done.returncode == 0, done.stderr[-2000:]
    return done


def _trials(folder: Path) -> pd.DataFrame:
    return pd.read_parquet(folder / "trials.parquet").sort_values("trial")


def _non_dominated(rows: pd.DataFrame) -> set[str]:
    """Recompute the frontier from the trial table, independently of kvpareto.search.frontier."""
    ok = rows[(rows.state == "COMPLETE") & rows.feasible].drop_duplicates("config_key")
    keep = set()
    for _, a in ok.iterrows():
        beaten = any(
            b.total_bytes <= a.total_bytes
            and b.accuracy >= a.accuracy
            and (b.total_bytes < a.total_bytes or b.accuracy > a.accuracy)
            for _, b in ok.iterrows()
        )
        if not beaten:
            keep.add(a.config_key)
    return keep


def _right(row) -> list[bool]:
    return [bool(s["correct"]) for s in json.loads(row.samples_json)]


def test_smoke_search_writes_outputs_and_a_true_frontier(tmp_path):
    _search(tmp_path, "--trials", "10", "--sampler", "tpe")
    folder = tmp_path / "tiny-llama" / "s"
    for name in ("trials.parquet", "trials.csv", "frontier.json", "study.json"):
        assert (folder / name).is_file()
    rows = _trials(folder)
    assert (rows.state == "COMPLETE").all()
    assert rows.config_key.nunique() == 10 == (rows.repeat_of.isna()).sum()
    assert rows.iloc[0].label == "w16-k16v16-c0"  # the baseline runs first
    frontier = json.loads((folder / "frontier.json").read_text())
    keys = {e["config_key"] for e in frontier["frontier"]}
    assert keys == _non_dominated(rows)
    assert any(not e["label"].startswith("w16-k16v16") for e in frontier["frontier"])
    base = rows.iloc[0]
    assert base.config_key in keys or any(
        e["total_bytes"] <= base.total_bytes and e["accuracy"] >= base.accuracy
        for e in frontier["frontier"]
    )
    assert frontier["hypervolume"] > 0
    assert sum(e["knee"] for e in frontier["frontier"]) == (len(frontier["frontier"]) > 1)
    # Paired with the baseline on the same samples: the baseline differs from itself by 0 and
    # follows its own answers with a KLD of 0; every p is McNemar's on the discordant samples.
    assert (base.delta_accuracy, base.mcnemar_p, base.kld) == (0.0, 1.0, 0.0)
    for _, row in rows.iterrows():
        pairs = list(zip(_right(row), _right(base), strict=True))
        only_row, only_base = pairs.count((True, False)), pairs.count((False, True))
        assert row.mcnemar_p == pytest.approx(mcnemar_exact(only_row, only_base))
        assert row.delta_accuracy == pytest.approx(row.accuracy - base.accuracy)
        assert row.kld_lo <= row.kld <= row.kld_hi and row.kld >= 0
    facts = json.loads((folder / "study.json").read_text())
    assert facts["seed"] == 0 and facts["space"]["hash"] and facts["versions"]["torch"]
    # Memory parts: measured and modeled agree on KV to the byte in every trial.
    assert (rows.kv_bytes == rows.modeled_kv_bytes).all()
    assert (
        rows.total_bytes == rows.weights_bytes + rows.kv_bytes + rows.activation_peak_bytes
    ).all()


def test_kld_as_an_objective_is_minimized_beside_memory(tmp_path):
    _search(tmp_path, "--trials", "3", "--objectives", "memory,kld")
    folder = tmp_path / "tiny-llama" / "s"
    study = optuna.load_study(study_name="s:tiny-llama", storage=f"sqlite:///{folder / 'study.db'}")
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    rows = _trials(folder).set_index("trial")
    for t in study.trials:
        assert t.values == [rows.total_bytes[t.number] / 1e6, rows.kld[t.number]]


def test_same_seed_and_sampler_give_the_same_trials_and_frontier(tmp_path):
    for study in ("one", "two"):
        _search(tmp_path, "--trials", "8", "--sampler", "nsga2", "--seed", "3", study=study)
    one, two = (_trials(tmp_path / "tiny-llama" / s) for s in ("one", "two"))
    assert list(one.config_key) == list(two.config_key)
    f1, f2 = (
        json.loads((tmp_path / "tiny-llama" / s / "frontier.json").read_text())
        for s in ("one", "two")
    )
    assert [e["config_key"] for e in f1["frontier"]] == [e["config_key"] for e in f2["frontier"]]
    # The second study found every result in the trial cache.
    assert two.cached.all()


def test_rerun_resumes_and_keeps_finished_trials(tmp_path):
    _search(tmp_path, "--trials", "4")
    first = _trials(tmp_path / "tiny-llama" / "s")
    _search(tmp_path, "--trials", "7")
    again = _trials(tmp_path / "tiny-llama" / "s")
    assert again.config_key.nunique() == 7 == again.repeat_of.isna().sum()
    pd.testing.assert_frame_equal(
        first[["trial", "config_key", "accuracy"]].reset_index(drop=True),
        again[["trial", "config_key", "accuracy"]].head(4).reset_index(drop=True),
    )


def test_kill_9_mid_trial_then_resume_redoes_at_most_one_trial(tmp_path):
    slow = ["--context-length", "1536", "--samples", "12", "--trials", "12"]
    proc = subprocess.Popen(
        [*CLI, "search", *SMOKE, "--out", str(tmp_path), "--study", "k", *slow],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    db = tmp_path / "tiny-llama" / "k" / "study.db"
    url = f"sqlite:///{db}"
    # Generous: on a loaded 2-core machine the first two trials alone can take minutes, and the
    # loop stops as soon as it catches a trial running.
    deadline = time.time() + 600
    killed_during = None
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
        if not db.exists():
            continue
        try:
            trials = optuna.load_study(study_name="k:tiny-llama", storage=url).get_trials()
        except Exception:  # noqa: BLE001  (the study may not exist yet)
            continue
        finished = [t for t in trials if t.state.is_finished()]
        running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        if len(finished) >= 2 and running:
            os.kill(proc.pid, signal.SIGKILL)
            killed_during = running[0].number
            break
    proc.wait()
    assert killed_during is not None, "never caught the search mid-trial"
    before = {
        t.number: t.user_attrs.get("label")
        for t in optuna.load_study(study_name="k:tiny-llama", storage=url).get_trials()
        if t.state == optuna.trial.TrialState.COMPLETE
    }
    done = subprocess.run(
        [
            *CLI,
            "search",
            *SMOKE,
            "--out",
            str(tmp_path),
            "--study",
            "k",
            *slow[:4],
            "--trials",
            "6",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    trials = optuna.load_study(study_name="k:tiny-llama", storage=url).get_trials()
    after = {
        t.number: t.user_attrs.get("label")
        for t in trials
        if t.state == optuna.trial.TrialState.COMPLETE
    }
    assert all(after.get(n) == label for n, label in before.items())  # nothing finished was lost
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert [t.number for t in failed] == [killed_during]  # exactly one trial redone
    rows = pd.read_csv(tmp_path / "tiny-llama" / "k" / "trials.csv").set_index("trial")
    assert "interrupted" in rows.loc[killed_during, "error"]
    # the interrupted trial was run again, so the study holds the 6 it was asked for besides it
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len([t for t in complete if "repeat_of" not in t.user_attrs]) == 6


def test_four_workers_on_one_journal_finish_exactly_n_trials(tmp_path):
    _search(tmp_path, "--trials", "9", "--workers", "4", "--sampler", "random", study="w")
    journal = tmp_path / "tiny-llama" / "w" / "study.journal"
    assert journal.is_file()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(journal)))
    trials = optuna.load_study(study_name="w:tiny-llama", storage=storage).get_trials()
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    rows = _trials(tmp_path / "tiny-llama" / "w")
    assert len(rows) == len(trials)
    # Exactly N that count. Their samplers are seeded apart, so they do not all propose the
    # same config at once (a config two workers run at the same time costs both, and counts).
    assert rows.repeat_of.isna().sum() == 9
    assert rows.config_key.nunique() > 9 // 2


def test_a_repeated_config_does_not_count_until_the_sampler_has_converged(tmp_path):
    space = tmp_path / "two.yaml"  # two configs, plus the 16-bit baseline enqueued first
    space.write_text("params:\n  k_bits: [4, 8]\n  v_bits: 4\n  chunk_size: 0\n")
    _search(tmp_path, "--space", str(space), "--sampler", "random", "--trials", "3", study="a")
    rows = _trials(tmp_path / "tiny-llama" / "a")
    assert rows.config_key.nunique() == 3 == rows.repeat_of.isna().sum()
    # Asked for more distinct configs than the space holds: the repeats count once they pass
    # (REPEAT_LIMIT - 1) x --trials, so the study stops after REPEAT_LIMIT x --trials proposals.
    _search(tmp_path, "--space", str(space), "--sampler", "random", "--trials", "4", study="b")
    rows = _trials(tmp_path / "tiny-llama" / "b")
    assert len(rows) == REPEAT_LIMIT * 4 and rows.config_key.nunique() == 3
    first = rows.drop_duplicates("config_key").set_index("config_key").trial
    repeats = rows[rows.repeat_of.notna()]
    assert len(repeats) == len(rows) - 3
    assert (repeats.repeat_of.astype(int) == repeats.config_key.map(first)).all()
    assert repeats.cached.all()


def test_compare_grid_reports_the_fraction_of_grid_hypervolume(tmp_path):
    space = tmp_path / "tiny.yaml"
    space.write_text("params:\n  k_bits: [2, 4, 16]\n  v_bits: [2, 16]\n  chunk_size: 0\n")
    common = [
        "--model",
        "tiny-llama",
        "--space",
        str(space),
        "--tasks",
        "agreement",
        "--context-length",
        "512",
        "--samples",
        "4",
        "--out",
        str(tmp_path),
    ]
    for extra in (
        ["--sampler", "grid", "--study", "grid", "--trials", "1"],
        ["--sampler", "random", "--study", "rnd", "--trials", "3"],
    ):
        done = subprocess.run([*CLI, "search", *common, *extra], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    grid = _trials(tmp_path / "tiny-llama" / "grid")
    assert len(grid) == 6  # every distinct config (3 x 2), whatever --trials says
    done = subprocess.run(
        [
            *CLI,
            "frontier",
            str(tmp_path / "tiny-llama" / "rnd"),
            "--compare-grid",
            str(tmp_path / "tiny-llama" / "grid"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "of the grid's hypervolume" in done.stdout


def test_study_json_and_report_record_the_resolved_compute_dtype(tmp_path):
    from kvpareto.hardware import resolve_compute_dtype

    _search(tmp_path, "--trials", "1")
    folder = tmp_path / "tiny-llama" / "s"
    facts = json.loads((folder / "study.json").read_text())
    auto = resolve_compute_dtype("auto")
    assert facts["compute_dtype"] == auto.name and facts["compute_dtype_requested"] == "auto"
    assert facts["compute_dtype_reason"] == auto.reason
    assert facts["storage_dtype"] == "bfloat16"
    page = (folder / "report.html").read_text()
    assert "compute dtype" in page and auto.reason in page


def test_trial_cache_keys_hold_the_resolved_compute_dtype_and_the_storage_dtype():
    from kvpareto.config import Config
    from kvpareto.search.study import SearchSettings, eval_key

    def key(**kw) -> str:
        settings = SearchSettings("tiny-llama", "space.yaml", ["niah"], 512, 1, **kw)
        return eval_key(Config(), "model-hash", settings)

    here = SearchSettings("tiny-llama", "space.yaml", ["niah"], 512, 1).compute.name
    other = "float32" if here == "bfloat16" else "bfloat16"
    assert key(dtype="auto") == key(dtype=here) != key(dtype=other)
    assert key(dtype="float32", storage_dtype="float32") != key(dtype="float32")


def test_resuming_with_settings_that_change_the_figures_is_refused_and_loses_nothing(tmp_path):
    _search(tmp_path, "--trials", "2")
    folder = tmp_path / "tiny-llama" / "s"
    done = _search(tmp_path, "--trials", "3", "--samples", "4", check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "samples 6" in done.stderr and "samples 4" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert len(_trials(folder)) == 2
    # A study from before the settings were recorded is checked against its study.json.
    study = optuna.load_study(study_name="s:tiny-llama", storage=f"sqlite:///{folder / 'study.db'}")
    study.set_user_attr("defining", None)
    done = _search(tmp_path, "--trials", "3", "--seed", "1", check=False)
    assert done.returncode == 2 and "seed 0" in done.stderr and "seed 1" in done.stderr
    _search(tmp_path, "--trials", "3")  # the same settings resume it
    assert _trials(folder).repeat_of.isna().sum() == 3
