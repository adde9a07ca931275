from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from memcube.types import SearchFilters
from memos.api.deps import DaemonDep, PrincipalDep
from memos.api.etags import etag, parse_if_match
from memos.api.openapi import READ_ONLY
from memos.api.schemas import (
    HistoryList,
    HistoryOut,
    MemoryBatch,
    MemoryList,
    MemoryOut,
    MemoryPatch,
    SearchRequest,
    SearchResponse,
)
from memos.db.types import utcnow
from memos.services.views import NewMemory

router = APIRouter(prefix="/v1/cubes/{cube_id}", tags=["memories"])

Limit = Annotated[int, Query(ge=1, le=500)]
IfMatch = Annotated[
    str | None,
    Header(
        alias="If-Match",
        description='extension: the version the write expects, as its ETag (`"3"`), or `*`; '
        "another version is 412 `precondition_failed`",
    ),
]


@router.post("/memories", status_code=201, response_model=MemoryList)
def add_memories(
    cube_id: str, body: MemoryBatch, daemon: DaemonDep, principal: PrincipalDep
) -> MemoryList:
    """Add up to 1000 memories atomically: all are stored, or none (and the error says why)."""
    now = utcnow()
    items = [
        NewMemory(
            content=item.content,
            session_id=item.session_id,
            speaker=item.speaker,
            timestamp=item.timestamp or now,  # already UTC
            metadata=item.metadata,
        )
        for item in body.items
    ]
    views = daemon.memories.add(principal, cube_id, items)
    return MemoryList(items=[MemoryOut.model_validate(v) for v in views])


@router.get("/memories", response_model=MemoryList)
def list_memories(
    cube_id: str,
    daemon: DaemonDep,
    principal: PrincipalDep,
    session_id: str | None = None,
    limit: Limit = 50,
    cursor: str | None = None,
) -> MemoryList:
    page = daemon.memories.page(principal, cube_id, session_id, limit, cursor)
    return MemoryList(
        items=[MemoryOut.model_validate(v) for v in page.items], next_cursor=page.next_cursor
    )


@router.get("/memories/{memory_id}", response_model=MemoryOut)
def get_memory(
    cube_id: str, memory_id: str, daemon: DaemonDep, principal: PrincipalDep, response: Response
) -> MemoryOut:
    """The memory, with its version as `ETag` (for `If-Match` on PATCH and DELETE)."""
    view = daemon.memories.get(principal, cube_id, memory_id)
    response.headers["ETag"] = etag(view.version)
    return MemoryOut.model_validate(view)


@router.patch("/memories/{memory_id}", response_model=MemoryOut)
def patch_memory(
    cube_id: str,
    memory_id: str,
    body: MemoryPatch,
    daemon: DaemonDep,
    principal: PrincipalDep,
    response: Response,
    if_match: IfMatch = None,
) -> MemoryOut:
    """Change content and/or metadata (version + 1, the new `ETag`). With `If-Match`, only
    if the memory is still at that version (412 otherwise, nothing changed)."""
    view = daemon.memories.update(
        principal, cube_id, memory_id, body.content, body.metadata, parse_if_match(if_match)
    )
    response.headers["ETag"] = etag(view.version)
    return MemoryOut.model_validate(view)


@router.delete("/memories/{memory_id}", status_code=204)
def delete_memory(
    cube_id: str,
    memory_id: str,
    daemon: DaemonDep,
    principal: PrincipalDep,
    if_match: IfMatch = None,
    erase: Annotated[
        bool,
        Query(
            description="extension: erase for good (owner only): content, history, links, "
            "vectors, index entries and the activations built from it; history is 404 after"
        ),
    ] = False,
) -> Response:
    """Soft delete (kept in history), or with `?erase=true` erasure; `If-Match` as on PATCH."""
    versions = parse_if_match(if_match)
    if erase:
        daemon.erasure.erase(principal, cube_id, memory_id, versions)
    else:
        daemon.memories.delete(principal, cube_id, memory_id, versions)
    return Response(status_code=204)


@router.get("/memories/{memory_id}/history", response_model=HistoryList)
def memory_history(
    cube_id: str, memory_id: str, daemon: DaemonDep, principal: PrincipalDep
) -> HistoryList:
    views = daemon.memories.history(principal, cube_id, memory_id)
    return HistoryList(items=[HistoryOut.model_validate(v) for v in views])


@router.post("/search", response_model=SearchResponse, openapi_extra=READ_ONLY)
def search(
    cube_id: str, body: SearchRequest, daemon: DaemonDep, principal: PrincipalDep
) -> SearchResponse:
    """Hybrid search: dense + BM25, fused; filters narrow the candidates before ranking."""
    filters = SearchFilters(
        session_id=body.filters.session_id,
        since=body.filters.since,
        until=body.filters.until,
        metadata=body.filters.metadata,
    )
    result = daemon.search.search(
        principal, cube_id, body.query, body.top_k, filters, mode=body.mode, exact=body.exact
    )
    return SearchResponse.model_validate(result, from_attributes=True)
