"""Two workers on one PostgreSQL study, as two machines would share it.

`.ci/run` installs and starts a real server on loopback and sets KVPARETO_TEST_POSTGRES_URL.
"""

from __future__ import annotations

import os
import subprocess
import uuid

import optuna
import pytest

from tests.conftest import CLI

URL = os.environ.get("KVPARETO_TEST_POSTGRES_URL")


@pytest.fixture
def fresh_database():
    """A new, empty database on the server for one test, dropped after it: two workers then
    start on no tables at all, as on a new server, and race to create Optuna's schema."""
    import psycopg

    name = f"kvpareto_test_{uuid.uuid4().hex[:8]}"
    base = URL.rsplit("/", 1)[0]
    try:
        with psycopg.connect(URL, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
    except psycopg.errors.InsufficientPrivilege:
        pytest.skip("the test role cannot create databases (.ci/postgres.sh grants CREATEDB)")
    yield f"{base}/{name}"
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.mark.skipif(not URL, reason="no PostgreSQL server (set KVPARETO_TEST_POSTGRES_URL)")
def test_two_workers_share_one_postgres_study_started_on_an_empty_database(
    tmp_path, fresh_database
):
    study = f"pg{uuid.uuid4().hex[:8]}"
    url = fresh_database
    n = 8
    cmd = [
        *CLI,
        "search",
        "--model",
        "tiny-llama",
        "--space",
        "search_spaces/smoke.yaml",
        "--tasks",
        "agreement",
        "--context-length",
        "512",
        "--samples",
        "4",
        "--knee-samples",  # exactly n trials, no top-up
        "0",
        "--trials",
        str(n),
        "--sampler",
        "random",
        "--storage",
        url,
        "--study",
        study,
    ]
    procs = [
        subprocess.Popen(
            [*cmd, "--out", str(tmp_path / f"m{i}"), "--seed", str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        _, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-2000:]
    storage = optuna.storages.RDBStorage(url)
    trials = optuna.load_study(study_name=f"{study}:tiny-llama", storage=storage).get_trials()
    finished = [t for t in trials if t.state.is_finished()]
    # Each worker stops once the study holds n (a config it had run already does not count);
    # a trial already under way may finish after.
    assert n <= len([t for t in finished if "repeat_of" not in t.user_attrs]) <= n + 1
    assert len({t.number for t in trials}) == len(trials)
    assert len({t.user_attrs["worker"] for t in finished}) == 2  # both machines contributed
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in finished)
