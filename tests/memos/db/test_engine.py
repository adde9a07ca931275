"""SQLite connections overwrite deleted content, and a checkpoint empties the WAL."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from memos.db.engine import Database


def test_sqlite_connections_run_with_secure_delete(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 's.db'}")
    for engine in (db.read_engine, db.write_engine):
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA secure_delete").scalar() == 1
    db.dispose()


def test_checkpoint_truncates_the_wal(tmp_path):
    path = tmp_path / "c.db"
    db = Database(f"sqlite:///{path}")
    with db.write() as s:
        s.execute(text("CREATE TABLE t (x TEXT)"))
        s.execute(text("INSERT INTO t VALUES ('zq-wal-marker')"))
    wal = Path(f"{path}-wal")
    assert b"zq-wal-marker" in wal.read_bytes()
    assert db.checkpoint() is True
    assert wal.stat().st_size == 0
    assert b"zq-wal-marker" in path.read_bytes()  # now in the database file, where it belongs
    db.dispose()
