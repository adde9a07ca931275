"""MCP over streamable HTTP at `/mcp` on the daemon, with the `mcp` package's own client.

Each call acts with the request's Bearer key: what it stores and refuses is checked over REST.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import LiveServer

PAINTS = "Melanie paints sunrises over the lake every weekend."


@asynccontextmanager
async def mcp_over_http(server: LiveServer, key: str | None) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx2.AsyncClient(headers=headers, timeout=300) as http:
        transport = streamable_http_client(f"{server.url}/mcp", http_client=http)
        async with Client(transport, read_timeout_seconds=300) as client:
            yield client


async def test_mcp_tools_over_http_act_with_the_requests_key(server: LiveServer) -> None:
    _, key = server.new_user()
    _, stranger = server.new_user()
    with server.client(key) as rest:
        cube = rest.post("/v1/cubes", json={"name": "mcp"}).json()["id"]

    async with mcp_over_http(server, key) as mcp:
        assert {t.name for t in (await mcp.list_tools()).tools} == {
            "add_memories",
            "search",
            "chat",
        }
        added = await mcp.call_tool(
            "add_memories", {"cube_id": cube, "contents": [PAINTS], "speaker": "Melanie"}
        )
        assert not added.is_error, added
        (memory_id,) = added.structured_content["memory_ids"]
        found = await mcp.call_tool("search", {"cube_id": cube, "query": "painting", "top_k": 1})
        assert [h["memory_id"] for h in found.structured_content["hits"]] == [memory_id]
        turn = await mcp.call_tool(
            "chat", {"cube_id": cube, "message": "What does Melanie paint?", "max_tokens": 4}
        )
        assert not turn.is_error, turn
        chat_id = turn.structured_content["chat_id"]
        assert memory_id in [n["memory_id"] for n in turn.structured_content["recalled"]]

    with server.client(key) as rest:
        memories = rest.get(f"/v1/cubes/{cube}/memories").json()["items"]
        messages = rest.get(f"/v1/cubes/{cube}/chats/{chat_id}/messages").json()["items"]
    assert memories[0]["id"] == memory_id and memories[0]["speaker"] == "Melanie"
    assert [m["content"] for m in messages] == [
        "What does Melanie paint?", turn.structured_content["reply"]
    ]  # fmt: skip

    # Another user's key: the cube is not found for it, and nothing is written.
    async with mcp_over_http(server, stranger) as mcp:
        refused = await mcp.call_tool("add_memories", {"cube_id": cube, "contents": ["x"]})
        assert refused.is_error and "cube_not_found: " in refused.content[0].text
    with server.client(key) as rest:
        assert len(rest.get(f"/v1/cubes/{cube}/memories").json()["items"]) == 3  # 1 + 2 turns


def test_mcp_over_http_needs_a_valid_key(server: LiveServer) -> None:
    hello = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    for headers in ({}, {"Authorization": "Bearer msk_not_a_key"}):
        r = httpx.post(f"{server.url}/mcp", json=hello, headers=headers, timeout=30)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "unauthorized"
        assert r.headers["WWW-Authenticate"] == "Bearer"
