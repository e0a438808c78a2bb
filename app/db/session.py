"""Engine and sessions for the metadata DB, and schema upgrades through the Alembic migrations we ship."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import DatabaseError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from ..errors import RecoError, TransientError
from ..settings import mask_url, scrub

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def _alembic_config(connection=None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def is_damaged(exc: Exception) -> bool:
    """An SQLite file that is not (or no longer) a database: every command would fail the same way."""
    msg = str(exc).lower()
    return "not a database" in msg or "malformed" in msg


def database_error(url: str, exc: Exception) -> RecoError:
    """One line for a database error no command expects: for a corrupt or partly overwritten SQLite file, which
    file and the way out."""
    first = scrub((str(getattr(exc, "orig", exc)).splitlines() or [type(exc).__name__])[0], url)
    if url.startswith("sqlite") and is_damaged(exc):
        path = url.split("///", 1)[-1]
        return RecoError(f"the metadata database {path} is damaged ({first}): restore it from a backup, or move it "
                         f"aside (`mv {path} {path}.broken`) and build the memories again (the vectors under "
                         f"RECO_HOME/vectors cannot be used without it)")
    return RecoError(f"the metadata database at {mask_url(url)} failed: {first}")


class Database:
    """One engine per process. `upgrade()` is idempotent; `auto_upgrade` applies it on first use (embedded);
    otherwise a schema behind the code is refused with a pointer to `reco db upgrade` (`check=False` skips that)."""

    def __init__(self, url: str, auto_upgrade: bool = False, check: bool = True):
        self.url = url
        kwargs: dict = {"future": True, "pool_pre_ping": True}
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 60}
        else:
            kwargs["connect_args"] = {"connect_timeout": 5}
        self.engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if auto_upgrade:
            self.upgrade()
        elif check:
            self.check_schema()

    def _connect_error(self, exc: Exception) -> TransientError:
        return TransientError(
            f"cannot reach the metadata database at {mask_url(self.url)} ({scrub(str(exc).splitlines()[0], self.url)}); "
            "check RECO_DATABASE_URL and that the server is running"
        )

    def _operational_error(self, exc: Exception) -> RecoError:
        """A full disk under an SQLite file is no outage to wait out: say where and what to free."""
        from ..errors import disk_full_error, is_disk_full

        if self.url.startswith("sqlite") and is_disk_full(exc):
            return disk_full_error(Path(self.url.split("///", 1)[-1]), 64)
        return self._connect_error(exc)

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        try:
            with self.engine.connect() as conn:
                return MigrationContext.configure(conn).get_current_revision()
        except OperationalError as exc:
            if is_damaged(exc):
                raise database_error(self.url, exc) from exc
            raise self._connect_error(exc) from exc
        except DatabaseError as exc:  # an SQLite file that is not a database fails before any query
            raise database_error(self.url, exc) from exc

    def upgrade(self) -> tuple[str | None, str]:
        """Bring the schema to the newest migration. Returns (before, after)."""
        from alembic import command

        before = self.current_revision()
        head = head_revision()
        if before != head:
            engine = self._migration_engine()
            try:
                with engine.begin() as conn:  # every pending migration in one transaction: all or nothing
                    command.upgrade(_alembic_config(conn), "head")
            except (OperationalError, ProgrammingError) as exc:
                # another process may have upgraded at the same moment: fine if we are now at head
                if self.current_revision() != head:
                    raise self._upgrade_error(exc) from exc
            finally:
                if engine is not self.engine:
                    engine.dispose()
        return before, head

    def _migration_engine(self):
        """On SQLite, an engine whose transactions cover DDL too. pysqlite on its own begins a transaction only
        before INSERT/UPDATE/DELETE, so each CREATE TABLE commits at once and a migration that fails half-way (a
        full disk) leaves tables behind that the next run trips over ("table memories already exists"). The
        driver's own transaction handling is switched off and SQLAlchemy's begin emits BEGIN IMMEDIATE (the
        write lock up front: one migrator at a time). Only migrations use it; sessions keep the usual engine."""
        if not self.url.startswith("sqlite"):
            return self.engine
        from sqlalchemy.pool import NullPool

        engine = create_engine(self.url, future=True, poolclass=NullPool,
                               connect_args={"timeout": 60, "isolation_level": None})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine

    def _upgrade_error(self, exc: Exception) -> RecoError:
        from ..errors import disk_full_error, is_disk_full

        if self.url.startswith("sqlite") and is_disk_full(exc):
            return disk_full_error(Path(self.url.split("///", 1)[-1]), 64)
        return RecoError(f"database upgrade failed: {scrub(str(exc).splitlines()[0], self.url)}; nothing was "
                         "changed, run the command again once that is fixed")

    def check_schema(self) -> None:
        current = self.current_revision()
        if current != head_revision():
            raise RecoError(
                f"the metadata database at {mask_url(self.url)} is at schema {current or 'none'}, "
                f"this code needs {head_revision()}: run `reco db upgrade`"
            )

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: commits on success, rolls back on error."""
        s = self._sessions()
        try:
            yield s
            s.commit()
        except OperationalError as exc:
            s.rollback()
            raise self._operational_error(exc) from exc
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def ping(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except OperationalError as exc:
            raise self._connect_error(exc) from exc

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.close()
