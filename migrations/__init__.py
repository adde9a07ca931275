"""Alembic migrations; `memos.db.migrate.upgrade` applies them at daemon start."""
