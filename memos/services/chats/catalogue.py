"""Chat rows: how each chat is run (system prompt, recall, window, sampling) and its state.

A chat's turns are not here: they are memories of the chat's session (`history`), so search,
export and activations see them like any other memory. The row keeps what the turn loop needs
between turns: where the verbatim window starts and which activation holds the saved KV prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from memcube.errors import NotFound
from memos.db.engine import Database
from memos.db.models import Chat, Memory
from memos.db.types import utcnow
from memos.services.ids import decode_cursor, encode_cursor, new_id
from memos.services.views import ChatView, Page


def chat_not_found(chat_id: str) -> NotFound:
    return NotFound(f"chat {chat_id!r} not found", code="chat_not_found")


@dataclass(frozen=True)
class ChatSpec:
    """What a chat is created with (checked by the service)."""

    system: str | None
    recall: dict[str, Any]  # {"top_k": int, "filters": {...} as JSON}
    max_context_tokens: int
    sampling: dict[str, Any]  # {"temperature": float, "top_p": float, "seed": int | None}


@dataclass(frozen=True)
class ChatRecord:
    """A chat row as the turn loop reads it."""

    id: str
    cube_id: str
    session_id: str
    spec: ChatSpec
    window_from_seq: int
    prefix_activation_id: str | None


def _record(row: Chat) -> ChatRecord:
    spec = ChatSpec(row.system, dict(row.recall), row.max_context_tokens, dict(row.sampling))
    return ChatRecord(
        row.id, row.cube_id, row.session_id, spec, row.window_from_seq, row.prefix_activation_id
    )


def _turns(s: Session, cube_id: str, session_ids: list[str]) -> dict[str, int]:
    rows = s.execute(
        select(Memory.session_id, func.count())
        .where(
            Memory.cube_id == cube_id,
            Memory.session_id.in_(session_ids),
            Memory.deleted_at.is_(None),
        )
        .group_by(Memory.session_id)
    ).all()
    return {str(session_id): int(count) for session_id, count in rows}


def _views(s: Session, rows: list[Chat]) -> list[ChatView]:
    if not rows:
        return []
    turns = _turns(s, rows[0].cube_id, sorted({row.session_id for row in rows}))
    return [
        ChatView(
            id=row.id,
            cube_id=row.cube_id,
            session_id=row.session_id,
            system=row.system,
            recall=dict(row.recall),
            max_context_tokens=row.max_context_tokens,
            sampling=dict(row.sampling),
            turns=turns.get(row.session_id, 0),
            created_at=row.created_at,
            last_active_at=row.last_active_at,
        )
        for row in rows
    ]


class ChatCatalogue:
    """Every method is one short transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    def _row(s: Session, cube_id: str, chat_id: str) -> Chat:
        row = s.get(Chat, chat_id)
        if row is None or row.cube_id != cube_id:
            raise chat_not_found(chat_id)
        return row

    def create(self, cube_id: str, session_id: str | None, spec: ChatSpec) -> ChatView:
        chat_id = new_id("chat")
        now = utcnow()
        row = Chat(
            id=chat_id,
            cube_id=cube_id,
            session_id=session_id or chat_id,
            system=spec.system,
            recall=spec.recall,
            max_context_tokens=spec.max_context_tokens,
            sampling=spec.sampling,
            window_from_seq=0,
            created_at=now,
            last_active_at=now,
        )
        with self.db.write() as s:
            s.add(row)
            s.flush()
            (view,) = _views(s, [row])
        return view

    def record(self, cube_id: str, chat_id: str) -> ChatRecord:
        with self.db.read() as s:
            return _record(self._row(s, cube_id, chat_id))

    def view(self, cube_id: str, chat_id: str) -> ChatView:
        with self.db.read() as s:
            (view,) = _views(s, [self._row(s, cube_id, chat_id)])
            return view

    def page(self, cube_id: str, limit: int, cursor: str | None) -> Page[ChatView]:
        """Oldest first. The cursor is the position in that order (rows only ever go away,
        and new ones come last, so a page never skips one that existed when listing began)."""
        offset = decode_cursor(cursor) or 0
        with self.db.read() as s:
            rows = list(
                s.scalars(
                    select(Chat)
                    .where(Chat.cube_id == cube_id)
                    .order_by(Chat.created_at, Chat.id)
                    .offset(offset)
                    .limit(limit + 1)
                )
            )
            more = len(rows) > limit
            items = _views(s, rows[:limit])
        return Page(items=items, next_cursor=encode_cursor(offset + limit) if more else None)

    def delete(self, cube_id: str, chat_id: str) -> ChatRecord:
        """The row; its record, for what the caller removes next (memories, saved prefix)."""
        with self.db.write() as s:
            row = self._row(s, cube_id, chat_id)
            record = _record(row)
            s.delete(row)
        return record

    def touch(self, chat_id: str, when: datetime | None = None) -> None:
        self._update(chat_id, last_active_at=when or utcnow())

    def move_window(self, chat_id: str, from_seq: int) -> None:
        self._update(chat_id, window_from_seq=from_seq)

    def set_prefix(self, chat_id: str, activation_id: str | None) -> bool:
        """Point the chat at its newly saved prefix; False when the chat is gone."""
        return self._update(chat_id, prefix_activation_id=activation_id)

    def _update(self, chat_id: str, **values: Any) -> bool:
        with self.db.write() as s:
            result = s.execute(update(Chat).where(Chat.id == chat_id).values(**values))
        return bool(result.rowcount)  # type: ignore[attr-defined]
