"""Migrations bring an empty database to head, on SQLite and PostgreSQL, and are idempotent."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect

from memos.db.engine import Database
from memos.db.migrate import current_revision, head_revision, upgrade
from memos.db.models import Base


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_db(request, tmp_path):
    if request.param == "sqlite":
        db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    else:
        import psycopg

        from tests.conftest import POSTGRES_ADMIN_URL

        admin = POSTGRES_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS memos_migrations_test WITH (FORCE)")
            conn.execute("CREATE DATABASE memos_migrations_test")
        db = Database(POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/memos_migrations_test")
    yield db
    db.dispose()
    if request.param == "postgres":
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS memos_migrations_test WITH (FORCE)")


def test_upgrade_creates_every_model_table_and_is_idempotent(empty_db):
    assert current_revision(empty_db) is None
    assert upgrade(empty_db) == head_revision()
    assert current_revision(empty_db) == head_revision()
    tables = set(inspect(empty_db.read_engine).get_table_names())
    assert set(Base.metadata.tables) <= tables
    assert upgrade(empty_db) == head_revision()  # a second start changes nothing


def test_sqlite_runs_in_wal_with_full_sync(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'w.db'}")
    with db.read_engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    db.dispose()


def test_models_and_migrations_agree(empty_db):
    """A model change without its migration (or the reverse) fails here, not in production."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    upgrade(empty_db)
    with empty_db.read_engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
