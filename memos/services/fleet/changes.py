"""Index coherence across the fleet: hear other daemons' writes, and catch the indexes up.

Every write bumps its cube's generation in `bump_generation`, which on PostgreSQL also queues
`NOTIFY memos_changes, '<cube_id> <generation>'`, delivered to every listener when the write
commits. Each daemon runs one `ChangeFeed` thread: a dedicated autocommit connection that
`LISTEN`s, and for each notice about a cube it has loaded at an older generation asks the
`IndexRegistry` to catch up (replay the rows whose `change_seq` is newer). Notices that
arrive together are coalesced (one catch-up per cube, at the newest generation); a daemon's
own writes, already applied, are skipped by the generation check.

Notices are lost while the connection is down (a PostgreSQL restart: the thread reconnects
with backoff), and SQLite has none: a poll of the loaded cubes' generations (one query for
all of them) every `poll_s` catches up whatever lags, and runs at once after a reconnect.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url

from memos.services.indexes import IndexRegistry
from memos.services.repository import CHANGES_CHANNEL

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("memos.fleet.changes")

# The longest one wait for notices lasts: how soon `stop` is heard.
_WAIT_MAX_S = 0.5


@dataclass(frozen=True)
class Notice:
    cube_id: str
    generation: int


def parse_notice(payload: str) -> Notice | None:
    """`"<cube_id> <generation>"`, else None (a stray NOTIFY on the channel is ignored)."""
    parts = payload.split(" ")
    if len(parts) != 2 or not parts[0] or not parts[1].isdigit():
        return None
    return Notice(parts[0], int(parts[1]))


def libpq_url(sqlalchemy_url: str) -> str | None:
    """The PostgreSQL URL as libpq takes it (no `+driver`); None for another database."""
    url = make_url(sqlalchemy_url)
    if url.get_backend_name() != "postgresql":
        return None
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class ChangeFeed:
    """One thread: LISTEN (on PostgreSQL) and poll; catch up the loaded indexes that lag."""

    def __init__(
        self,
        indexes: IndexRegistry,
        database_url: str,
        instance_id: str,
        poll_s: float = 2.0,
        reconnect_max_s: float = 10.0,
        listen: bool = True,
    ) -> None:
        self.indexes = indexes
        self.url = libpq_url(database_url) if listen else None
        self.application_name = f"memosd-changes {instance_id}"[:63]
        self.poll_s = poll_s
        self.reconnect_max_s = reconnect_max_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None  # while listening
        self.connected = threading.Event()  # set while LISTENing
        self.caught_up = 0  # catch-ups that changed an index (for /healthz and tests)
        self.connects = 0  # successful LISTENs: 1, plus one per reconnect

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="memos-changes", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._close()

    def status(self) -> dict[str, object]:
        return {
            "listening": self.connected.is_set(),
            "poll_s": self.poll_s,
            "caught_up": self.caught_up,
            "connects": self.connects,
        }

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.1
        next_connect = 0.0
        next_poll = time.monotonic() + self.poll_s
        while not self._stop.is_set():
            pending: dict[str, int] = {}
            if self.url is not None and self._conn is None and time.monotonic() >= next_connect:
                if self._connect():
                    backoff = 0.1
                    next_poll = 0.0  # notices were missed while down (or before the start)
                else:
                    next_connect = time.monotonic() + backoff
                    backoff = min(backoff * 2, self.reconnect_max_s)
            wait = max(0.0, min(next_poll - time.monotonic(), _WAIT_MAX_S))
            if self._conn is not None:
                try:
                    self._receive(wait, pending)
                except Exception as exc:  # the connection went away: reconnect, then poll
                    log.warning("change feed lost its connection", extra={"fields": {
                        "error": str(exc)[:200]}})  # fmt: skip
                    self._close()
                    next_connect = time.monotonic() + backoff
            else:
                self._stop.wait(wait)
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + self.poll_s
                try:
                    for cube_id in self.indexes.lagging():
                        pending.setdefault(cube_id, 0)
                except Exception:  # the database is away: the next poll tries again
                    log.warning("change feed poll failed", exc_info=True)
            self._catch_up(pending)

    def _receive(self, wait: float, pending: dict[str, int]) -> None:
        """Wait up to `wait` seconds for a notice, then take every one already queued."""
        assert self._conn is not None
        first = list(self._conn.notifies(timeout=wait, stop_after=1))
        rest = list(self._conn.notifies(timeout=0.0)) if first else []
        for notify in first + rest:
            notice = parse_notice(notify.payload)
            if notice is None:
                continue
            if notice.generation > pending.get(notice.cube_id, -1):
                pending[notice.cube_id] = notice.generation

    def _catch_up(self, pending: dict[str, int]) -> None:
        for cube_id, generation in pending.items():
            # Generation 0: from the poll, which already saw the cube lag.
            if generation and not self.indexes.behind(cube_id, generation):
                continue  # not loaded here, or already there (this daemon's own write)
            try:
                report = self.indexes.catch_up(cube_id)
            except Exception:  # the database is away, or a broken row: the poll retries
                log.warning("index catch-up failed", exc_info=True,
                            extra={"fields": {"cube_id": cube_id}})  # fmt: skip
                continue
            if report.action not in ("current", "not_loaded"):
                self.caught_up += 1
                log.debug("index caught up", extra={"fields": report.__dict__})

    # -- the connection ---------------------------------------------------------------------

    def _connect(self) -> bool:
        import psycopg  # the `postgres` extra: only a PostgreSQL daemon gets here

        assert self.url is not None
        try:
            conn = psycopg.connect(
                self.url,
                autocommit=True,
                application_name=self.application_name,
                connect_timeout=5,
            )
            conn.execute(f"LISTEN {CHANGES_CHANNEL}")
        except Exception as exc:
            log.warning("change feed cannot listen", extra={"fields": {"error": str(exc)[:200]}})
            return False
        self._conn = conn
        self.connected.set()
        self.connects += 1
        log.info("change feed listening", extra={"fields": {"connects": self.connects}})
        return True

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        self.connected.clear()
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken
                conn.close()
