"""The shared context every command and task carries: settings, the metadata DB and the vector store,
each opened on first use (a `reco --help` touches neither)."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

from .errors import RecoError, disk_full_error, is_disk_full
from .settings import Settings

def ensure_home(home: Path) -> None:
    """RECO_HOME must exist and take a write before the metadata DB or the store opens there: otherwise the first
    write fails deep inside SQLite or the engine with a traceback. A real write is the test (permission bits say
    nothing for root, and nothing about a read-only mount)."""
    probe = home / f".write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # threads and processes never share one
    try:
        home.mkdir(parents=True, exist_ok=True)
        _probe_write(probe)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(home, 64) from exc
        why = exc.strerror or type(exc).__name__
        raise RecoError(f"RECO_HOME {home} cannot be created or written ({why}): set RECO_HOME to a writable "
                        f"directory, or make this one writable") from exc


def _probe_write(probe: Path) -> None:
    probe.write_bytes(b"")
    probe.unlink()


def orphaned_collections(vectors: Path) -> list[str]:
    """Collections of the embedded store: directories under RECO_HOME/vectors that hold files."""
    if not vectors.is_dir():
        return []
    return sorted(p.name for p in vectors.iterdir() if p.is_dir() and any(p.iterdir()))


def refuse_empty_db_with_vectors(settings: Settings, db=None) -> None:
    """A metadata DB without a schema (missing, a zero-byte file, or no tables) beside a vectors directory that
    holds collections: the versions' records are lost. Migrating it would list no memory and rebuild over the old
    collections (their points counted as the new build's), so refuse and say how to recover. Without `db` only
    the file is looked at (before SQLite opens it and writes a header)."""
    path = settings.database_url.split("///", 1)[-1]
    if not settings.embedded_store or path in ("", ":memory:"):
        return
    if db is None:
        if Path(path).is_file() and Path(path).stat().st_size > 0:
            return
    elif db.current_revision() is not None:
        return
    found = orphaned_collections(settings.vectors_dir)
    if not found:
        return
    vectors = settings.vectors_dir
    raise RecoError(f"the metadata database {path} is empty but {vectors} holds {len(found)} collection(s) "
                    f"({', '.join(found[:3])}{', …' if len(found) > 3 else ''}): restore {path} from a backup; or "
                    f"move the vectors aside (`mv {vectors} {vectors}.orphaned`) and `reco memory import` your "
                    f"exports, or build again from scratch")


class Runtime:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings.from_env()
        self._db = None
        self._store = None
        self._home_checked = False
        self._lock = threading.Lock()

    def _check_home(self) -> None:
        if not self._home_checked:
            ensure_home(self.settings.home)
            self._home_checked = True

    @property
    def db(self):
        with self._lock:
            if self._db is None:
                from .db import Database

                # the embedded profile migrates itself on first use; a shared server database is upgraded on purpose
                if self.settings.is_sqlite:
                    from filelock import FileLock

                    self._check_home()
                    with FileLock(str(self.settings.home / "migrate.lock")):
                        refuse_empty_db_with_vectors(self.settings)
                        db = Database(self.settings.database_url, check=False)
                        try:
                            refuse_empty_db_with_vectors(self.settings, db)
                            db.upgrade()
                        except BaseException:
                            db.dispose()
                            raise
                        self._db = db
                else:
                    self._db = Database(self.settings.database_url)
            return self._db

    @property
    def store(self):
        with self._lock:
            if self._store is None:
                from .store import open_store

                if self.settings.embedded_store:
                    self._check_home()
                self._store = open_store(self.settings)
            return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._db is not None:
            self._db.dispose()
            self._db = None
