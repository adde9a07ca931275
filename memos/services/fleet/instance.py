"""This daemon's identity in the fleet, and its lease.

Each daemon has an instance id (the `fleet.instance_id` setting, else one generated once and
kept in `<data_dir>/instance_id`, so a restarted daemon is the same instance). At start it
records itself in `instances` with a lease `lease_s` long, which a heartbeat thread renews
every `heartbeat_s`; a clean stop ends the lease at once.

Work a daemon owns (an activation build, a job run, an enrichment claim, a chat turn) carries
its instance id. Another daemon may take that work over (fail it, or do it again) only once
the owner's lease has expired (`owner_gone`), never while the owner is alive. A restarted
daemon recovers its own earlier work at once: it knows that nothing of its old self runs.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select, update

from memcube.atomic import write_atomic
from memos.db.engine import Database
from memos.db.models import Instance as InstanceRow
from memos.db.types import utcnow
from memos.services.ids import new_id

log = logging.getLogger("memos.fleet")


def load_instance_id(configured: str | None, data_dir: Path) -> str:
    """The configured id, else the one kept in `data_dir`, else a new one (then kept)."""
    if configured:
        return configured
    path = data_dir / "instance_id"
    try:
        kept = path.read_text().strip()
    except FileNotFoundError:
        kept = ""
    if kept:
        return kept
    fresh = new_id("inst")
    write_atomic(path, (fresh + "\n").encode())
    return fresh


def owner_gone(column: Any, me: str, now: datetime | None = None) -> ColumnElement[bool]:
    """SQL: the work's owner (`column`, an instance id) is none, is this daemon's earlier self,
    or is a daemon whose lease has expired. Work for which this holds may be taken over."""
    alive = select(InstanceRow.id).where(
        InstanceRow.lease_until > (now or utcnow()), InstanceRow.id != me
    )
    return or_(column.is_(None), column.not_in(alive))


def other_owner_gone(column: Any, me: str, now: datetime | None = None) -> ColumnElement[bool]:
    """SQL: the work belongs to another daemon whose lease has expired (not to this daemon,
    nor to no one). What a live daemon may take over while it runs, beside its own work."""
    return and_(column.is_not(None), column != me, owner_gone(column, me, now))


class Instance:
    """This daemon's row in `instances` and the heartbeat that renews its lease."""

    def __init__(
        self,
        db: Database,
        instance_id: str,
        lease_s: float,
        heartbeat_s: float,
        url: str | None = None,
    ) -> None:
        self.db = db
        self.id = instance_id
        self.lease_s = lease_s
        self.heartbeat_s = heartbeat_s
        self.url = url
        self.started_at = utcnow()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def lease_end(self) -> datetime:
        return utcnow() + timedelta(seconds=self.lease_s)

    def register(self) -> None:
        """Record this daemon (again, after a restart) with a fresh lease."""
        now = utcnow()
        with self.db.write() as s:
            row = s.get(InstanceRow, self.id)
            if row is None:
                row = InstanceRow(id=self.id)
                s.add(row)
            row.host = socket.gethostname()[:200]
            row.pid = os.getpid()
            row.url = self.url
            row.started_at = now
            row.heartbeat_at = now
            row.lease_until = now + timedelta(seconds=self.lease_s)

    def start(self) -> None:
        self.register()
        self._thread = threading.Thread(target=self._beat, name="memos-heartbeat", daemon=True)
        self._thread.start()

    def renew(self) -> None:
        now = utcnow()
        with self.db.write() as s:
            s.execute(
                update(InstanceRow)
                .where(InstanceRow.id == self.id)
                .values(heartbeat_at=now, lease_until=now + timedelta(seconds=self.lease_s))
            )

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except Exception:  # the database is away: the next beat tries again
                log.warning("heartbeat failed", exc_info=True)

    def stop(self) -> None:
        """End the lease now: the fleet may take over whatever this daemon left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            with self.db.write() as s:
                ended = update(InstanceRow).where(InstanceRow.id == self.id)
                s.execute(ended.values(lease_until=utcnow()))
        except Exception:
            log.warning("could not end this daemon's lease", exc_info=True)

    def members(self) -> list[dict[str, Any]]:
        """The fleet as the database sees it: every daemon whose lease has not expired."""
        now = utcnow()
        with self.db.read() as s:
            rows = s.scalars(
                select(InstanceRow).where(InstanceRow.lease_until > now).order_by(InstanceRow.id)
            ).all()
        return [
            {
                "id": row.id,
                "host": row.host,
                "pid": row.pid,
                "url": row.url,
                "started_at": row.started_at.isoformat(),
                "heartbeat_at": row.heartbeat_at.isoformat(),
                "self": row.id == self.id,
            }
            for row in rows
        ]
