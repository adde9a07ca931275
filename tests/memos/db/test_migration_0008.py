"""Migration 0008 adds the usage columns and `cube_policies`, and its downgrade removes them."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect, text

from memos.db.engine import Database
from memos.db.migrate import alembic_config, upgrade


def _migrate(db: Database, target: str, down: bool = False) -> None:
    cfg = alembic_config(db.url)
    with db.write_engine.connect() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, target)
        conn.commit()


def _columns(db: Database, table: str) -> set[str]:
    return {c["name"] for c in inspect(db.read_engine).get_columns(table)}


def test_lifecycle_columns_come_with_zero_counts_and_go_on_downgrade(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    _migrate(db, "0007")
    now = "2026-01-01 00:00:00"
    with db.write() as s:
        s.execute(text(f"INSERT INTO users (id, name, is_admin, created_at) "
                       f"VALUES ('u', 'u', 0, '{now}')"))  # fmt: skip
        s.execute(text("INSERT INTO cubes (id, name, description, owner_id, created_at, "
                       f"generation) VALUES ('c', 'c', '', 'u', '{now}', 0)"))  # fmt: skip
        s.execute(text(
            "INSERT INTO memories (id, cube_id, content, timestamp, metadata, keywords, tags,"
            " context, embedding, version, change_seq, created_at, updated_at, enrichment,"
            " dates) VALUES ('m', 'c', 'x', :now, '{}', '[]', '[]', '', x'00', 1, 1, :now, :now,"
            " 'done', '[]')"
        ), {"now": now})  # fmt: skip
    upgrade(db)
    assert {"recalls", "last_recalled_at"} <= _columns(db, "memories")
    assert {"uses", "loads"} <= _columns(db, "activations")
    with db.read() as s:
        assert s.execute(text("SELECT recalls, last_recalled_at FROM memories")).one() == (0, None)
    with db.write() as s:
        s.execute(text("INSERT INTO cube_policies (cube_id, version, policy, changed_by, "
                       f"changed_at) VALUES ('c', 1, '{{}}', 'u', '{now}')"))  # fmt: skip
    _migrate(db, "0007", down=True)
    assert "cube_policies" not in inspect(db.read_engine).get_table_names()
    assert not {"recalls", "last_recalled_at"} & _columns(db, "memories")
    assert not {"uses", "loads"} & _columns(db, "activations")
    with db.read() as s:  # the note itself survived the round trip
        assert s.execute(text("SELECT id, content FROM memories")).one() == ("m", "x")
    upgrade(db)
    assert {"recalls", "last_recalled_at"} <= _columns(db, "memories")
    db.dispose()
