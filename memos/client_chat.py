"""Chat sessions in the SDK: `client.chat(cube_id, ...)` returns one, sync or async.

A `ChatSession` is a handle on one chat of a cube (the REST chat resource): `send` answers a
turn, `stream` yields the reply's text as it is decoded, `history` reads every turn back, and
`delete` ends it. It holds no state beyond the chat's id and the `Chat` last read, so a chat is
resumed from any process with `client.chat(cube_id, chat_id=ID)`.

    with MemosClient(url, api_key=key) as client:
        chat = client.chat(cube_id, system="Answer briefly.", recall_top_k=5)
        reply = chat.send("What does Melanie paint?")
        print(reply.reply, [c.memory_id for c in reply.recalled])
        stream = chat.stream("And when?")
        for piece in stream:
            print(piece, end="")
        print(stream.reply.reused_tokens)

One turn at a time per chat: a second message while one runs raises `ChatBusy`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from datetime import datetime
from typing import Any

from memos.client import (
    MAX_PAGE_SIZE,
    AsyncMemosClient,
    Chat,
    ChatMessage,
    ChatReply,
    MemosClient,
    MemosError,
    _chat_message,
    _path,
    _piece_or_result,
)


def _stream_request(
    chat: Chat,
    text: str,
    speaker: str | None,
    timestamp: datetime | str | None,
    max_tokens: int | None,
) -> tuple[str, dict[str, Any]]:
    path = _path("cubes", chat.cube_id, "chats", chat.id, "messages")
    return path, {**_chat_message(text, speaker, timestamp, max_tokens), "stream": True}


def _reply_or_piece(event: str, data: Any) -> str | ChatReply:
    return _piece_or_result(event, data, ChatReply.model_validate)


def _unfinished() -> MemosError:
    return MemosError("the reply stream ended without its `done` event", code="invalid_response")


class ChatStream:
    """The reply to one turn, streamed: iterate it for the text pieces as they are decoded;
    once it is exhausted, `reply` is the `ChatReply` (the same body `send` returns).

    The request goes out on the first iteration, so errors (`ChatBusy`, `TooManyRequests`...)
    are raised there. Leaving early (`close()`, or a `with` block) drops the connection: the
    server cancels the turn and stores neither side of it.
    """

    def __init__(self, events: Iterator[tuple[str, Any]]) -> None:
        self.reply: ChatReply | None = None
        self.text = ""  # the pieces so far
        self._events = events
        self._pieces = self._read()

    def _read(self) -> Generator[str]:
        try:
            for event, data in self._events:
                item = _reply_or_piece(event, data)
                if isinstance(item, ChatReply):
                    self.reply = item
                    return
                self.text += item
                yield item
            raise _unfinished()
        finally:
            close = getattr(self._events, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def until_done(self) -> ChatReply:
        """Read what is left and return the reply."""
        for _ in self._pieces:
            pass
        if self.reply is None:
            raise _unfinished()
        return self.reply

    def close(self) -> None:
        self._pieces.close()

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncChatStream:
    """`ChatStream` for `AsyncChatSession`: `async for piece in stream`, then `stream.reply`."""

    def __init__(self, events: AsyncIterator[tuple[str, Any]]) -> None:
        self.reply: ChatReply | None = None
        self.text = ""
        self._events = events
        self._pieces = self._read()

    async def _read(self) -> AsyncGenerator[str]:
        try:
            async for event, data in self._events:
                item = _reply_or_piece(event, data)
                if isinstance(item, ChatReply):
                    self.reply = item
                    return
                self.text += item
                yield item
            raise _unfinished()
        finally:
            close = getattr(self._events, "aclose", None)
            if close is not None:
                await close()

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        return await anext(self._pieces)

    async def until_done(self) -> ChatReply:
        async for _ in self._pieces:
            pass
        if self.reply is None:
            raise _unfinished()
        return self.reply

    async def aclose(self) -> None:
        await self._pieces.aclose()

    async def __aenter__(self) -> AsyncChatStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class ChatSession:
    """One chat of a cube, through a `MemosClient` (see the module's docstring).

    `info` is the `Chat` as last read (`refresh()` reads it again); `id`, `cube_id` and
    `session_id` never change. Each method is one request, or one per page for `history`.
    """

    def __init__(self, client: MemosClient, info: Chat) -> None:
        self.client = client
        self.info = info

    def __repr__(self) -> str:
        return f"ChatSession({self.cube_id!r}, chat_id={self.id!r})"

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def cube_id(self) -> str:
        return self.info.cube_id

    @property
    def session_id(self) -> str:
        return self.info.session_id

    def send(
        self,
        text: str,
        max_tokens: int | None = None,
        speaker: str | None = None,
        timestamp: datetime | str | None = None,
    ) -> ChatReply:
        """One turn: the reply, the notes recalled into it, and the ids of both stored turns.

        `speaker` names who says `text` (default "user"), `timestamp` when (default now).
        """
        return self.client.send_chat_message(
            self.cube_id, self.id, text, speaker, timestamp, max_tokens
        )

    def stream(
        self,
        text: str,
        max_tokens: int | None = None,
        speaker: str | None = None,
        timestamp: datetime | str | None = None,
    ) -> ChatStream:
        """`send`, streamed: iterate the result for text pieces, then read its `reply`."""
        path, body = _stream_request(self.info, text, speaker, timestamp, max_tokens)
        return ChatStream(self.client._events(path, body))

    def history(self) -> list[ChatMessage]:
        """Every turn of the chat, oldest first (all pages)."""
        messages: list[ChatMessage] = []
        cursor: str | None = None
        while True:
            page = self.client.list_chat_messages(self.cube_id, self.id, MAX_PAGE_SIZE, cursor)
            messages += page.items
            if (cursor := self.client._next_cursor(page, cursor)) is None:
                return messages

    def refresh(self) -> Chat:
        """Read the chat again (its `turns`, `last_active_at`)."""
        self.info = self.client.get_chat(self.cube_id, self.id)
        return self.info

    def delete(self, purge: bool = False) -> None:
        """Delete the chat; its turns stay as memories unless `purge=True`."""
        self.client.delete_chat(self.cube_id, self.id, purge)


class AsyncChatSession:
    """`ChatSession` through an `AsyncMemosClient`: the same methods, awaited; `stream`
    returns an `AsyncChatStream` to iterate with `async for` (it is not awaited itself)."""

    def __init__(self, client: AsyncMemosClient, info: Chat) -> None:
        self.client = client
        self.info = info

    def __repr__(self) -> str:
        return f"AsyncChatSession({self.cube_id!r}, chat_id={self.id!r})"

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def cube_id(self) -> str:
        return self.info.cube_id

    @property
    def session_id(self) -> str:
        return self.info.session_id

    async def send(
        self,
        text: str,
        max_tokens: int | None = None,
        speaker: str | None = None,
        timestamp: datetime | str | None = None,
    ) -> ChatReply:
        return await self.client.send_chat_message(
            self.cube_id, self.id, text, speaker, timestamp, max_tokens
        )

    def stream(
        self,
        text: str,
        max_tokens: int | None = None,
        speaker: str | None = None,
        timestamp: datetime | str | None = None,
    ) -> AsyncChatStream:
        path, body = _stream_request(self.info, text, speaker, timestamp, max_tokens)
        return AsyncChatStream(self.client._events(path, body))

    async def history(self) -> list[ChatMessage]:
        messages: list[ChatMessage] = []
        cursor: str | None = None
        while True:
            page = await self.client.list_chat_messages(
                self.cube_id, self.id, MAX_PAGE_SIZE, cursor
            )
            messages += page.items
            if (cursor := self.client._next_cursor(page, cursor)) is None:
                return messages

    async def refresh(self) -> Chat:
        self.info = await self.client.get_chat(self.cube_id, self.id)
        return self.info

    async def delete(self, purge: bool = False) -> None:
        await self.client.delete_chat(self.cube_id, self.id, purge)
