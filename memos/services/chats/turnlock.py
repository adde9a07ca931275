"""A chat's turn lock, fleet-wide: a lease on its row (`chats.turn_holder`, `chats.turn_until`).

One turn at a time per chat, whichever daemon serves it. A turn takes its chat with one
conditional UPDATE: the chat is free, its lease has expired, or its holder is this daemon (the
service keeps an in-process lock on top, so this daemon never runs two turns of one chat; a
restarted daemon, the same instance, takes its earlier self's leases back at once). A renewer
thread extends the leases of the turns in flight every `renew_s`, so a turn may run longer than
`lease_s`; the turn's end clears the row. A daemon killed mid-turn stops renewing: after at most
`lease_s` any daemon may serve the chat again (the killed turn stored nothing, `turns.py`). A
turn confirms its lease just before it stores its two memories: one whose lease lapsed meanwhile
(the database was away longer than `lease_s`, and another daemon took the chat) stores nothing.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import or_, update

from memos.db.engine import Database
from memos.db.models import Chat
from memos.db.types import utcnow
from memos.services.chats.catalogue import chat_not_found

log = logging.getLogger("memos.chats")


class TurnLocks:
    """The chats this daemon (`holder`, its instance id) is running a turn of, in the database."""

    def __init__(self, db: Database, holder: str, lease_s: float, renew_s: float) -> None:
        assert renew_s < lease_s, "a lease must be renewed before it runs out"
        self.db, self.holder, self.lease_s, self.renew_s = db, holder, lease_s, renew_s
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self, chat_id: str) -> bool:
        """Hold the chat for a turn; False when another daemon's turn holds it. Raises 404 when
        the chat is gone."""
        now = utcnow()
        with self.db.write() as s:
            taken = s.execute(
                update(Chat)
                .where(
                    Chat.id == chat_id,
                    or_(
                        Chat.turn_holder.is_(None),
                        Chat.turn_until.is_(None),
                        Chat.turn_until <= now,
                        Chat.turn_holder == self.holder,
                    ),
                )
                .values(turn_holder=self.holder, turn_until=now + timedelta(seconds=self.lease_s))
            )
            if not taken.rowcount:  # type: ignore[attr-defined]
                if s.get(Chat, chat_id) is None:
                    raise chat_not_found(chat_id)
                return False
        with self._lock:
            self._held.add(chat_id)
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._renew_loop, name="memos-chat-turns", daemon=True
                )
                self._thread.start()
        return True

    def give(self, chat_id: str) -> None:
        """End this daemon's lease on the chat. Never raises: a lease not cleared (the database
        is away) simply expires."""
        with self._lock:
            self._held.discard(chat_id)
        try:
            with self.db.write() as s:
                s.execute(
                    update(Chat)
                    .where(Chat.id == chat_id, Chat.turn_holder == self.holder)
                    .values(turn_holder=None, turn_until=None)
                )
        except Exception:
            log.warning("could not release a chat's turn lease; it expires on its own",
                        exc_info=True, extra={"fields": {"chat_id": chat_id}})  # fmt: skip

    def confirm(self, chat_id: str) -> bool:
        """Extend the chat's lease if this daemon still holds it; False when it lapsed and
        another daemon took the chat over (the turn must then store nothing)."""
        now = utcnow()
        with self.db.write() as s:
            result = s.execute(
                update(Chat)
                .where(Chat.id == chat_id, Chat.turn_holder == self.holder)
                .values(turn_until=now + timedelta(seconds=self.lease_s))
            )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    def renew(self) -> int:
        """Extend the leases of the turns in flight; how many rows were still ours."""
        chat_ids = self.held()
        if not chat_ids:
            return 0
        now = utcnow()
        with self.db.write() as s:
            result = s.execute(
                update(Chat)
                .where(Chat.id.in_(chat_ids), Chat.turn_holder == self.holder)
                .values(turn_until=now + timedelta(seconds=self.lease_s))
            )
        renewed = int(result.rowcount)  # type: ignore[attr-defined]
        if renewed < len(chat_ids):  # deleted meanwhile, or lost while the database was away
            lost = len(chat_ids) - renewed
            log.warning("chat turn leases lost", extra={"fields": {"lost": lost}})
        return renewed

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                self.renew()
            except Exception:  # the database is away: the next round tries again
                log.warning("renewing chat turn leases failed", exc_info=True)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout=10)
