"""Engines and sessions for SQLite (embedded default) and PostgreSQL.

SQLite runs in WAL mode with `synchronous=FULL`, so a committed transaction survives a crash
of the daemon (and of the machine). Write transactions on SQLite start with `BEGIN IMMEDIATE`
on a separate engine: a deferred transaction that reads and then writes can fail at once with
"database is locked" when another writer got in between, while an immediate one waits.
Every SQLite connection runs with `secure_delete=ON`: deleted rows are overwritten with zeros
in the pages that held them, so an erased memory's bytes leave the database file once the WAL
is checkpointed (`Database.checkpoint`). PostgreSQL keeps dead tuples until VACUUM.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker


def _sqlite_engine(url: str, immediate: bool) -> Engine:
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": 30},
        pool_size=1 if immediate else 8,
        max_overflow=0 if immediate else 8,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves, below
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA secure_delete=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class Database:
    """Owns the engines; hands out sessions for reads and for write transactions."""

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.read_engine = _sqlite_engine(url, immediate=False)
            self.write_engine = _sqlite_engine(url, immediate=True)
        else:
            self.read_engine = create_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)
            self.write_engine = self.read_engine
        self._reader = sessionmaker(self.read_engine, expire_on_commit=False)
        self._writer = sessionmaker(self.write_engine, expire_on_commit=False)

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._reader() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that commits on success and rolls back on any exception."""
        with self._writer() as session, session.begin():
            yield session

    def checkpoint(self) -> bool:
        """SQLite: copy the WAL into the database file and truncate the WAL to zero bytes, so
        no older copy of a page survives in it. True when done; False when a reader kept it
        busy (the next checkpoint finishes the job). PostgreSQL: nothing to do here."""
        if self.dialect != "sqlite":
            return True
        # On the raw (autocommit) connection: inside a transaction the connection's own
        # snapshot would keep the checkpoint from finishing.
        raw = self.read_engine.raw_connection()
        try:
            cursor = raw.cursor()
            busy = cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            cursor.close()
        finally:
            raw.close()
        return int(busy) == 0

    def dispose(self) -> None:
        self.read_engine.dispose()
        if self.write_engine is not self.read_engine:
            self.write_engine.dispose()
