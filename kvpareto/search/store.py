"""Where a study lives: Optuna storage URLs and the on-disk trial cache.

- SQLite by default, one file per study under `results/<model>/<study>/study.db`;
- a journal file (`study.journal`) when `--workers K > 1` local processes share the study, since
  SQLite locks badly under concurrent writers;
- any `postgresql://` URL for workers on many machines (Optuna's RDB storage coordinates them).

The trial cache maps (config, tasks, model, evaluation settings) to a finished `TrialResult`, as
one JSON file per key (its record, `TrialResult.to_dict`), written to a temporary name and renamed
so readers never see half a file. It is shared by every study of a model, so a re-run or a
duplicate proposal costs nothing.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from kvpareto.errors import UserError
from kvpareto.evaluation.result import RecordError, TrialResult

_POSTGRES = ("postgresql://", "postgresql+psycopg://", "postgresql+psycopg2://")


def check_storage(url: str | None, workers: int) -> None:
    """Reject a storage URL we cannot use, before any work starts."""
    if url is None or url.startswith(("journal:", *_POSTGRES)):
        return
    if url.startswith("sqlite:///"):
        if workers > 1:
            raise UserError(
                "SQLite cannot serve parallel workers; use --storage journal:FILE or postgresql://"
            )
        return
    raise UserError(
        f"unsupported --storage {url!r}; use sqlite:///FILE, journal:FILE or postgresql://USER@HOST/DB"
    )


def resolve_storage(url: str | None, study_dir: Path, workers: int):
    """Return an Optuna storage (object or URL) for `url`, or the default for `workers`."""

    check_storage(url, workers)
    if url is None:
        study_dir.mkdir(parents=True, exist_ok=True)
        if workers > 1:
            return _journal(study_dir / "study.journal")
        return f"sqlite:///{(study_dir / 'study.db').resolve()}"
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        if workers > 1:
            raise UserError(
                "SQLite cannot serve parallel workers; use --storage journal:FILE or postgresql://"
            )
        return url
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return _journal(path)
    try:
        return _rdb(url)
    except ImportError:
        raise UserError("PostgreSQL storage needs psycopg: pip install 'psycopg[binary]'") from None
    except Exception as e:  # noqa: BLE001  (SQLAlchemy raises many kinds; all mean "cannot connect")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot open --storage {url}: {first}") from None


def _rdb(url: str, attempts: int = 3):
    """Optuna's RDB storage at `url`. Workers that start together on an empty database all
    create Optuna's tables, and the losers hit a unique constraint (pg_type) or find a table
    already there (DuplicateTable); the tables exist once the winner is done, so a loser
    retries."""
    import optuna
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except (IntegrityError, ProgrammingError) as e:
            lost_race = isinstance(e, IntegrityError) or "already exists" in str(e)
            if not lost_race or attempt == attempts - 1:
                raise
            time.sleep(1 + attempt)


def _journal(path: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


class TrialCache:
    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> TrialResult | None:
        """The result stored under `key`; None when there is none, only half a file, or a
        record of another shape (an older kvpareto's): the trial then runs again, and its new
        record replaces the old one, so no stale figure is ever served."""
        path = self._path(key)
        try:
            return TrialResult.from_dict(json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError, RecordError):
            return None

    def put(self, key: str, result: TrialResult) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(result.to_dict(), f)
        os.replace(tmp, self._path(key))
