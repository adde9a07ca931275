"""Usage signals: how often and when notes are recalled and activations loaded.

A search must stay a read: counting its hits with an UPDATE would turn every search into a
write transaction (on SQLite, one writer at a time). So hits are counted here, in memory, and
written in one short transaction per batch by `flush` (the `usage_flush` job, and the daemon's
stop). A crash loses at most the counts since the last flush: usage is a signal for ranking,
not an acknowledged write. Activation uses and `last_used_at` are written with the generation
that used them (`Catalogue.touch`, a write the generation already did); their loads, which
happen on the request path before a generation even starts, are counted here too.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Update, case, literal, update

from memos.db.engine import Database
from memos.db.locking import lock_activations, lock_memories
from memos.db.models import Activation, Memory
from memos.db.types import UTCDateTime, utcnow

BATCH = 500  # ids per UPDATE statement


@dataclass(frozen=True)
class FlushReport:
    memories: int  # notes whose recall counts were written
    recalls: int  # recalls written in all
    activations: int  # activations whose load counts were written
    loads: int


class UsageCounter:
    """Thread-safe pending counts; `flush` writes and clears them."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._lock = threading.Lock()
        self._recalls: dict[str, tuple[int, datetime]] = {}  # memory id -> (count, last)
        self._loads: dict[str, int] = {}  # activation id -> count

    def recalled(self, memory_ids: Iterable[str], when: datetime | None = None) -> None:
        """These notes were among a search's top k or recalled into a chat."""
        when = when or utcnow()
        with self._lock:
            for memory_id in memory_ids:
                count, _ = self._recalls.get(memory_id, (0, when))
                self._recalls[memory_id] = (count + 1, when)

    def loaded(self, activation_id: str) -> None:
        """The activation's files were read from disk (a miss of the loaded cache)."""
        with self._lock:
            self._loads[activation_id] = self._loads.get(activation_id, 0) + 1

    def pending(self) -> tuple[dict[str, int], dict[str, int]]:
        """(recalls by memory id, loads by activation id) not yet written."""
        with self._lock:
            return {k: v[0] for k, v in self._recalls.items()}, dict(self._loads)

    def flush(self) -> FlushReport:
        """Write the pending counts, a batch of ids per statement, in one transaction; on a
        failure they are put back to be written next time."""
        with self._lock:
            recalls, self._recalls = self._recalls, {}
            loads, self._loads = self._loads, {}
        try:
            if recalls or loads:
                with self.db.write() as s:
                    # Every row locked first, in one order (memos/db/locking.py): the notes
                    # may be enriched or claimed by other daemons meanwhile.
                    if recalls:
                        lock_memories(s, Memory.id.in_(sorted(recalls)))
                    if loads:
                        lock_activations(s, Activation.id.in_(sorted(loads)))
                    for chunk in _chunks(sorted(recalls)):
                        s.execute(_recall_update(chunk, recalls))
                    for chunk in _chunks(sorted(loads)):
                        s.execute(_load_update(chunk, loads))
        except BaseException:
            self._restore(recalls, loads)
            raise
        return FlushReport(
            memories=len(recalls),
            recalls=sum(count for count, _ in recalls.values()),
            activations=len(loads),
            loads=sum(loads.values()),
        )

    def _restore(self, recalls: dict[str, tuple[int, datetime]], loads: dict[str, int]) -> None:
        with self._lock:
            for memory_id, (count, when) in recalls.items():
                now, last = self._recalls.get(memory_id, (0, when))
                self._recalls[memory_id] = (count + now, max(when, last))
            for activation_id, count in loads.items():
                self._loads[activation_id] = self._loads.get(activation_id, 0) + count


def _chunks(ids: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(ids), BATCH):
        yield ids[start : start + BATCH]


def _recall_update(ids: list[str], recalls: dict[str, tuple[int, datetime]]) -> Update:
    """One UPDATE for a batch: recalls += n and last_recalled_at = the latest, per id (ids
    erased meanwhile match no row and are dropped)."""
    added = case({i: recalls[i][0] for i in ids}, value=Memory.id)
    last = case({i: literal(recalls[i][1], UTCDateTime) for i in ids}, value=Memory.id)
    return (
        update(Memory)
        .where(Memory.id.in_(ids))
        .values(recalls=Memory.recalls + added, last_recalled_at=last)
        .execution_options(synchronize_session=False)
    )


def _load_update(ids: list[str], loads: dict[str, int]) -> Update:
    added = case({i: loads[i] for i in ids}, value=Activation.id)
    return (
        update(Activation)
        .where(Activation.id.in_(ids))
        .values(loads=Activation.loads + added)
        .execution_options(synchronize_session=False)
    )
