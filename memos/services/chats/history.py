"""A chat's conversation: the memories of its session, in the order they were stored.

A memory whose speaker is "assistant" is an assistant turn; every other memory is a user turn.
A user turn is shown to the model as its content, prefixed with the speaker's name when the
speaker is someone other than "user" (a chat opened on an imported session with two people in
it reads "Caroline: ..." and "Melanie: ...").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select

from memos.db.engine import Database
from memos.db.models import Memory
from memos.services.ids import decode_cursor, encode_cursor
from memos.services.views import ChatMessageView, Page

ASSISTANT = "assistant"
USER = "user"

Message = dict[str, str]


@dataclass(frozen=True)
class Turn:
    memory_id: str
    seq: int
    speaker: str | None
    content: str
    timestamp: datetime

    @property
    def role(self) -> str:
        return ASSISTANT if self.speaker == ASSISTANT else USER

    def message(self) -> Message:
        """The turn as the model reads it."""
        if self.role == USER and self.speaker and self.speaker != USER:
            return {"role": USER, "content": f"{self.speaker}: {self.content}"}
        return {"role": self.role, "content": self.content}


def _turn(row: Memory) -> Turn:
    return Turn(row.id, row.seq, row.speaker, row.content, row.timestamp)


class ChatHistory:
    def __init__(self, db: Database) -> None:
        self.db = db

    def recent(self, cube_id: str, session_id: str, from_seq: int, limit: int) -> list[Turn]:
        """At most the `limit` newest live turns at or after `from_seq`, oldest first."""
        with self.db.read() as s:
            rows = s.scalars(
                select(Memory)
                .where(
                    Memory.cube_id == cube_id,
                    Memory.session_id == session_id,
                    Memory.seq >= from_seq,
                    Memory.deleted_at.is_(None),
                )
                .order_by(Memory.seq.desc())
                .limit(limit)
            ).all()
            return [_turn(row) for row in reversed(rows)]

    def before(self, cube_id: str, session_id: str, until_seq: int, limit: int) -> list[Turn]:
        """At most the `limit` newest live turns before `until_seq` (the part of a long chat
        that left its window), oldest first."""
        with self.db.read() as s:
            rows = s.scalars(
                select(Memory)
                .where(
                    Memory.cube_id == cube_id,
                    Memory.session_id == session_id,
                    Memory.seq < until_seq,
                    Memory.deleted_at.is_(None),
                )
                .order_by(Memory.seq.desc())
                .limit(limit)
            ).all()
            return [_turn(row) for row in reversed(rows)]

    def count_before(self, cube_id: str, session_id: str, until_seq: int) -> int:
        with self.db.read() as s:
            count = s.scalar(
                select(func.count()).where(
                    Memory.cube_id == cube_id,
                    Memory.session_id == session_id,
                    Memory.seq < until_seq,
                    Memory.deleted_at.is_(None),
                )
            )
        return int(count or 0)

    def page(
        self, cube_id: str, session_id: str, limit: int, cursor: str | None
    ) -> Page[ChatMessageView]:
        """Oldest first."""
        after = decode_cursor(cursor)
        query = select(Memory).where(
            Memory.cube_id == cube_id,
            Memory.session_id == session_id,
            Memory.deleted_at.is_(None),
        )
        if after is not None:
            query = query.where(Memory.seq > after)
        with self.db.read() as s:
            rows = list(s.scalars(query.order_by(Memory.seq).limit(limit + 1)))
        more = len(rows) > limit
        rows = rows[:limit]
        items = [
            ChatMessageView(row.id, _turn(row).role, row.speaker, row.content, row.timestamp)
            for row in rows
        ]
        return Page(items=items, next_cursor=encode_cursor(rows[-1].seq) if more else None)
