"""The shared context every command and task carries: settings, the metadata DB and the vector store,
each opened on first use (a `reco --help` touches neither)."""

from __future__ import annotations

import threading

from .settings import Settings


class Runtime:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings.from_env()
        self._db = None
        self._store = None
        self._lock = threading.Lock()

    @property
    def db(self):
        with self._lock:
            if self._db is None:
                from .db import Database

                # the embedded profile migrates itself on first use; a shared server database is upgraded on purpose
                if self.settings.is_sqlite:
                    from filelock import FileLock

                    self.settings.home.mkdir(parents=True, exist_ok=True)
                    with FileLock(str(self.settings.home / "migrate.lock")):
                        self._db = Database(self.settings.database_url, auto_upgrade=True)
                else:
                    self._db = Database(self.settings.database_url)
            return self._db

    @property
    def store(self):
        with self._lock:
            if self._store is None:
                from .store import open_store

                self._store = open_store(self.settings)
            return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._db is not None:
            self._db.dispose()
            self._db = None
