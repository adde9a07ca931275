"""Python SDK for the memosd REST API (`shared/spec/rest-api.md`), sync and async.

Each route is written once, in `_Routes`, as a function that returns a transport-free `_Call`
(method, path, query, body, and a parser for the reply). `_Api` exposes every route through an
`_Endpoint` descriptor that hands the `_Call` to the client's `_send`: `MemosClient._send` returns
the parsed value, `AsyncMemosClient._send` a coroutine of it. So both clients have the same
methods with the same (type-checked) signatures, and only the transport differs.

Return values are pydantic models that accept unknown fields (`extra="allow"`), so a newer server
that adds fields does not break an older client. Every non-2xx reply raises a `MemosError`
subclass carrying the server's `status`, `code` and `message`; a server that cannot be reached
raises `MemosConnectionError` naming the URL.

Datetimes are sent as ISO 8601 with a time zone. A naive datetime is taken to be UTC.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Self, TypeVar, overload
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from memos import __version__

if TYPE_CHECKING:
    from memos.client_chat import AsyncChatSession, ChatSession

DEFAULT_URL = "http://127.0.0.1:8765"
MAX_PAGE_SIZE = 500  # the server's cap on `?limit=`; used when the SDK walks all pages itself

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
P = ParamSpec("P")


# --------------------------------------------------------------------------- models


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class Health(_Model):
    status: str


class User(_Model):
    id: str
    name: str
    api_key: str | None = None  # shown only in the reply to `create_user`
    is_admin: bool | None = None  # filled in by `list_users`
    created_at: datetime | None = None  # filled in by `list_users`


class ApiKey(_Model):
    """One of the caller's API keys. `api_key` (the secret) only in the reply to `create_key`."""

    id: str
    name: str
    prefix: str  # the key's first 8 characters
    created_at: datetime
    revoked_at: datetime | None = None
    api_key: str | None = None


class CubeStats(_Model):
    memories: int
    activations: int
    bytes: int
    enrichment_pending: int = 0  # server extension: notes not yet enriched


OWNER = "owner"


class Cube(_Model):
    id: str
    name: str
    description: str | None = None
    owner_id: str
    created_at: datetime
    role: str | None = None  # server extension: "owner", "writer" or "reader" for this key
    stats: CubeStats | None = None  # only `get_cube` fills it


class Grant(_Model):
    cube_id: str
    user_id: str
    role: str
    created_at: datetime | None = None  # filled in by `list_grants`


class Link(_Model):
    id: str
    kind: str
    score: float


class Memory(_Model):
    id: str
    cube_id: str
    content: str
    session_id: str | None = None
    speaker: str | None = None
    timestamp: datetime  # when the remembered thing was said or happened
    metadata: dict[str, Any] = Field(default_factory=dict)
    keywords: list[str] = Field(default_factory=list)
    dates: list[date] = Field(default_factory=list)  # resolved by enrichment ("yesterday")
    tags: list[str] = Field(default_factory=list)
    context: str = ""
    links: list[Link] = Field(default_factory=list)
    version: int
    created_at: datetime  # when the daemon stored it
    updated_at: datetime
    has_kv: bool = False  # a KV chunk of this version is stored (`per_memory` activations)


class MemoryInput(_Model):
    """One item of `add_memories`. `timestamp` defaults to now on the server; naive means UTC."""

    content: str
    session_id: str | None = None
    speaker: str | None = None
    timestamp: datetime | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("timestamp")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        return _as_utc(value) if value is not None else None


class HistoryEntry(_Model):
    version: int
    content: str
    keywords: list[str] = Field(default_factory=list)
    dates: list[date] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    context: str = ""
    changed_at: datetime
    reason: str | None = None  # e.g. "created", "updated", "deleted"


class Hit(_Model):
    memory: Memory
    score: float


class SearchResult(_Model):
    hits: list[Hit]
    took_ms: float


class Page(_Model, Generic[T]):
    items: list[T]
    next_cursor: str | None = None  # None on the last page


class Episode(_Model):
    """One episode of an episodic activation: its windows (of 4 utterances) and its cache."""

    index: int
    windows: list[int]
    kept_tokens: int
    bytes: int


class Activation(_Model):
    id: str
    cube_id: str
    model: str
    tokens: int
    kept_tokens: int
    bits: int
    bytes: int
    state: str  # "building", "ready", "failed" or "corrupt"
    created_at: datetime
    last_used_at: datetime | None = None
    progress: float = 1.0  # of a build in the background, 0..1
    error: str | None = None
    episodes: list[Episode] | None = None  # an episodic activation's (None: a plain one)
    kind: str = "context"  # "context", "episodic", "chat_prefix" or "note" (a note's chunk)
    memory_id: str | None = None  # a "note" chunk's note
    scorer: str | None = None  # how `budget_tokens` chose the kept tokens (None: no budget)


class Generation(_Model):
    text: str
    ttft_ms: float
    prompt_tokens: int
    reused_tokens: int
    activation_id: str | None = None
    finish_reason: str | None = None  # "stop" or "length"
    episode: int | None = None  # the episode of an episodic activation that answered
    recomputed_tokens: int = 0  # with memory_ids: note-chunk tokens the blend recomputed


class ChatRecall(_Model):
    top_k: int  # notes recalled a turn (0: none)
    filters: dict[str, Any] = Field(default_factory=dict)


class ChatSampling(_Model):
    temperature: float
    top_p: float
    seed: int | None = None


