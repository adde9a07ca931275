"""What the model reads: an activation's context and a question after it, as token ids.

A context is text, memories (one dated line each, in the given order) or sessions (each one's
memories in stored order, the sessions in the order given), held as the system turn of the
model's chat template so a question can follow it as a user turn. A question is rendered by
`kv_runtime.template` after the activation's real history, exactly as the template renders the
whole conversation.

Everything is size-checked before it is tokenized (tokenizing is the expensive part, about a
second a MiB): the text's bytes against `max_text_bytes`, the number of memories against
`max_source_memories`, and for memories and sessions the bytes stored in the database before
any content is loaded, then the rendered text's bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, LargeBinary, cast, func, select

import kv_runtime
from kv_runtime import Runtime
from memcube.errors import InvalidArgument, NotFound, TooLarge
from memos.db.engine import Database
from memos.db.models import Memory

LINE_OVERHEAD = len("[2023-05-08 13:56] ")  # each rendered memory line has at least this


@dataclass(frozen=True)
class ActivationSource:
    """Exactly one of the four is set (the API checks it)."""

    text: str | None = None
    memory_ids: tuple[str, ...] | None = None
    session_id: str | None = None
    session_ids: tuple[str, ...] | None = None


@dataclass(frozen=True)
class PromptLimits:
    max_text_bytes: int
    max_source_memories: int
    max_prompt_bytes: int


@dataclass(frozen=True)
class Context:
    """An activation's context: its chat messages, their tokens, and what it was built from."""

    messages: tuple[Mapping[str, str], ...]
    token_ids: tuple[int, ...]
    described: dict[str, Any]


def render_memories(rows: Sequence[Memory]) -> str:
    """One line per memory: `[2023-05-08 13:56] Caroline: content`."""
    lines = []
    for row in rows:
        who = f"{row.speaker}: " if row.speaker else ""
        lines.append(f"[{row.timestamp:%Y-%m-%d %H:%M}] {who}{row.content}")
    return "\n".join(lines)


