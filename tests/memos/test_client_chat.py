"""`ChatSession` (sync and async) against a real `memos serve` process with the real model.

Replies are kept to a few tokens: the model is slow on CPU and the tests are about the SDK.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from memos.client import (
    AsyncMemosClient,
    Chat,
    ChatBusy,
    ChatMessage,
    ChatReply,
    Citation,
    Conflict,
    Cube,
    MemosClient,
    MemosError,
    NotFound,
    ServerError,
    error_from_response,
)
from memos.client_chat import AsyncChatSession, AsyncChatStream, ChatSession, ChatStream

SYSTEM = "You are a friendly assistant. Answer in one short sentence."
SLOW_REQUEST_S = 300  # the first turn may load the model in the shared daemon


@pytest.fixture
def key(daemon: Any) -> str:
    with MemosClient(daemon.url, api_key=daemon.admin_key) as admin:
        api_key = admin.create_user(f"chat-{uuid.uuid4().hex[:8]}").api_key
    assert api_key is not None
    return api_key


@pytest.fixture
def client(daemon: Any, key: str) -> Iterator[MemosClient]:
    with MemosClient(daemon.url, api_key=key, timeout=SLOW_REQUEST_S) as c:
        yield c


@pytest.fixture
async def aclient(daemon: Any, key: str) -> AsyncIterator[AsyncMemosClient]:
    async with AsyncMemosClient(daemon.url, api_key=key, timeout=SLOW_REQUEST_S) as c:
        yield c


@pytest.fixture
def cube(client: MemosClient) -> Cube:
    return client.create_cube("chats")


NOTES = [
    {"content": "Melanie paints sunrises over the lake every weekend.", "speaker": "Melanie"},
    {"content": "Caroline volunteers at the support group on Tuesdays.", "speaker": "Caroline"},
]


def test_a_chat_session_sends_streams_reads_back_resumes_and_deletes(
    client: MemosClient, cube: Cube
) -> None:
    painted, volunteers = client.add_memories(cube.id, NOTES)
    chat = client.chat(
        cube.id, system=SYSTEM, recall_top_k=2, max_context_tokens=512, temperature=0.0, seed=7
    )
    assert isinstance(chat, ChatSession) and isinstance(chat.info, Chat)
    assert chat.session_id == chat.id and chat.info.turns == 0 and chat.info.system == SYSTEM
    assert chat.info.recall is not None and chat.info.recall.top_k == 2
    assert chat.info.sampling is not None and chat.info.sampling.seed == 7
    assert chat.info.max_context_tokens == 512 and chat.info.backend == "local"

    first = chat.send("What does Melanie paint?", max_tokens=4)
    assert isinstance(first, ChatReply) and first.reply
    assert first.finish_reason in {"stop", "length"} and first.reused_tokens == 0
    assert first.user_memory_id and first.assistant_memory_id and first.ttft_ms > 0
    assert all(isinstance(c, Citation) and 0 <= c.score <= 1 for c in first.recalled)
    assert painted.id in [c.memory_id for c in first.recalled]

    stream = chat.stream("And when does Caroline volunteer?", max_tokens=4)
    assert isinstance(stream, ChatStream) and stream.reply is None  # nothing sent yet
    pieces = list(stream)
    assert pieces and all(isinstance(p, str) for p in pieces)
    second = stream.reply
    assert second is not None and "".join(pieces) == stream.text == second.reply
    assert second.prompt_tokens > second.reused_tokens > 0  # the first turn was not prefilled

    history = chat.history()
    assert all(isinstance(m, ChatMessage) for m in history)
    assert [(m.role, m.content) for m in history] == [
        ("user", "What does Melanie paint?"),
        ("assistant", first.reply),
        ("user", "And when does Caroline volunteer?"),
        ("assistant", second.reply),
    ]
    assert [m.memory_id for m in history[:2]] == [first.user_memory_id, first.assistant_memory_id]

    resumed = client.chat(cube.id, chat_id=chat.id)
    assert resumed.id == chat.id and resumed.info.turns == 4 and resumed.info.system == SYSTEM
    assert chat.refresh().turns == 4
    assert [c.id for c in client.list_chats(cube.id)] == [chat.id]
    assert client.get_chat(cube.id, chat.id).last_active_at == chat.info.last_active_at
    with pytest.raises(TypeError, match="system"):
        client.chat(cube.id, chat_id=chat.id, system="another")
    with pytest.raises(NotFound):
        client.chat(cube.id, chat_id="chat_nope")

    chat.delete(purge=True)
    with pytest.raises(NotFound):
        resumed.refresh()
    assert client.list_chats(cube.id) == []
    assert [m.id for m in client.iter_memories(cube.id)] == [
        painted.id,
        volunteers.id,
    ]  # turns purged


def test_a_chat_on_an_existing_session_reads_every_page_of_its_history(
    client: MemosClient, cube: Cube
) -> None:
    said = [{"content": f"line {i}", "session_id": "s1", "speaker": "Bob"} for i in range(503)]
    client.add_memories(cube.id, said)
    chat = client.chat(cube.id, session_id="s1")
    assert chat.info.turns == 503
    history = chat.history()  # 500 a page: two pages
    assert [m.content for m in history] == [f"line {i}" for i in range(503)]
    assert {m.speaker for m in history} == {"Bob"}
    chat.delete()  # the memories stay
    assert len(list(client.iter_memories(cube.id, session_id="s1"))) == 503


def test_a_second_message_while_a_turn_runs_is_chat_busy_and_a_dropped_stream_stores_nothing(
    client: MemosClient, cube: Cube
) -> None:
    chat = client.chat(cube.id, system=SYSTEM, recall_top_k=0)
    with chat.stream("Count from one to one hundred in words.", max_tokens=200) as running:
        next(running)  # the turn is decoding
        with pytest.raises(ChatBusy) as busy:
            chat.send("hello?", max_tokens=4)
        assert isinstance(busy.value, Conflict) and busy.value.code == "chat_busy"
        with pytest.raises(ChatBusy):
            chat.delete()
    # Leaving the block dropped the connection: the server cancels the turn and frees the chat.
    deadline = time.monotonic() + 120
    while True:
        try:
            assert chat.history() == []  # a turn that did not finish stores neither side
            chat.delete()
            break
        except ChatBusy:
            assert time.monotonic() < deadline, "the cancelled turn never freed the chat"
            time.sleep(0.2)


def test_chat_busy_is_typed() -> None:
    body = {"error": {"code": "chat_busy", "message": "chat 'c' is answering another message"}}
    err = error_from_response(httpx.Response(409, json=body))
    assert type(err) is ChatBusy and (err.status, err.code) == (409, "chat_busy")
    other = error_from_response(httpx.Response(409, json={"error": {"code": "x", "message": "y"}}))
    assert type(other) is Conflict


def test_a_stream_that_ends_without_done_or_with_an_error_event_raises() -> None:
    cut = ChatStream(iter([("piece", {"text": "Hel"}), ("piece", {"text": "lo"})]))
    assert next(cut) == "Hel" and next(cut) == "lo"
    with pytest.raises(MemosError, match="without its `done` event"):
        next(cut)
    failed = ChatStream(iter([("piece", {"text": "a"}), ("error", _error("model_error"))]))
    with pytest.raises(ServerError) as raised:
        failed.until_done()
    assert raised.value.code == "model_error" and failed.reply is None and failed.text == "a"


def _error(code: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": "decoding failed"}}


async def test_async_chat_session(aclient: AsyncMemosClient, client: MemosClient) -> None:
    cube = await aclient.create_cube("async chats")
    painted, _volunteers = await aclient.add_memories(cube.id, NOTES)
    chat = await aclient.chat(cube.id, system=SYSTEM, recall_top_k=1)
    assert isinstance(chat, AsyncChatSession) and chat.info.turns == 0

    first = await chat.send("What does Melanie paint?", max_tokens=4, speaker="Caroline")
    assert [c.memory_id for c in first.recalled] == [painted.id]
    stream = chat.stream("Thanks!", max_tokens=4)
    assert isinstance(stream, AsyncChatStream)
    pieces = [p async for p in stream]
    assert stream.reply is not None and "".join(pieces) == stream.reply.reply
    assert stream.reply.reused_tokens > 0

    history = await chat.history()
    assert [(m.role, m.speaker) for m in history] == [
        ("user", "Caroline"), ("assistant", "assistant"),
        ("user", "user"), ("assistant", "assistant"),
    ]  # fmt: skip
    resumed = await aclient.chat(cube.id, chat_id=chat.id)
    assert (await resumed.refresh()).turns == 4
    assert [c.id for c in await aclient.list_chats(cube.id)] == [chat.id]
    assert client.chat(cube.id, chat_id=chat.id).info.turns == 4  # the sync client sees it too
    await chat.delete()
    with pytest.raises(NotFound):
        await aclient.get_chat(cube.id, chat.id)
    assert len(list(client.iter_memories(cube.id))) == 6  # without purge, the turns stay
