"""memosd as a Model Context Protocol server (the official `mcp` package), for agents and IDEs.

Three tools, each a thin shell over the SDK (`AsyncMemosClient`), so they act with exactly the
caller's API key and its rights on each cube:

- `add_memories(cube_id, contents, session_id?, speaker?)`: store notes, one per content;
- `search(cube_id, query, top_k)`: the best notes for a query, with scores;
- `chat(cube_id, message, chat_id?, max_tokens?)`: one turn of a chat with the daemon's model
  (a new chat when `chat_id` is omitted; its id comes back to continue it), the reply with the
  notes recalled into it.

`memos mcp` serves them over stdio and talks to the daemon over REST with the CLI's URL and key
(`MEMOS_URL`, `MEMOS_API_KEY`). A refusal (404, 403, 429 ...) is a tool error whose text is the
server's `code: message`, for the model to read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from typing import Annotated

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, Field

from memos import __version__
from memos.client import AsyncMemosClient, ChatReply, MemosError, NotFound

INSTRUCTIONS = (
    "memosd keeps long-term memory in cubes (ids like cube_...). Use `search` to recall notes "
    "relevant to a question, `add_memories` to remember facts, and `chat` to talk with the "
    "daemon's local model over a cube's memory (pass the returned chat_id to continue)."
)
MAX_CONTENTS = 1000  # the REST batch bound; more is refused before anything is sent

# Hands each tool call a client acting for the caller of that call (opened and closed around
# it); the tool's `Context` tells an HTTP transport which request, hence which key, it serves.
ClientFactory = Callable[[Context], AbstractAsyncContextManager[AsyncMemosClient]]


class Stored(BaseModel):
    memory_ids: list[str] = Field(description="the new notes' ids, in the order given")


class Note(BaseModel):
    memory_id: str
    score: float
    content: str
    speaker: str | None = None
    timestamp: datetime | None = None


class Found(BaseModel):
    hits: list[Note]


class Turn(BaseModel):
    chat_id: str = Field(description="pass it back as `chat_id` to continue this chat")
    reply: str
    recalled: list[Note] = Field(description="the notes recalled into the prompt, best first")
    finish_reason: str = Field(description="`stop`, or `length` if max_tokens cut it")


CubeId = Annotated[str, Field(description="the cube's id (cube_...)")]


def build_server(client: ClientFactory) -> MCPServer:
    """The MCP server; `client()` opens an SDK client acting for the current caller."""
    server: MCPServer = MCPServer(
        "memosd", instructions=INSTRUCTIONS, version=__version__, log_level="WARNING"
    )

    @server.tool()
    async def add_memories(
        cube_id: CubeId,
        contents: Annotated[list[str], Field(min_length=1, max_length=MAX_CONTENTS)],
        session_id: str | None = None,
        speaker: str | None = None,
        ctx: Context | None = None,
    ) -> Stored:
        """Store notes in a cube (one memory per content, all or none)."""
        items = [{"content": c, "session_id": session_id, "speaker": speaker} for c in contents]
        async with _acting(client, ctx) as sdk:
            stored = await sdk.add_memories(cube_id, items)
        return Stored(memory_ids=[m.id for m in stored])

    @server.tool()
    async def search(
        cube_id: CubeId,
        query: str,
        top_k: Annotated[int, Field(ge=1, le=100)] = 5,
        ctx: Context | None = None,
    ) -> Found:
        """The cube's notes most relevant to `query`, best first."""
        async with _acting(client, ctx) as sdk:
            result = await sdk.search(cube_id, query, top_k=top_k)
        return Found(
            hits=[
                Note(
                    memory_id=h.memory.id,
                    score=h.score,
                    content=h.memory.content,
                    speaker=h.memory.speaker,
                    timestamp=h.memory.timestamp,
                )
                for h in result.hits
            ]
        )

    @server.tool()
    async def chat(
        cube_id: CubeId,
        message: str,
        chat_id: Annotated[
            str | None, Field(description="continue this chat; omit to open a new one")
        ] = None,
        max_tokens: Annotated[int | None, Field(ge=1, le=65_536)] = None,
        ctx: Context | None = None,
    ) -> Turn:
        """One chat turn with the daemon's model: notes relevant to `message` are recalled
        into the prompt, and both the message and the reply are stored in the cube."""
        async with _acting(client, ctx) as sdk:
            session = await sdk.chat(cube_id, chat_id=chat_id)
            reply = await session.send(message, max_tokens=max_tokens)
            recalled = await _notes(sdk, cube_id, reply)
        return Turn(
            chat_id=session.id,
            reply=reply.reply,
            recalled=recalled,
            finish_reason=reply.finish_reason,
        )

    return server


@asynccontextmanager
async def _acting(client: ClientFactory, ctx: Context | None) -> AsyncIterator[AsyncMemosClient]:
    """The caller's client for one tool call; SDK errors become tool errors (`code: message`)."""
    assert ctx is not None, "MCPServer hands every tool call its Context"
    try:
        async with client(ctx) as sdk:
            yield sdk
    except MemosError as exc:
        raise ToolError(f"{exc.code}: {exc.message}") from exc


async def _notes(sdk: AsyncMemosClient, cube_id: str, reply: ChatReply) -> list[Note]:
    """The recalled citations with their content (a note deleted since is left out)."""

    async def one(memory_id: str, score: float) -> Note | None:
        try:
            m = await sdk.get_memory(cube_id, memory_id)
        except NotFound:
            return None
        return Note(
            memory_id=m.id, score=score, content=m.content, speaker=m.speaker, timestamp=m.timestamp
        )

    found = await asyncio.gather(*(one(c.memory_id, c.score) for c in reply.recalled))
    return [note for note in found if note is not None]


def fixed_client(url: str, api_key: str | None, timeout: float) -> ClientFactory:
    """One key for every call: the stdio server, run by the user it acts for."""

    @asynccontextmanager
    async def open_client(_: Context) -> AsyncIterator[AsyncMemosClient]:
        async with AsyncMemosClient(url, api_key=api_key, timeout=timeout) as sdk:
            yield sdk

    return open_client


def serve_stdio(url: str, api_key: str | None, timeout: float) -> None:
    """Serve MCP on stdin/stdout until the client closes stdin."""
    build_server(fixed_client(url, api_key, timeout)).run("stdio")
