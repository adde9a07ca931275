"""Chat routes: open a chat on a cube, send it messages, read it back, delete it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from memcube.types import SearchFilters
from memos.api.deps import DaemonDep, PrincipalDep
from memos.api.generation import GenerationRun
from memos.api.openapi import errors, event_stream
from memos.api.schemas import (
    ChatCreate,
    ChatList,
    ChatMessageIn,
    ChatMessageList,
    ChatMessageOut,
    ChatOut,
    ChatReply,
)

router = APIRouter(prefix="/v1/cubes/{cube_id}", tags=["chats"])

Limit = Annotated[int, Query(ge=1, le=500)]
UNAVAILABLE = "`unavailable` (the local runtime is off) or `model_unavailable` (it cannot load)"
REPLIED = {
    "description": "the reply; with `stream: true`, server-sent events instead: one `piece` "
    "event per piece of decoded text, then one `done` event with the same body (or one `error` "
    "event with the error body if the turn fails after the stream began; nothing is stored)",
    "content": {
        "text/event-stream": event_stream(
            {
                "piece": {"type": "object", "properties": {"text": {"type": "string"}}},
                "done": {"$ref": "#/components/schemas/ChatReply"},
                "error": {"$ref": "#/components/schemas/ErrorBody"},
            },
            example='event: piece\ndata: {"text": "Hi"}\n\nevent: done\ndata: {"reply": "Hi", ...}',
        )
    },
}


@router.post(
    "/chats",
    status_code=201,
    response_model=ChatOut,
    responses=errors({503: UNAVAILABLE}),
)
def create_chat(
    cube_id: str, body: ChatCreate, daemon: DaemonDep, principal: PrincipalDep
) -> ChatOut:
    """Open a chat. Its turns are memories of `session_id` (default: the chat's id), so
    search, export and activations see them; a chat on an existing session continues it."""
    recall = body.recall
    filters = None
    if recall is not None:
        f = recall.filters
        filters = SearchFilters(
            session_id=f.session_id, since=f.since, until=f.until, metadata=f.metadata
        )
    view = daemon.chats.create(
        principal,
        cube_id,
        session_id=body.session_id,
        system=body.system,
        recall_top_k=recall.top_k if recall is not None else None,
        recall_filters=filters,
        max_context_tokens=body.max_context_tokens,
        temperature=body.sampling.temperature,
        top_p=body.sampling.top_p,
        seed=body.sampling.seed,
    )
    return ChatOut.model_validate(view)


@router.get("/chats", response_model=ChatList)
def list_chats(
    cube_id: str,
    daemon: DaemonDep,
    principal: PrincipalDep,
    limit: Limit = 50,
    cursor: str | None = None,
) -> ChatList:
    """The cube's chats, oldest first."""
    page = daemon.chats.page(principal, cube_id, limit, cursor)
    return ChatList(
        items=[ChatOut.model_validate(v) for v in page.items], next_cursor=page.next_cursor
    )


@router.get("/chats/{chat_id}", response_model=ChatOut)
def get_chat(cube_id: str, chat_id: str, daemon: DaemonDep, principal: PrincipalDep) -> ChatOut:
    return ChatOut.model_validate(daemon.chats.get(principal, cube_id, chat_id))


@router.delete(
    "/chats/{chat_id}", status_code=204, responses=errors({409: "`chat_busy`: a turn is running"})
)
def delete_chat(
    cube_id: str,
    chat_id: str,
    daemon: DaemonDep,
    principal: PrincipalDep,
    purge: Annotated[
        bool, Query(description="also delete the chat's turns (its session's memories)")
    ] = False,
) -> Response:
    """The chat and its saved KV prefix; its memories stay unless `purge=true`."""
    daemon.chats.delete(principal, cube_id, chat_id, purge)
    return Response(status_code=204)


@router.get("/chats/{chat_id}/messages", response_model=ChatMessageList)
def list_messages(
    cube_id: str,
    chat_id: str,
    daemon: DaemonDep,
    principal: PrincipalDep,
    limit: Limit = 50,
    cursor: str | None = None,
) -> ChatMessageList:
    """The chat's turns, oldest first (assistant turns have speaker `assistant`)."""
    page = daemon.chats.messages(principal, cube_id, chat_id, limit, cursor)
    return ChatMessageList(
        items=[ChatMessageOut.model_validate(v) for v in page.items],
        next_cursor=page.next_cursor,
    )


@router.post(
    "/chats/{chat_id}/messages",
    response_model=ChatReply,
    responses={
        200: REPLIED,
        **errors(
            {
                409: "`chat_busy`: the chat is answering another message",
                413: "`payload_too_large` (the message), `message_too_large` (it does not "
                "fit the model with max_tokens) or `generation_too_large`",
                503: UNAVAILABLE,
            }
        ),
    },
)
async def send_message(
    cube_id: str,
    chat_id: str,
    body: ChatMessageIn,
    request: Request,
    daemon: DaemonDep,
    principal: PrincipalDep,
) -> ChatReply | StreamingResponse:
    """One turn: the message's relevant notes are recalled, the model answers after the
    chat's history (its KV prefix reused: only new tokens are prefilled), and both turns are
    stored as memories, in one transaction, once the reply is complete. A turn that does not
    finish (client gone, model error) stores nothing. One turn at a time per chat (409
    `chat_busy`)."""
    run = GenerationRun(
        lambda cancel: daemon.chats.send(
            principal,
            cube_id,
            chat_id,
            body.content,
            speaker=body.speaker,
            timestamp=body.timestamp,
            max_tokens=body.max_tokens,
            cancel=cancel,
        ),
        body=ChatReply.model_validate,
    )
    await run.started(request)
    if not body.stream:
        reply: ChatReply = await run.collect(request)
        return reply
    return run.stream_response(request)