class Chat(_Model):
    """A chat on a cube: its turns are memories of `session_id` (default: the chat's id)."""

    id: str
    cube_id: str
    session_id: str
    system: str | None = None
    recall: ChatRecall | None = None
    max_context_tokens: int | None = None
    sampling: ChatSampling | None = None
    backend: str | None = None  # "local" (the daemon's model, KV reuse) or "openai"
    turns: int  # memories in the chat's session: both sides of each turn
    created_at: datetime
    last_active_at: datetime


class ChatMessage(_Model):
    memory_id: str
    role: str  # "user" or "assistant"
    speaker: str | None = None
    content: str
    timestamp: datetime


class Citation(_Model):
    """A note recalled into a turn's prompt, with its search score."""

    memory_id: str
    score: float


class ChatReply(_Model):
    """One answered turn. The memory ids are None when the turn was not stored."""

    reply: str
    user_memory_id: str | None = None
    assistant_memory_id: str | None = None
    recalled: list[Citation] = Field(default_factory=list)
    ttft_ms: float
    prompt_tokens: int
    reused_tokens: int  # of `prompt_tokens`, in the chat's KV prefix or kept note chunks
    finish_reason: str  # "stop" or "length" (stored); "cancelled" (not stored)
    recomputed_tokens: int = 0  # recalled notes' chunk tokens the blend recomputed
    # The episode of the chat's old part (turns before its window) the prompt stood on.
    episode: int | None = None


class Job(_Model):
    name: str
    schedule: str = ""  # "every 300 s" or "cron 0 3 * * *"
    next_run_at: datetime | None = None
    last_run_at: datetime | None = None
    last_status: str | None = None


class JobRun(_Model):
    """`run_job` returns only `run_id`; `get_job_run` fills in the rest."""

    run_id: str
    name: str | None = None
    status: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None


class FusePolicy(_Model):
    enabled: bool
    threshold: float


class Policy(_Model):
    """A cube's lifecycle policy (`get_policy`, `set_policy`)."""

    cube_id: str
    activation_bytes_max: int | None = None
    memory_ttl_days: float | None = None
    deleted_retention_days: float
    hot_recalls: int
    demote_after_days: float
    fuse: FusePolicy
    eviction: str
    overrides: list[str] = Field(default_factory=list)
    version: int = 0
    changed_at: datetime | None = None
    changed_by: str | None = None


# --------------------------------------------------------------------------- errors


class MemosError(Exception):
    """Any failure the SDK reports. `status` is the HTTP status, None when there was no reply."""

    def __init__(
        self, message: str, *, status: int | None = None, code: str = "error", details: Any = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}" if status else f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details  # the error body's `details`, when the server sent some


class MemosConnectionError(MemosError):
    """The daemon could not be reached (refused, DNS, timeout...)."""


class BadRequest(MemosError):
    """400"""


class Unauthorized(MemosError):
    """401: missing or unknown API key."""


class Forbidden(MemosError):
    """403: the key may read the cube but not write to it (or is not admin)."""


class NotFound(MemosError):
    """404: absent, or not visible to this key (the server does not tell which)."""


class Conflict(MemosError):
    """409"""


class ActivationMismatch(Conflict):
    """409 `activation_mismatch`: the activation was built by another model, tokenizer or dtype."""


class ChatBusy(Conflict):
    """409 `chat_busy`: the chat is answering another message; send when that turn is done."""


class PreconditionFailed(MemosError):
    """412: `if_match` named a version the memory is no longer at; nothing was changed."""


class PayloadTooLarge(MemosError):
    """413: e.g. more than 1000 items in one batch."""


