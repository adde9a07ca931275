"""Migrations bring an empty database to head, on SQLite and PostgreSQL, and are idempotent."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import inspect

from memos.db.engine import Database
from memos.db.migrate import alembic_config, current_revision, head_revision, upgrade
from memos.db.models import Base
from memos.db.types import JsonValue, UTCDateTime


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_db(request, tmp_path):
    if request.param == "sqlite":
        db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    else:
        import psycopg

        from tests.conftest import POSTGRES_ADMIN_URL

        admin = POSTGRES_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
        name = f"memos_migrations_{secrets.token_hex(4)}"  # sessions may run side by side
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        db = Database(POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
    yield db
    db.dispose()
    if request.param == "postgres":
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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


def migrate(db: Database, target: str, down: bool = False) -> None:
    """`upgrade` (or downgrade) to a given revision, as the daemon migrates: one connection."""
    cfg = alembic_config(db.url)
    with db.write_engine.connect() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, target)
        conn.commit()


SAID = datetime(2023, 5, 8, 13, 56, tzinfo=UTC)
USERS = sa.table("users", *(sa.column(c) for c in ("id", "name", "is_admin")),
                 sa.column("created_at", UTCDateTime))  # fmt: skip
CUBES = sa.table("cubes", *(sa.column(c) for c in ("id", "name", "description", "owner_id",
                 "generation")), sa.column("created_at", UTCDateTime))  # fmt: skip
MEMORIES = sa.table(
    "memories",
    *(sa.column(c) for c in ("seq", "id", "cube_id", "content", "context", "embedding",
                             "version", "change_seq", "enrichment")),
    *(sa.column(c, JsonValue) for c in ("metadata", "keywords", "tags", "dates")),
    *(sa.column(c, UTCDateTime) for c in ("timestamp", "created_at", "updated_at",
                                         "enrichment_next_at")),
    sa.column("enrichment_attempts"),
    sa.column("enrichment_error"),
)  # fmt: skip
HISTORY = sa.table(
    "memory_history",
    *(sa.column(c) for c in ("id", "memory_seq", "version", "content", "context", "reason")),
    *(sa.column(c, JsonValue) for c in ("metadata", "keywords", "tags", "dates")),
    sa.column("changed_at", UTCDateTime),
)  # fmt: skip
OLD_KEYWORDS = {  # seq -> keywords as daemons before 0005 stored them: dates appended
    1: ["support group", "lgbtq", "2023-05-07"],
    2: ["sunrise", "lake", "2023-05-06", "2022-01-01"],
    3: ["pottery", "art studio"],
    4: [],
}


def memory_row(seq: int, enrichment: str) -> dict:
    return {"seq": seq, "id": f"mem_{seq}", "cube_id": "cube_1", "content": f"note {seq}",
            "context": "", "embedding": b"\0" * 4, "version": 1, "change_seq": seq,
            "enrichment": enrichment, "metadata": {}, "keywords": OLD_KEYWORDS[seq], "tags": [],
            "timestamp": SAID, "created_at": SAID, "updated_at": SAID}  # fmt: skip


def test_0005_moves_dates_out_of_keywords_and_retries_old_failures(empty_db):
    """Dates stored among keywords move to `dates` (memories and history), in order; notes an
    older daemon parked as failed become due for a retry; a downgrade puts it all back."""
    migrate(empty_db, "0004")
    with empty_db.write() as s:
        s.execute(USERS.insert().values(id="usr_1", name="u", is_admin=False, created_at=SAID))
        s.execute(CUBES.insert().values(id="cube_1", name="c", description="", owner_id="usr_1",
                                        generation=4, created_at=SAID))  # fmt: skip
        states = {1: "done", 2: "done", 3: "failed", 4: "pending"}
        s.execute(MEMORIES.insert(), [memory_row(seq, states[seq]) for seq in OLD_KEYWORDS])
        s.execute(HISTORY.insert(), [
            {"id": seq, "memory_seq": seq, "version": 1, "content": f"note {seq}", "context": "",
             "reason": "created", "metadata": {}, "keywords": OLD_KEYWORDS[seq], "tags": [],
             "changed_at": SAID}
            for seq in OLD_KEYWORDS
        ])  # fmt: skip
    before = datetime.now(UTC)
    migrate(empty_db, "0005")
    after = datetime.now(UTC)
    with empty_db.read() as s:
        memories = s.execute(
            sa.select(MEMORIES.c.seq, MEMORIES.c.keywords, MEMORIES.c.dates,
                      MEMORIES.c.enrichment, MEMORIES.c.enrichment_attempts,
                      MEMORIES.c.enrichment_error, MEMORIES.c.enrichment_next_at)
            .order_by(MEMORIES.c.seq)
        ).all()  # fmt: skip
        history = s.execute(
            sa.select(HISTORY.c.memory_seq, HISTORY.c.keywords, HISTORY.c.dates).order_by(
                HISTORY.c.id
            )
        ).all()
    assert [tuple(row[:6]) for row in memories] == [
        (1, ["support group", "lgbtq"], ["2023-05-07"], "done", 0, None),
        (2, ["sunrise", "lake"], ["2023-05-06", "2022-01-01"], "done", 0, None),
        (3, ["pottery", "art studio"], [], "retrying", 1, "failed before retries existed"),
        (4, [], [], "pending", 0, None),
    ]
    assert [row[6] for row in memories[:2] + memories[3:]] == [None, None, None]
    assert before <= memories[2][6] <= after  # due at once
    assert [tuple(row) for row in history] == [
        (1, ["support group", "lgbtq"], ["2023-05-07"]),
        (2, ["sunrise", "lake"], ["2023-05-06", "2022-01-01"]),
        (3, ["pottery", "art studio"], []),
        (4, [], []),
    ]
    migrate(empty_db, "0004", down=True)
    keywords = sa.table("memories", sa.column("seq"), sa.column("keywords", JsonValue),
                        sa.column("enrichment"))  # fmt: skip
    with empty_db.read() as s:
        rows = s.execute(sa.select(keywords).order_by(keywords.c.seq)).all()
        assert "dates" not in {c["name"] for c in inspect(s.connection()).get_columns("memories")}
    assert [(seq, kw) for seq, kw, _ in rows] == list(OLD_KEYWORDS.items())
    assert [state for _, _, state in rows] == ["done", "done", "failed", "pending"]