class Prompts:
    def __init__(self, db: Database, limits: PromptLimits) -> None:
        self.db = db
        self.limits = limits

    def source_text(self, cube_id: str, source: ActivationSource) -> tuple[str, dict[str, Any]]:
        """(the source's text, what it was built from), size-checked; nothing tokenized yet."""
        if source.text is not None:
            text, described = source.text, {"text_chars": len(source.text)}
        else:
            rows, described = self.source_rows(cube_id, source)
            text = render_memories(rows)
        self.check_text(text)
        return text, described

    def source_rows(
        self, cube_id: str, source: ActivationSource
    ) -> tuple[list[Memory], dict[str, Any]]:
        """The memories of a memories or sessions source, in order, and what they are; their
        count and stored bytes checked before any content is loaded."""
        assert source.text is None, "a text source has no memories"
        if source.memory_ids is not None:
            return self._memories(cube_id, source.memory_ids)
        if source.session_ids is not None:
            return self._sessions(cube_id, source.session_ids), {
                "session_ids": list(source.session_ids)
            }
        assert source.session_id is not None, "the API checks one source is given"
        return self._sessions(cube_id, (source.session_id,)), {"session_id": source.session_id}

    def context(
        self, runtime: Runtime, text: str, described: dict[str, Any], limit: int | None = None
    ) -> Context:
        """Checked text (`source_text`) as a system turn, tokenized; at most `limit` tokens
        (default: fewer than the model's positions)."""
        messages = ({"role": "system", "content": text},)
        token_ids = runtime.template.render(messages, add_generation_prompt=False)
        if limit is None and len(token_ids) >= runtime.info.max_positions:
            raise TooLarge(
                f"the context is {len(token_ids)} tokens; the model takes "
                f"< {runtime.info.max_positions}"
            )
        if limit is not None and len(token_ids) > limit:
            raise TooLarge(f"the context is {len(token_ids)} tokens; at most {limit}")
        return Context(messages, tuple(token_ids), described)

    def check_prompt(self, prompt: str) -> None:
        size = len(prompt.encode("utf-8"))
        if size > self.limits.max_prompt_bytes:
            raise TooLarge(f"prompt is {size} bytes; at most {self.limits.max_prompt_bytes}")
        if not prompt.strip():
            raise InvalidArgument("prompt is empty")

    def question(
        self, runtime: Runtime, history: Sequence[Mapping[str, str]], prompt: str
    ) -> list[int]:
        """The user turn `prompt` and the assistant's opening, as they follow `history`."""
        self.check_prompt(prompt)
        turn = [{"role": "user", "content": prompt}]
        try:
            return runtime.template.render_delta(history, turn)
        except kv_runtime.InvalidArgument as exc:
            raise InvalidArgument(exc.message) from exc

    # -- sources ----------------------------------------------------------------------------

    def check_text(self, text: str) -> None:
        size = len(text.encode("utf-8"))
        if size > self.limits.max_text_bytes:
            raise TooLarge(
                f"the context's text is {size} bytes; at most {self.limits.max_text_bytes}"
            )
        if not text.strip():
            raise InvalidArgument("text is empty")

    def _check_count(self, count: int, what: str) -> None:
        if count > self.limits.max_source_memories:
            raise TooLarge(
                f"{what} has {count} memories; an activation takes at most "
                f"{self.limits.max_source_memories}"
            )

    def _check_stored_bytes(self, stored: int, count: int, what: str) -> None:
        """A lower bound of the rendered size, from the database, before loading contents."""
        least = stored + LINE_OVERHEAD * count
        if least > self.limits.max_text_bytes:
            raise TooLarge(
                f"{what} renders to at least {least} bytes; at most {self.limits.max_text_bytes}"
            )

    def _content_bytes(self) -> ColumnElement[Any]:
        if self.db.dialect == "sqlite":
            return func.length(cast(Memory.content, LargeBinary))
        return func.octet_length(Memory.content)

    def _memories(
        self, cube_id: str, memory_ids: tuple[str, ...]
    ) -> tuple[list[Memory], dict[str, Any]]:
        live = (Memory.cube_id == cube_id, Memory.deleted_at.is_(None))
        size = func.coalesce(func.sum(self._content_bytes()), 0)
        ids = list(memory_ids)
        if not ids:
            raise InvalidArgument("memory_ids is empty")
        self._check_count(len(ids), "memory_ids")
        with self.db.read() as s:
            found_ids = set(s.scalars(select(Memory.id).where(*live, Memory.id.in_(ids))))
            missing = [i for i in ids if i not in found_ids]
            if missing:
                raise NotFound(f"memory {missing[0]!r} not found", code="memory_not_found")
            stored = s.scalar(select(size).where(*live, Memory.id.in_(ids))) or 0
            # Over distinct ids: a memory named twice renders twice, so still a lower bound.
            self._check_stored_bytes(int(stored), len(found_ids), "memory_ids")
            rows = {r.id: r for r in s.scalars(select(Memory).where(*live, Memory.id.in_(ids)))}
        return [rows[i] for i in ids], {"memory_ids": ids}

    def _sessions(self, cube_id: str, session_ids: tuple[str, ...]) -> list[Memory]:
        """The sessions' memories: each session's in stored order, sessions as given."""
        if not session_ids:
            raise InvalidArgument("session_ids is empty")
        if len(set(session_ids)) != len(session_ids):
            raise InvalidArgument("session_ids names a session twice")
        live = (Memory.cube_id == cube_id, Memory.deleted_at.is_(None))
        size = func.coalesce(func.sum(self._content_bytes()), 0)
        named = Memory.session_id.in_(session_ids)
        with self.db.read() as s:
            counts = dict(
                s.execute(
                    select(Memory.session_id, func.count(Memory.seq))
                    .where(*live, named)
                    .group_by(Memory.session_id)
                ).all()
            )
            empty = next((sid for sid in session_ids if not counts.get(sid)), None)
            if empty is not None:
                raise NotFound(
                    f"session {empty!r} has no memories in this cube", code="session_not_found"
                )
            count = sum(int(n) for n in counts.values())
            what = f"session {session_ids[0]!r}" if len(session_ids) == 1 else "session_ids"
            self._check_count(count, what)
            stored = s.scalar(select(size).where(*live, named)) or 0
            self._check_stored_bytes(int(stored), count, what)
            rows = list(s.scalars(select(Memory).where(*live, named).order_by(Memory.seq)))
        order = {sid: i for i, sid in enumerate(session_ids)}
        return sorted(rows, key=lambda r: order[r.session_id or ""])  # stable: seq order within