class TooManyRequests(MemosError):
    """429: a rate limit, a quota or a bounded queue (`too_many_builds`,
    `too_many_generations`); nothing was done. `retry_after`: the seconds the server asked to
    wait (its `Retry-After`), if it said."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str = "error",
        details: Any = None,
        retry_after: float | None = None,
        limit: str | None = None,
    ) -> None:
        super().__init__(message, status=status, code=code, details=details)
        self.retry_after = retry_after
        self.limit = limit  # the quota's setting name, for `QuotaExceeded`


class RateLimited(TooManyRequests):
    """429 `rate_limited`: this key sent too many requests; retry after `retry_after` s."""


class QuotaExceeded(TooManyRequests):
    """429 `quota_exceeded`: the cube owner's quota named by `limit` is full; waiting won't help."""


class ValidationFailed(MemosError):
    """422: the body or query did not validate."""


class ServerError(MemosError):
    """5xx"""


_ERRORS: dict[int, tuple[type[MemosError], str]] = {
    400: (BadRequest, "bad_request"),
    401: (Unauthorized, "unauthorized"),
    403: (Forbidden, "forbidden"),
    404: (NotFound, "not_found"),
    409: (Conflict, "conflict"),
    412: (PreconditionFailed, "precondition_failed"),
    413: (PayloadTooLarge, "payload_too_large"),
    422: (ValidationFailed, "validation_failed"),
    429: (TooManyRequests, "too_many_requests"),
}

_TOO_MANY: dict[str, type[TooManyRequests]] = {
    "rate_limited": RateLimited,
    "quota_exceeded": QuotaExceeded,
}


_CONFLICTS: dict[str, type[Conflict]] = {
    "activation_mismatch": ActivationMismatch,
    "chat_busy": ChatBusy,
}


def error_from_response(response: httpx.Response) -> MemosError:
    """The typed exception for a non-2xx reply, from `{"error": {"code", "message"}}` if present.

    Other shapes (FastAPI's `{"detail": ...}`, plain text from a proxy) still give a sensible
    code (from the status) and message (from the body or the reason phrase).
    """
    status = response.status_code
    cls, code = _ERRORS.get(status, (ServerError if status >= 500 else MemosError, ""))
    code = code or ("server_error" if status >= 500 else f"http_{status}")
    message = response.reason_phrase or f"HTTP {status}"
    details = None
    limit = None
    try:
        body = response.json()
    except ValueError:
        body = None
        if response.text.strip():
            message = response.text.strip()[:500]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            code = str(err.get("code") or code)
            message = str(err.get("message") or message)
            details = err.get("details")
            limit = err.get("limit")
        elif isinstance(err, str):
            message = err
        elif "detail" in body:
            detail = body["detail"]
            message = detail if isinstance(detail, str) else json.dumps(detail)
    if status == 409:
        cls = _CONFLICTS.get(code, cls)
    if status == 429:
        too_many = _TOO_MANY.get(code, TooManyRequests)
        return too_many(
            message,
            status=status,
            code=code,
            details=details,
            retry_after=_retry_after(response.headers.get("Retry-After")),
            limit=str(limit) if limit is not None else None,
        )
    return cls(message, status=status, code=code, details=details)


def _retry_after(header: str | None) -> float | None:
    """`Retry-After` in seconds (this server sends whole seconds; dates are not used)."""
    try:
        return float(header) if header is not None else None
    except ValueError:
        return None


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One HTTP exchange, transport-free: what to send and how to read a 2xx reply's JSON body."""

    method: str
    path: str
    parse: Callable[[Any], T]
    params: dict[str, Any] | None = None
    body: Any = None
    headers: dict[str, str] | None = None


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _iso(value: datetime | str | None) -> str | None:
    """ISO 8601 with zone; strings are parsed so a naive one gets UTC too, else sent unchanged."""
    if value is None or isinstance(value, datetime):
        return None if value is None else _as_utc(value).isoformat()
    try:
        return _as_utc(datetime.fromisoformat(value)).isoformat()
    except ValueError:
        return value  # not ISO 8601: let the server say what is wrong with it


def _path(*segments: str) -> str:
    return "/v1/" + "/".join(quote(s, safe="") for s in segments)


def _drop_none(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _one(cls: type[M]) -> Callable[[Any], M]:
    return cls.model_validate


def _items(cls: type[M]) -> Callable[[Any], list[M]]:
    return lambda body: [cls.model_validate(item) for item in body["items"]]


def _page(cls: type[M]) -> Callable[[Any], Page[M]]:
    return lambda body: Page(items=_items(cls)(body), next_cursor=body.get("next_cursor"))


def _nothing(body: Any) -> None:
    return None


def _owned_named(cubes: Sequence[Cube], name: str) -> Cube | None:
    """The cube called `name` that this key owns (names are unique per owner), if any."""
    return next((c for c in cubes if c.name == name and c.role == OWNER), None)


def _cube_exists(exc: Conflict) -> bool:
    return exc.code == "cube_exists"


# Lookup and create can only keep missing each other while the cube is created and deleted
# concurrently; after this many rounds the caller gets the last 409.
GET_OR_CREATE_TRIES = 3


def _if_match(version: int | str | None) -> dict[str, str] | None:
    """An `If-Match` header: a version number becomes its ETag (`"3"`); a string goes as is."""
    if version is None:
        return None
    return {"If-Match": f'"{version}"' if isinstance(version, int) else version}


def _memory_input(item: MemoryInput | Mapping[str, Any]) -> dict[str, Any]:
    model = item if isinstance(item, MemoryInput) else MemoryInput.model_validate(item)
    return model.model_dump(mode="json", exclude_none=True)


def _chat_message(
    content: str, speaker: str | None, timestamp: datetime | str | None, max_tokens: int | None
) -> dict[str, Any]:
    return _drop_none(
        content=content, speaker=speaker, timestamp=_iso(timestamp), max_tokens=max_tokens
    )


class _Routes:
    """One builder per route of the spec; their signatures and docstrings are the clients'."""

    @staticmethod
    def health() -> _Call[Health]:
        """`GET /healthz`; needs no key."""
        return _Call("GET", "/healthz", _one(Health))

    @staticmethod
    def create_user(name: str) -> _Call[User]:
        """Admin only. The returned `api_key` is shown by the server this once."""
        return _Call("POST", _path("users"), _one(User), body={"name": name})

    @staticmethod
    def create_cube(name: str, description: str | None = None) -> _Call[Cube]:
        body = _drop_none(name=name, description=description)
        return _Call("POST", _path("cubes"), _one(Cube), body=body)

    @staticmethod
    def get_cube(cube_id: str) -> _Call[Cube]:
        """The cube with `stats` filled in. `NotFound` also when this key may not see it."""
        return _Call("GET", _path("cubes", cube_id), _one(Cube))

    @staticmethod
    def delete_cube(cube_id: str) -> _Call[None]:
        """Owner only."""
        return _Call("DELETE", _path("cubes", cube_id), _nothing)

    @staticmethod
    def grant(cube_id: str, user_id: str, role: str) -> _Call[Grant]:
        """Owner only. `role` is "reader" or "writer"."""
        sent = {"user_id": user_id, "role": role}

        def parse(body: Any) -> Grant:  # the spec gives the reply no body: merge it over ours
            return Grant.model_validate({"cube_id": cube_id, **sent, **(body or {})})

        return _Call("POST", _path("cubes", cube_id, "grants"), parse, body=sent)

    @staticmethod
    def add_memories(
        cube_id: str, items: Sequence[MemoryInput | Mapping[str, Any]]
    ) -> _Call[list[Memory]]:
        """Store a batch (at most 1000: `PayloadTooLarge` beyond), all or nothing, in order.

        Dict items are validated locally as `MemoryInput` (pydantic `ValidationError` if bad).
        """
        body = {"items": [_memory_input(item) for item in items]}
        return _Call("POST", _path("cubes", cube_id, "memories"), _items(Memory), body=body)

    @staticmethod
    def add_memory(cube_id: str, content: str, **fields: Any) -> _Call[Memory]:
        """One memory; `fields` are those of `MemoryInput` (session_id, speaker, timestamp...)."""
        call = _Routes.add_memories(cube_id, [MemoryInput(content=content, **fields)])
        return _Call(call.method, call.path, lambda body: _items(Memory)(body)[0], body=call.body)

    @staticmethod
    def list_memories(
        cube_id: str,
        session_id: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> _Call[Page[Memory]]:
        """One page; pass its `next_cursor` back for the next. `iter_memories` walks them all."""
        params = _drop_none(session_id=session_id, limit=limit, cursor=cursor)
        return _Call("GET", _path("cubes", cube_id, "memories"), _page(Memory), params=params)

    @staticmethod
    def get_memory(cube_id: str, memory_id: str) -> _Call[Memory]:
        return _Call("GET", _path("cubes", cube_id, "memories", memory_id), _one(Memory))

    @staticmethod
    def update_memory(
        cube_id: str,
        memory_id: str,
        content: str | None = None,
        metadata: dict[str, Any] | None = None,
        if_match: int | str | None = None,
    ) -> _Call[Memory]:
        """Change content and/or metadata; the returned memory has `version` + 1.

        `if_match`: the version you read (e.g. `memory.version`), or `"*"`: `PreconditionFailed`
        if the memory has changed since, and nothing is written.
        """
        body = _drop_none(content=content, metadata=metadata)
        path = _path("cubes", cube_id, "memories", memory_id)
        return _Call("PATCH", path, _one(Memory), body=body, headers=_if_match(if_match))

    @staticmethod
    def delete_memory(
        cube_id: str, memory_id: str, erase: bool = False, if_match: int | str | None = None
    ) -> _Call[None]:
        """Soft delete: gone from reads and search, kept in history. `erase=True` (owner only)
        removes it for good: content, history, links, vectors, and activations built from it.
        `if_match` as for `update_memory`."""
        path = _path("cubes", cube_id, "memories", memory_id)
        params = {"erase": "true"} if erase else None
        return _Call("DELETE", path, _nothing, params=params, headers=_if_match(if_match))

    @staticmethod
    def memory_history(cube_id: str, memory_id: str) -> _Call[list[HistoryEntry]]:
        path = _path("cubes", cube_id, "memories", memory_id, "history")
        return _Call("GET", path, _items(HistoryEntry))

    @staticmethod
    def search(
        cube_id: str,
        query: str,
        top_k: int = 10,
        session_id: str | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        metadata: dict[str, Any] | None = None,
        mode: str | None = None,
        exact: bool | None = None,
    ) -> _Call[SearchResult]:
        """Best `top_k` memories for `query`; `since`/`until` bound `timestamp` (naive = UTC).

        `mode` ("hybrid", the default, "dense" or "lexical") and `exact` (brute-force dense
        search) are server extensions for diagnosis and benchmarks.
        """
        filters = _drop_none(
            session_id=session_id, since=_iso(since), until=_iso(until), metadata=metadata
        )
        body: dict[str, Any] = {
            "query": query,
            "top_k": top_k,
            **_drop_none(mode=mode, exact=exact),
        }
        if filters:
            body["filters"] = filters
        return _Call("POST", _path("cubes", cube_id, "search"), _one(SearchResult), body=body)

    @staticmethod
    def create_activation(
        cube_id: str,
        text: str | None = None,
        memory_ids: Sequence[str] | None = None,
        session_id: str | None = None,
        bits: int | None = None,
        budget_tokens: int | None = None,
        session_ids: Sequence[str] | None = None,
        episodic: Mapping[str, int] | None = None,
        scorer: str | None = None,
    ) -> _Call[Activation]:
        """Build a KV cache from one source (`text`, `memory_ids`, `session_id` or
        `session_ids`); with `episodic` (`{"episodes", "budget_tokens", "block_tokens"?}`)
        one bounded cache per episode of the conversation, built in the background.
        `scorer` (with `budget_tokens`): which tokens the budget keeps, default kvzip."""
        ids = list(memory_ids) if memory_ids is not None else None
        sessions = list(session_ids) if session_ids is not None else None
        body = _drop_none(text=text, memory_ids=ids, session_id=session_id, session_ids=sessions)
        if compression := _drop_none(bits=bits, budget_tokens=budget_tokens, scorer=scorer):
            body["compression"] = compression
        if episodic is not None:
            body["episodic"] = dict(episodic)
        path = _path("cubes", cube_id, "activations")
        return _Call("POST", path, _one(Activation), body=body)

    @staticmethod
    def get_activation(cube_id: str, activation_id: str) -> _Call[Activation]:
        return _Call("GET", _path("cubes", cube_id, "activations", activation_id), _one(Activation))

    @staticmethod
    def delete_activation(cube_id: str, activation_id: str) -> _Call[None]:
        return _Call("DELETE", _path("cubes", cube_id, "activations", activation_id), _nothing)

    @staticmethod
    def generate(
        cube_id: str, prompt: str, activation_id: str | None = None, max_tokens: int | None = None
    ) -> _Call[Generation]:
        """Generate with the daemon's model, reusing the activation's KV cache when given.

        `ActivationMismatch` when the activation was built by another model, tokenizer or dtype.
        """
        body = _drop_none(prompt=prompt, activation_id=activation_id, max_tokens=max_tokens)
        return _Call("POST", _path("cubes", cube_id, "generate"), _one(Generation), body=body)

    @staticmethod
    def run_job(name: str, cube_id: str | None = None) -> _Call[JobRun]:
        """Admin only. Starts the job now (`evict`, `fuse` and `migrate` on one cube if
        `cube_id`); the reply (202) carries its `run_id`."""
        body = {"cube_id": cube_id} if cube_id is not None else None
        return _Call("POST", _path("jobs", name, "run"), _one(JobRun), body=body)

    @staticmethod
    def get_policy(cube_id: str) -> _Call[Policy]:
        """The cube's lifecycle policy in force (reader+)."""
        return _Call("GET", _path("cubes", cube_id, "policy"), _one(Policy))

    @staticmethod
    def set_policy(cube_id: str, **fields: Any) -> _Call[Policy]:
        """Owner only: set these policy fields (others keep their value), e.g.
        `set_policy(cube_id, memory_ttl_days=90, fuse={"enabled": True})`."""
        return _Call("PUT", _path("cubes", cube_id, "policy"), _one(Policy), body=fields)

    @staticmethod
    def get_job_run(run_id: str) -> _Call[JobRun]:
        """Admin only. Status of a run started by `run_job` (a route beyond the spec's floor)."""
        return _Call("GET", _path("jobs", "runs", run_id), _one(JobRun))

    @staticmethod
    def create_key(name: str | None = None) -> _Call[ApiKey]:
        """A new API key for the caller; its secret `api_key` is shown by the server this once."""
        return _Call("POST", _path("keys"), _one(ApiKey), body=_drop_none(name=name))

    @staticmethod
    def revoke_key(key_id: str) -> _Call[None]:
        """Revoke one of your keys (401 from its next request on). `NotFound` for another
        user's key; `Conflict` (`last_key`) for your last active one: create another first."""
        return _Call("DELETE", _path("keys", key_id), _nothing)

    @staticmethod
    def revoke_grant(cube_id: str, user_id: str) -> _Call[None]:
        """Owner only: the user loses the cube at once. `NotFound` (`grant_not_found`) if the
        user has no grant."""
        return _Call("DELETE", _path("cubes", cube_id, "grants", user_id), _nothing)

    @staticmethod
    def create_chat(
        cube_id: str,
        system: str | None = None,
        session_id: str | None = None,
        recall_top_k: int | None = None,
        recall_filters: Mapping[str, Any] | None = None,
        max_context_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        backend: str | None = None,
    ) -> _Call[Chat]:
        """Writer+. Open a chat; `client.chat(...)` wraps this in a `ChatSession`.

        `recall_filters` are `search`'s (`session_id`, `since`, `until`, `metadata`);
        `backend` is "local" or "openai" (the daemon's configured endpoint). None leaves a
        setting at the server's default.
        """
        body: dict[str, Any] = _drop_none(
            system=system,
            session_id=session_id,
            max_context_tokens=max_context_tokens,
            backend=backend,
        )
        if recall_top_k is not None or recall_filters is not None:
            body["recall"] = _drop_none(
                top_k=recall_top_k,
                filters=dict(recall_filters) if recall_filters is not None else None,
            )
        if sampling := _drop_none(temperature=temperature, top_p=top_p, seed=seed):
            body["sampling"] = sampling
        return _Call("POST", _path("cubes", cube_id, "chats"), _one(Chat), body=body)

    @staticmethod
    def get_chat(cube_id: str, chat_id: str) -> _Call[Chat]:
        return _Call("GET", _path("cubes", cube_id, "chats", chat_id), _one(Chat))

    @staticmethod
    def delete_chat(cube_id: str, chat_id: str, purge: bool = False) -> _Call[None]:
        """Writer+. The chat goes; its turns stay as memories unless `purge=True`.
        `ChatBusy` while a turn runs."""
        params = {"purge": "true"} if purge else None
        return _Call("DELETE", _path("cubes", cube_id, "chats", chat_id), _nothing, params=params)

    @staticmethod
    def list_chat_messages(
        cube_id: str, chat_id: str, limit: int | None = None, cursor: str | None = None
    ) -> _Call[Page[ChatMessage]]:
        """One page of the chat's turns, oldest first; `ChatSession.history` walks them all."""
        path = _path("cubes", cube_id, "chats", chat_id, "messages")
        params = _drop_none(limit=limit, cursor=cursor)
        return _Call("GET", path, _page(ChatMessage), params=params)

    @staticmethod
    def send_chat_message(
        cube_id: str,
        chat_id: str,
        content: str,
        speaker: str | None = None,
        timestamp: datetime | str | None = None,
        max_tokens: int | None = None,
    ) -> _Call[ChatReply]:
        """Writer+. One turn: the model answers and both turns are stored (see `ChatSession`).
        `ChatBusy` while another turn of the chat runs."""
        path = _path("cubes", cube_id, "chats", chat_id, "messages")
        body = _chat_message(content, speaker, timestamp, max_tokens)
        return _Call("POST", path, _one(ChatReply), body=body)

    # Lists that the clients walk to the end themselves (see `_walk`).

    @staticmethod
    def list_cubes(cursor: str | None) -> _Call[Page[Cube]]:
        return _Call("GET", _path("cubes"), _page(Cube), params=_drop_none(cursor=cursor))

    @staticmethod
    def list_activations(cube_id: str, cursor: str | None) -> _Call[Page[Activation]]:
        path = _path("cubes", cube_id, "activations")
        return _Call("GET", path, _page(Activation), params=_drop_none(cursor=cursor))

    @staticmethod
    def list_jobs(cursor: str | None) -> _Call[Page[Job]]:
        return _Call("GET", _path("jobs"), _page(Job), params=_drop_none(cursor=cursor))

    @staticmethod
    def list_keys(cursor: str | None) -> _Call[Page[ApiKey]]:
        return _Call("GET", _path("keys"), _page(ApiKey), params=_drop_none(cursor=cursor))

    @staticmethod
    def list_users(cursor: str | None) -> _Call[Page[User]]:
        return _Call("GET", _path("users"), _page(User), params=_drop_none(cursor=cursor))

    @staticmethod
    def list_grants(cube_id: str, cursor: str | None) -> _Call[Page[Grant]]:
        path = _path("cubes", cube_id, "grants")
        return _Call("GET", path, _page(Grant), params=_drop_none(cursor=cursor))

    @staticmethod
    def list_chats(cube_id: str, cursor: str | None) -> _Call[Page[Chat]]:
        path = _path("cubes", cube_id, "chats")
        return _Call("GET", path, _page(Chat), params=_drop_none(cursor=cursor))


# --------------------------------------------------------------------------- clients


class _Endpoint(Generic[P, T]):
    """A `_Routes` builder as a client method: `client.x(...)` is `client._send(build(...))`.

    The overloads give the method the builder's parameters and, per client, the right result:
    `T` from `MemosClient`, an awaitable `T` from `AsyncMemosClient`.
    """

    def __init__(self, build: Callable[P, _Call[T]]) -> None:
        self.build = build
        # help(client.x) should show what the method returns (`Cube`), not `_Call[Cube]`.
        signature = inspect.signature(build)
        returns = str(signature.return_annotation).removeprefix("_Call[").removesuffix("]")
        self.signature = signature.replace(return_annotation=returns)

    @overload
    def __get__(self, client: None, owner: type | None = None) -> Self: ...
    @overload
    def __get__(self, client: MemosClient, owner: type | None = None) -> Callable[P, T]: ...
    @overload
    def __get__(
        self, client: AsyncMemosClient, owner: type | None = None
    ) -> Callable[P, Awaitable[T]]: ...
    def __get__(self, client: Any, owner: type | None = None) -> Any:
        if client is None:
            return self
        build = self.build

        @functools.wraps(build)
        def method(*args: Any, **kwargs: Any) -> Any:
            return client._send(build(*args, **kwargs))

        method.__signature__ = self.signature  # type: ignore[attr-defined]
        return method


class _ServerSentEvents:
    """Feed it the lines of a `text/event-stream`; it returns each complete (event, data)."""

    def __init__(self) -> None:
        self.event, self.data = "message", ""

    def feed(self, line: str) -> tuple[str, Any] | None:
        if line.startswith("event:"):
            self.event = line[6:].strip()
        elif line.startswith("data:"):
            self.data += line[5:].strip()
        elif not line and self.data:
            done = (self.event, json.loads(self.data))
            self.event, self.data = "message", ""
            return done
        return None


def _piece_or_result(event: str, data: Any, parse: Callable[[Any], M]) -> str | M:
    """A `piece` event's text, or the `done` event's body parsed; an `error` event raises."""
    if event == "error":  # decoding failed after the stream began; nothing was stored
        err = data.get("error", {}) if isinstance(data, dict) else {}
        raise ServerError(str(err.get("message")), code=str(err.get("code", "error")))
    return str(data["text"]) if event == "piece" else parse(data)


def _stream_body(prompt: str, activation_id: str | None, max_tokens: int | None) -> dict[str, Any]:
    return {**_drop_none(prompt=prompt, activation_id=activation_id, max_tokens=max_tokens),
            "stream": True}  # fmt: skip


class _Api:
    """The routes both clients share, plus what the two have in common: URL, headers, parsing."""

    health = _Endpoint(_Routes.health)
    create_user = _Endpoint(_Routes.create_user)
    create_cube = _Endpoint(_Routes.create_cube)
    get_cube = _Endpoint(_Routes.get_cube)
    delete_cube = _Endpoint(_Routes.delete_cube)
    grant = _Endpoint(_Routes.grant)
    add_memories = _Endpoint(_Routes.add_memories)
    add_memory = _Endpoint(_Routes.add_memory)
    list_memories = _Endpoint(_Routes.list_memories)
    get_memory = _Endpoint(_Routes.get_memory)
    update_memory = _Endpoint(_Routes.update_memory)
    delete_memory = _Endpoint(_Routes.delete_memory)
    memory_history = _Endpoint(_Routes.memory_history)
    search = _Endpoint(_Routes.search)
    create_activation = _Endpoint(_Routes.create_activation)
    get_activation = _Endpoint(_Routes.get_activation)
    delete_activation = _Endpoint(_Routes.delete_activation)
    generate = _Endpoint(_Routes.generate)
    run_job = _Endpoint(_Routes.run_job)
    get_policy = _Endpoint(_Routes.get_policy)
    set_policy = _Endpoint(_Routes.set_policy)
    get_job_run = _Endpoint(_Routes.get_job_run)
    create_key = _Endpoint(_Routes.create_key)
    revoke_key = _Endpoint(_Routes.revoke_key)
    revoke_grant = _Endpoint(_Routes.revoke_grant)
    create_chat = _Endpoint(_Routes.create_chat)
    get_chat = _Endpoint(_Routes.get_chat)
    delete_chat = _Endpoint(_Routes.delete_chat)
    list_chat_messages = _Endpoint(_Routes.list_chat_messages)
    send_chat_message = _Endpoint(_Routes.send_chat_message)

    def __init__(self, base_url: str, api_key: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"User-Agent": f"memosd-python/{__version__}"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"  # never the key

    def _unreachable(self, call: _Call[Any], exc: httpx.TransportError) -> MemosConnectionError:
        reason = str(exc) or type(exc).__name__
        message = f"cannot reach {self.base_url}{call.path}: {reason}"
        return MemosConnectionError(message, code="connection_error")

    @staticmethod
    def _finish(call: _Call[T], response: httpx.Response) -> T:
        if not response.is_success:
            raise error_from_response(response)
        try:
            return call.parse(response.json() if response.content else None)
        except (ValueError, LookupError, TypeError, ValidationError) as exc:
            raise MemosError(
                f"unexpected reply to {call.method} {call.path}: {exc}",
                status=response.status_code,
                code="invalid_response",
            ) from exc

    @staticmethod
    def _next_cursor(page: Page[Any], cursor: str | None) -> str | None:
        if page.next_cursor is not None and page.next_cursor == cursor:
            raise MemosError(f"server repeated cursor {cursor!r}", code="invalid_response")
        return page.next_cursor


class MemosClient(_Api):
    """Blocking client; a context manager (or call `close()`).

    `timeout` is in seconds per request. The key goes out as `Authorization: Bearer <key>`.
    """

    def __init__(
        self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float | None = 30.0
    ) -> None:
        super().__init__(base_url, api_key)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call[T]) -> T:
        try:
            response = self._http.request(
                call.method, call.path, params=call.params, json=call.body, headers=call.headers
            )
        except httpx.TransportError as exc:
            raise self._unreachable(call, exc) from exc
        return self._finish(call, response)

    def _walk(self, make: Callable[[str | None], _Call[Page[T]]]) -> Iterator[T]:
        cursor: str | None = None
        while True:
            page = self._send(make(cursor))
            yield from page.items
            if (cursor := self._next_cursor(page, cursor)) is None:
                return

    def iter_memories(self, cube_id: str, session_id: str | None = None) -> Iterator[Memory]:
        """Every memory of the cube (or of one session), following `next_cursor`."""
        return self._walk(lambda c: _Routes.list_memories(cube_id, session_id, MAX_PAGE_SIZE, c))

    def list_cubes(self) -> list[Cube]:
        """Cubes this key owns or was granted."""
        return list(self._walk(_Routes.list_cubes))

    def get_or_create_cube(self, name: str, description: str | None = None) -> Cube:
        """The cube named `name` that this key owns, created (with `description`) if absent.

        Race-safe: when another client creates it first, the create's 409 `cube_exists` is
        answered by fetching that cube. An existing cube is returned as it is: its description
        is not changed. Cubes only granted to this key never match (they have another owner).
        """
        for attempt in range(1, GET_OR_CREATE_TRIES + 1):
            if (found := _owned_named(self.list_cubes(), name)) is not None:
                return found
            try:
                return self.create_cube(name, description)
            except Conflict as exc:
                if not _cube_exists(exc) or attempt == GET_OR_CREATE_TRIES:
                    raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    def list_activations(self, cube_id: str) -> list[Activation]:
        return list(self._walk(lambda c: _Routes.list_activations(cube_id, c)))

    def generate_stream(
        self,
        cube_id: str,
        prompt: str,
        activation_id: str | None = None,
        max_tokens: int | None = None,
    ) -> Iterator[str | Generation]:
        """`generate`, streamed: text pieces as they are decoded, then the `Generation`."""
        path = _path("cubes", cube_id, "generate")
        body = _stream_body(prompt, activation_id, max_tokens)
        for event, data in self._events(path, body):
            yield _piece_or_result(event, data, Generation.model_validate)

    def _events(self, path: str, body: Any) -> Iterator[tuple[str, Any]]:
        """POST `body` and yield the reply's server-sent events; a non-2xx reply raises."""
        with self._http.stream("POST", path, json=body) as response:
            if not response.is_success:
                response.read()
                raise error_from_response(response)
            events = _ServerSentEvents()
            for line in response.iter_lines():
                if (complete := events.feed(line)) is not None:
                    yield complete

    def list_chats(self, cube_id: str) -> list[Chat]:
        """The cube's chats, oldest first (reader+)."""
        return list(self._walk(lambda c: _Routes.list_chats(cube_id, c)))

    def chat(
        self,
        cube_id: str,
        chat_id: str | None = None,
        *,
        system: str | None = None,
        session_id: str | None = None,
        recall_top_k: int | None = None,
        recall_filters: Mapping[str, Any] | None = None,
        max_context_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        backend: str | None = None,
    ) -> ChatSession:
        """A `ChatSession`: a new chat on the cube, or with `chat_id` that existing chat,
        resumed (`NotFound` if there is none; the settings are then the chat's own, so giving
        any is a `TypeError`). `recall_filters` are `search`'s filters; None leaves a setting at
        the server's default (`ChatSession.info` shows what it chose)."""
        from memos.client_chat import ChatSession

        options = _drop_none(
            system=system,
            session_id=session_id,
            recall_top_k=recall_top_k,
            recall_filters=recall_filters,
            max_context_tokens=max_context_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            backend=backend,
        )
        if chat_id is None:
            return ChatSession(self, self.create_chat(cube_id, **options))
        if options:
            raise TypeError(f"a resumed chat keeps its own settings; got {sorted(options)}")
        return ChatSession(self, self.get_chat(cube_id, chat_id))

    def wait_activation(
        self, cube_id: str, activation_id: str, timeout: float = 600.0, poll: float = 0.5
    ) -> Activation:
        """Poll a background build until it leaves "building" (or raise TimeoutError)."""
        deadline = time.monotonic() + timeout
        while (act := self.get_activation(cube_id, activation_id)).state == "building":
            if time.monotonic() > deadline:
                raise TimeoutError(f"activation {activation_id} still building after {timeout}s")
            time.sleep(poll)
        return act

    def list_jobs(self) -> list[Job]:
        """Admin only."""
        return list(self._walk(_Routes.list_jobs))

    def list_keys(self) -> list[ApiKey]:
        """The caller's API keys, revoked ones included, oldest first; never their secrets."""
        return list(self._walk(_Routes.list_keys))

    def list_users(self) -> list[User]:
        """Admin only: every user, oldest first."""
        return list(self._walk(_Routes.list_users))

    def list_grants(self, cube_id: str) -> list[Grant]:
        """Owner only: who else may use the cube."""
        return list(self._walk(lambda c: _Routes.list_grants(cube_id, c)))


class AsyncMemosClient(_Api):
    """`MemosClient` with awaitable methods; `iter_memories` is an async generator.

    An async context manager (or call `aclose()`).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float | None = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`transport`: httpx's, e.g. `httpx.ASGITransport(app)` to call an app in process."""
        super().__init__(base_url, api_key)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call[T]) -> T:
        try:
            response = await self._http.request(
                call.method, call.path, params=call.params, json=call.body, headers=call.headers
            )
        except httpx.TransportError as exc:
            raise self._unreachable(call, exc) from exc
        return self._finish(call, response)

    async def _walk(self, make: Callable[[str | None], _Call[Page[T]]]) -> AsyncIterator[T]:
        cursor: str | None = None
        while True:
            page = await self._send(make(cursor))
            for item in page.items:
                yield item
            if (cursor := self._next_cursor(page, cursor)) is None:
                return

    def iter_memories(self, cube_id: str, session_id: str | None = None) -> AsyncIterator[Memory]:
        """Every memory of the cube (or of one session), following `next_cursor`."""
        return self._walk(lambda c: _Routes.list_memories(cube_id, session_id, MAX_PAGE_SIZE, c))

    async def list_cubes(self) -> list[Cube]:
        return [cube async for cube in self._walk(_Routes.list_cubes)]

    async def get_or_create_cube(self, name: str, description: str | None = None) -> Cube:
        """The cube named `name` that this key owns, created (with `description`) if absent.

        Race-safe: when another client creates it first, the create's 409 `cube_exists` is
        answered by fetching that cube. An existing cube is returned as it is.
        """
        for attempt in range(1, GET_OR_CREATE_TRIES + 1):
            if (found := _owned_named(await self.list_cubes(), name)) is not None:
                return found
            try:
                return await self.create_cube(name, description)
            except Conflict as exc:
                if not _cube_exists(exc) or attempt == GET_OR_CREATE_TRIES:
                    raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def list_activations(self, cube_id: str) -> list[Activation]:
        return [a async for a in self._walk(lambda c: _Routes.list_activations(cube_id, c))]

    async def generate_stream(
        self,
        cube_id: str,
        prompt: str,
        activation_id: str | None = None,
        max_tokens: int | None = None,
    ) -> AsyncIterator[str | Generation]:
        """`generate`, streamed: text pieces as they are decoded, then the `Generation`."""
        path = _path("cubes", cube_id, "generate")
        body = _stream_body(prompt, activation_id, max_tokens)
        async for event, data in self._events(path, body):
            yield _piece_or_result(event, data, Generation.model_validate)

    async def _events(self, path: str, body: Any) -> AsyncIterator[tuple[str, Any]]:
        """POST `body` and yield the reply's server-sent events; a non-2xx reply raises."""
        async with self._http.stream("POST", path, json=body) as response:
            if not response.is_success:
                await response.aread()
                raise error_from_response(response)
            events = _ServerSentEvents()
            async for line in response.aiter_lines():
                if (complete := events.feed(line)) is not None:
                    yield complete

    async def list_chats(self, cube_id: str) -> list[Chat]:
        return [c async for c in self._walk(lambda c: _Routes.list_chats(cube_id, c))]

    async def chat(
        self,
        cube_id: str,
        chat_id: str | None = None,
        *,
        system: str | None = None,
        session_id: str | None = None,
        recall_top_k: int | None = None,
        recall_filters: Mapping[str, Any] | None = None,
        max_context_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        backend: str | None = None,
    ) -> AsyncChatSession:
        """`MemosClient.chat`, awaited: an `AsyncChatSession`."""
        from memos.client_chat import AsyncChatSession

        options = _drop_none(
            system=system,
            session_id=session_id,
            recall_top_k=recall_top_k,
            recall_filters=recall_filters,
            max_context_tokens=max_context_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            backend=backend,
        )
        if chat_id is None:
            return AsyncChatSession(self, await self.create_chat(cube_id, **options))
        if options:
            raise TypeError(f"a resumed chat keeps its own settings; got {sorted(options)}")
        return AsyncChatSession(self, await self.get_chat(cube_id, chat_id))

    async def wait_activation(
        self, cube_id: str, activation_id: str, timeout: float = 600.0, poll: float = 0.5
    ) -> Activation:
        """Poll a background build until it leaves "building" (or raise TimeoutError)."""
        deadline = time.monotonic() + timeout
        while (act := await self.get_activation(cube_id, activation_id)).state == "building":
            if time.monotonic() > deadline:
                raise TimeoutError(f"activation {activation_id} still building after {timeout}s")
            await asyncio.sleep(poll)
        return act

    async def list_jobs(self) -> list[Job]:
        return [job async for job in self._walk(_Routes.list_jobs)]

    async def list_keys(self) -> list[ApiKey]:
        return [key async for key in self._walk(_Routes.list_keys)]

    async def list_users(self) -> list[User]:
        return [user async for user in self._walk(_Routes.list_users)]

    async def list_grants(self, cube_id: str) -> list[Grant]:
        return [g async for g in self._walk(lambda c: _Routes.list_grants(cube_id, c))]
