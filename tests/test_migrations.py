"""The Alembic migrations build exactly the schema the models describe, on SQLite and on PostgreSQL."""

import uuid

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from app.db import Base, Database
from app.db.session import head_revision
from app.errors import RecoError



def _assert_matches_models(db: Database) -> None:
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models and migrations disagree: {diff}"


def test_sqlite_upgrade_is_idempotent_and_matches_models(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    with pytest.raises(RecoError, match="reco db upgrade"):
        Database(url)  # a server-profile database is never migrated behind the operator's back
    db = Database(url, check=False)
    assert db.upgrade() == (None, head_revision())
    assert db.upgrade() == (head_revision(), head_revision())
    assert {"memories", "memory_versions", "ingest_shards"} <= set(inspect(db.engine).get_table_names())
    _assert_matches_models(db)
    Database(url)  # at head: accepted


def test_auto_upgrade_for_the_embedded_profile(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'home' / 'reco.db'}", auto_upgrade=True)
    assert db.current_revision() == head_revision()


@pytest.mark.slow
def test_postgres_upgrade_matches_models(private_pg):
    name = f"reco_mig_{uuid.uuid4().hex[:8]}"
    private_pg.create_db(name)
    db = Database(private_pg.url(name), check=False)
    assert db.upgrade() == (None, head_revision())
    assert db.upgrade() == (head_revision(), head_revision())
    _assert_matches_models(db)
    db.dispose()
