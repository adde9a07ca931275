"""Migration 0006 fills `cubes.live_memories` from the memories already stored."""

from __future__ import annotations

from alembic import command
from sqlalchemy import text

from memos.db.engine import Database
from memos.db.migrate import alembic_config, upgrade


def test_live_memory_counters_are_filled_from_existing_rows(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    cfg = alembic_config(db.url)
    with db.write_engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
        conn.commit()
    now = "2026-01-01 00:00:00"
    with db.write() as s:
        s.execute(
            text(
                f"INSERT INTO users (id, name, is_admin, created_at) VALUES ('u', 'u', 0, '{now}')"
            )
        )
        for cube in ("a", "b", "c"):
            s.execute(
                text(
                    "INSERT INTO cubes (id, name, description, owner_id, created_at, generation)"
                    f" VALUES ('{cube}', '{cube}', '', 'u', '{now}', 0)"
                )
            )
        for n, (cube, deleted) in enumerate(
            [("a", None), ("a", None), ("a", now), ("b", now), ("b", None)]
        ):
            s.execute(
                text(
                    "INSERT INTO memories (id, cube_id, content, timestamp, metadata, keywords,"
                    " tags, context, embedding, version, change_seq, created_at, updated_at,"
                    " deleted_at, enrichment) VALUES (:id, :cube, 'x', :now, '{}', '[]', '[]',"
                    " '', x'00', 1, 1, :now, :now, :deleted, 'done')"
                ),
                {"id": f"m{n}", "cube": cube, "now": now, "deleted": deleted},
            )
    upgrade(db)
    with db.read() as s:
        counts = dict(s.execute(text("SELECT id, live_memories FROM cubes ORDER BY id")).all())
        names = s.execute(text("SELECT count(*) FROM api_keys WHERE name != ''")).scalar()
    assert counts == {"a": 2, "b": 1, "c": 0}
    assert names == 0
    db.dispose()
