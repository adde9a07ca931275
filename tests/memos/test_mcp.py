"""`memos mcp` over stdio, driven by the `mcp` package's own client, against a real daemon.

The MCP server is a real `python -m memos mcp` process; it talks to the shared `memos serve`
process over REST with the key it was given. Results are checked through the SDK.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters

from memos.client import Cube, MemosClient, User

ROOT = Path(__file__).resolve().parents[2]
PAINTS = "Melanie paints sunrises over the lake every weekend."
VOLUNTEERS = "Caroline volunteers at the support group on Tuesdays."


@pytest.fixture
def user(daemon: Any) -> User:
    with MemosClient(daemon.url, api_key=daemon.admin_key) as admin:
        return admin.create_user(f"mcp-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def client(daemon: Any, user: User) -> Iterator[MemosClient]:
    with MemosClient(daemon.url, api_key=user.api_key, timeout=300) as c:
        yield c


@pytest.fixture
def cube(client: MemosClient) -> Cube:
    return client.create_cube("mcp")


@asynccontextmanager
async def memos_mcp(daemon: Any, user: User) -> AsyncIterator[Client]:
    """An MCP client session with a `memos mcp` process acting as `user` (not a fixture:
    the client's task group must be left in the task that entered it)."""
    env = {"MEMOS_URL": daemon.url, "MEMOS_API_KEY": str(user.api_key), "PYTHONPATH": str(ROOT)}
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "memos", "mcp"], env=env, cwd=ROOT
    )
    async with Client(params, read_timeout_seconds=300) as session:
        yield session


def _error_text(result: Any) -> str:
    """A failed call's message, without the `Error executing tool NAME: ` the SDK puts first."""
    assert result.is_error, result
    return str(result.content[0].text).split(": ", 1)[1]


async def test_the_tools_store_search_and_chat_as_the_callers_key(
    daemon: Any, user: User, client: MemosClient, cube: Cube
) -> None:
    async with memos_mcp(daemon, user) as mcp:
        await _store_search_and_chat(mcp, client, cube)


async def _store_search_and_chat(mcp: Client, client: MemosClient, cube: Cube) -> None:
    listed = await mcp.list_tools()
    assert {t.name for t in listed.tools} == {"add_memories", "search", "chat"}

    added = await mcp.call_tool(
        "add_memories",
        {"cube_id": cube.id, "contents": [PAINTS, VOLUNTEERS], "speaker": "Melanie"},
    )
    assert not added.is_error, added
    ids = added.structured_content["memory_ids"]
    stored = list(client.iter_memories(cube.id))
    assert [m.id for m in stored] == ids and [m.content for m in stored] == [PAINTS, VOLUNTEERS]
    assert {m.speaker for m in stored} == {"Melanie"}

    found = await mcp.call_tool(
        "search", {"cube_id": cube.id, "query": "What does Melanie paint?", "top_k": 1}
    )
    (hit,) = found.structured_content["hits"]
    assert (hit["memory_id"], hit["content"], hit["speaker"]) == (ids[0], PAINTS, "Melanie")

    first = await mcp.call_tool(
        "chat", {"cube_id": cube.id, "message": "What does Melanie paint?", "max_tokens": 4}
    )
    assert not first.is_error, first
    turn = first.structured_content
    assert turn["reply"] and turn["finish_reason"] in {"stop", "length"}
    assert ids[0] in [n["memory_id"] for n in turn["recalled"]]
    assert PAINTS in [n["content"] for n in turn["recalled"]]
    again = await mcp.call_tool(
        "chat",
        {"cube_id": cube.id, "message": "Thanks!", "chat_id": turn["chat_id"], "max_tokens": 4},
    )
    assert again.structured_content["chat_id"] == turn["chat_id"]
    history = client.chat(cube.id, chat_id=turn["chat_id"]).history()
    assert [(m.role, m.content) for m in history] == [
        ("user", "What does Melanie paint?"),
        ("assistant", turn["reply"]),
        ("user", "Thanks!"),
        ("assistant", again.structured_content["reply"]),
    ]


async def test_refusals_are_tool_errors_and_change_nothing(
    daemon: Any, user: User, client: MemosClient, cube: Cube
) -> None:
    async with memos_mcp(daemon, user) as mcp:
        await _refusals(mcp, daemon, client, cube)


async def _refusals(mcp: Client, daemon: Any, client: MemosClient, cube: Cube) -> None:
    # Another user's cube is not found for this key, as everywhere.
    with MemosClient(daemon.url, api_key=daemon.admin_key) as admin:
        theirs = admin.create_cube(f"not-yours-{uuid.uuid4().hex[:6]}")
    refused = await mcp.call_tool("add_memories", {"cube_id": theirs.id, "contents": ["x"]})
    assert _error_text(refused).startswith("cube_not_found: ")
    missing = await mcp.call_tool("chat", {"cube_id": cube.id, "message": "hi", "chat_id": "c"})
    assert _error_text(missing).startswith("chat_not_found: ")
    bad = await mcp.call_tool("search", {"cube_id": cube.id, "query": "x", "top_k": 0})
    assert "top_k" in _error_text(bad)
    empty = await mcp.call_tool("add_memories", {"cube_id": cube.id, "contents": []})
    assert "contents" in _error_text(empty)
    assert list(client.iter_memories(cube.id)) == [] and client.list_chats(cube.id) == []
